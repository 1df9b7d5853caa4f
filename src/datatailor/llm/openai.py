"""The `openai` backend: any OpenAI-compatible chat-completions server over HTTP.

Works with OpenAI, vLLM, the llama.cpp servers, Ollama and TGI. Like every backend it owns transport
only (see llm/base.py); caching, usage, budget and parse-repair live in `RoleModel`.

How each outcome of one HTTP attempt is handled:

=====================================================  =============================================
outcome                                                what happens
=====================================================  =============================================
200 with a JSON body                                   a `Completion`; the limiter may grow
429, 503                                               retry after `Retry-After` (or backoff); the
                                                       in-flight limit halves and admission pauses
408, 409, other 5xx, timeout, connection error,        retry with exponential backoff + full jitter
200 whose body is not JSON (cut short)
401, 403 (bad key), 404 (wrong base_url or model)      `ServerUnavailable`: the run stops
other 4xx (e.g. 400 context length)                    `LLMCallFailure` with the server's message:
                                                       this record fails, the run goes on
`max_retries` retries spent                            `LLMCallFailure`, kind `timeout` if the last
                                                       attempt timed out, else `llm_error`
`circuit_breaker_failures` transport failures in a     `ServerUnavailable` naming base_url and the
row (connection, timeout, 5xx, cut-short body)         last error; every later call fails at once
=====================================================  =============================================

A missing key variable is a `ServerUnavailable` too (a `UserError` that names the variable), raised
when the backend is built, so the run stops before any request and resumes once the key is set.

HTTP goes through `httpx2` (pydantic's maintained fork of httpx, which the openai SDK also uses): same
API as httpx, but its connection pool does not rescan every connection at great cost per request,
which made httpx 0.28 spend ~4 ms of CPU per request at 32 in flight (benchmarks/RESULTS.md).

Log-probabilities: a request with `sampling.top_logprobs` sends `logprobs: true, top_logprobs: k` and
reads `choices[0].logprobs.content` (the chat format); the legacy completions format (`tokens`,
`token_logprobs`, `top_logprobs` as dicts), which some servers put there, is read too. A server that
ignores the request leaves `Completion.logprobs` None.

The API key is read from the environment variable the recipe names and only ever lives in the
HTTP client's default headers; no message, stat or log line contains it.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import httpx2

from datatailor.errors import LLMCallFailure, ServerUnavailable
from datatailor.llm.base import Completion, CompletionRequest, PositionLogprobs
from datatailor.llm.config import OpenAIModel


def parse_retry_after(headers: httpx2.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI), or `Retry-After` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def estimate_tokens(text: str) -> int:
    """A rough token count (~4 characters a token) for servers that report no usage."""
    return math.ceil(len(text) / 4)


class AdaptiveLimiter:
    """AIMD admission control: how many requests to one server may be in flight right now.

    The limit starts at `max_limit`. It halves on an overload signal (429/503) and shrinks by a fifth
    when recent latency climbs well above its running baseline (the server is queueing) — at most
    once per recent round-trip, so one burst of rejections counts once. It grows back by about one
    slot per round-trip's worth of successes while latency is normal. A `Retry-After` pauses all
    admissions until it has passed. Waiters are served first-come first-served.
    """

    OVERLOAD_FACTOR = 0.5
    LATENCY_FACTOR = 0.8
    LATENCY_RISE = 2.5  # recent latency above this multiple of the baseline means "queueing"
    GROW_BELOW = 1.5  # grow only while recent latency is within this multiple of the baseline
    WARMUP = 20  # latency samples before the latency rule may act
    RECENT_ALPHA = 0.2
    BASELINE_ALPHA = 0.02

    def __init__(self, max_limit: int):
        self.max_limit = max_limit
        self.limit = float(max_limit)
        self.in_flight = 0
        self.paused_until = 0.0
        self.baseline: float | None = None
        self.recent: float | None = None
        self.samples = 0
        self.decreases = 0
        self.min_limit_seen = float(max_limit)
        self._last_decrease = -math.inf
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._wake_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def capacity(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if not self._waiters and self.in_flight < self.capacity and loop.time() >= self.paused_until:
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._wake()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        if not self._waiters or self._loop is None:
            return
        now = self._loop.time()
        if now < self.paused_until:
            if self._wake_handle is None:
                self._wake_handle = self._loop.call_at(self.paused_until, self._wake_after_pause)
            return
        while self._waiters and self.in_flight < self.capacity:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.in_flight += 1
            waiter.set_result(None)

    def _wake_after_pause(self) -> None:
        self._wake_handle = None
        self._wake()

    def _decrease(self, factor: float) -> None:
        now = time.monotonic()
        if now - self._last_decrease < max(0.05, self.recent or 0.0):
            return
        self._last_decrease = now
        self.limit = max(1.0, self.limit * factor)
        self.min_limit_seen = min(self.min_limit_seen, self.limit)
        self.decreases += 1

    def on_overload(self, retry_after: float | None) -> None:
        self._decrease(self.OVERLOAD_FACTOR)
        if retry_after and self._loop is not None:
            self.paused_until = max(self.paused_until, self._loop.time() + retry_after)
            if self._wake_handle is not None:
                self._wake_handle.cancel()
                self._wake_handle = None

    def on_success(self, latency: float) -> None:
        self.samples += 1
        if self.baseline is None or self.recent is None:
            self.baseline = self.recent = latency
            return
        self.recent += self.RECENT_ALPHA * (latency - self.recent)
        self.baseline += self.BASELINE_ALPHA * (latency - self.baseline)
        if self.samples >= self.WARMUP and self.recent > self.LATENCY_RISE * self.baseline:
            self._decrease(self.LATENCY_FACTOR)
        elif self.limit < self.max_limit and self.recent <= self.GROW_BELOW * self.baseline:
            self.limit = min(float(self.max_limit), self.limit + 1.0 / self.limit)
            self._wake()

    def close(self) -> None:
        if self._wake_handle is not None:
            self._wake_handle.cancel()
            self._wake_handle = None


@dataclass
class OpenAIStats:
    """Counters for benchmarks and progress: HTTP attempts and what became of them."""

    attempts: int = 0
    successes: int = 0
    retries: int = 0
    http_429: int = 0
    http_503: int = 0
    http_5xx: int = 0
    http_4xx: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    invalid_bodies: int = 0
    failed_calls: int = 0


class _Retryable(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = "llm_error",
        transport: bool = True,
        retry_after: float | None = None,
        refused: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.transport = transport  # counts toward the circuit breaker
        self.retry_after = retry_after
        self.refused = refused  # nothing accepted the connection


def _server_message(response: httpx2.Response) -> str:
    """The error text a server put in its reply, whatever its shape."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300].strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:500]
    return json.dumps(data)[:300]


# A token whose logprob the server left out: probability ~0 (not -inf, which JSON and the cache cannot hold).
_UNKNOWN_LOGPROB = -1e4


def parse_logprobs(data: Any) -> list[PositionLogprobs] | None:
    """A choice's `logprobs` object → one entry per generated token; None when absent or unreadable."""
    if not isinstance(data, dict):
        return None
    content = data.get("content")
    if isinstance(content, list):
        out: list[PositionLogprobs] = []
        for item in content:
            if not isinstance(item, dict) or not isinstance(item.get("token"), str):
                return None
            logprob = _finite(item.get("logprob"))
            top: dict[str, float] = {}
            for alt in item.get("top_logprobs") or []:
                if isinstance(alt, dict) and isinstance(alt.get("token"), str):
                    value = _finite(alt.get("logprob"))
                    if value is not None and alt["token"] not in top:
                        top[alt["token"]] = value
            if logprob is None:
                logprob = top.get(item["token"], _UNKNOWN_LOGPROB)
            out.append(PositionLogprobs(token=item["token"], logprob=logprob, top=top))
        return out
    tokens, values, tops = data.get("tokens"), data.get("token_logprobs"), data.get("top_logprobs")
    if isinstance(tokens, list) and isinstance(values, list) and len(tokens) == len(values):
        tops = tops if isinstance(tops, list) and len(tops) == len(tokens) else [None] * len(tokens)
        out = []
        for token, value, top in zip(tokens, values, tops):
            clean = {str(k): v for k, v in (top or {}).items() if _finite(v) is not None} if isinstance(top, dict) else {}
            lp = _finite(value)
            out.append(PositionLogprobs(token=str(token), logprob=lp if lp is not None else _UNKNOWN_LOGPROB, top=clean))
        return out
    return None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _schema_name(schema: dict[str, Any]) -> str:
    raw = str(schema.get("title") or "reply")
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)[:64]
    return name or "reply"


def encode_body(config: OpenAIModel, request: CompletionRequest) -> dict[str, Any]:
    """The chat-completions request body of `request` (online, and each line of a batch input file)."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": config.model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.top_logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = s.top_logprobs
    schema = request.json_schema
    mode = config.json_mode
    if schema is not None and mode == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": _schema_name(schema), "schema": schema}}
    elif schema is not None and mode == "json_object":
        body["response_format"] = {"type": "json_object", "schema": schema}
    elif schema is not None and mode == "guided_json":
        body["guided_json"] = schema
    body.update(config.extra_body)
    return body


def read_completion(data: Any, request: CompletionRequest, batch_id: str | None = None) -> Completion:
    """A chat-completion reply (the parsed JSON body) → `Completion`; `LLMCallFailure` when it holds no choice.

    Usage the server did not report is estimated (~4 characters a token)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        detail = data.get("error", data) if isinstance(data, dict) else data
        raise LLMCallFailure(f"reply without choices: {json.dumps(detail)[:300]}")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    if isinstance(text, list):  # content parts, as some servers send them
        text = "".join(str(part.get("text", "")) for part in text if isinstance(part, dict))
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    if not isinstance(prompt_tokens, int):
        prompt_tokens = sum(estimate_tokens(m.content) for m in request.messages)
    if not isinstance(completion_tokens, int):
        completion_tokens = estimate_tokens(text)
    return Completion(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=choice.get("finish_reason"),
        logprobs=parse_logprobs(choice.get("logprobs")) if request.sampling.top_logprobs is not None else None,
        batch_id=batch_id,
    )


class OpenAIBackend:
    """An OpenAI-compatible chat-completions server, with backpressure, retries and a circuit breaker."""

    def __init__(self, config: OpenAIModel, *, transport: httpx2.AsyncBaseTransport | None = None):
        self.config = config
        self.native_json_schema = config.json_mode != "none"
        urls = config.base_urls
        self.base_url = urls[0] if len(urls) == 1 else f"{urls[0]} (+{len(urls) - 1} replicas)"
        # parsed once, not per request; several replicas take requests in turn, each process starting elsewhere
        self._urls = [httpx2.URL(f"{u}/chat/completions") for u in urls]
        self._turn = itertools.count(os.getpid())
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                # ServerUnavailable is a UserError that also stops the run cleanly (manifest written),
                # so the same command works once the variable is set.
                raise ServerUnavailable(
                    f"model {config.model!r} at {self.base_url}: environment variable {config.api_key_env} is not "
                    f"set; put the API key in it (or set `api_key_env: null` for a server that needs no key)"
                )
            headers["Authorization"] = f"Bearer {key}"
        n = config.max_concurrency
        self._client = httpx2.AsyncClient(
            headers=headers,
            limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=30.0),
            timeout=httpx2.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0)),
            transport=transport,
        )
        self.limiter = AdaptiveLimiter(n)
        self.stats = OpenAIStats()
        self._rng = random.Random()
        self._consecutive_failures = 0
        self._ever_answered = False  # any HTTP reply at all from this server
        self._broken: str | None = None  # the circuit breaker's message once it is open

    # -- the Backend protocol -------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> Completion:
        body = self._encode(request)
        attempts = self.config.max_retries + 1
        failure: _Retryable | None = None
        for attempt in range(attempts):
            if failure is not None:
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt, failure))
            self._check_breaker()
            await self.limiter.acquire()
            try:
                self._check_breaker()
                return await self._attempt(body, request)
            except _Retryable as exc:
                failure = exc
            finally:
                self.limiter.release()
            self._count_failure(failure)
        assert failure is not None
        self.stats.failed_calls += 1
        raise LLMCallFailure(
            f"{self.base_url}: gave up after {attempts} attempt(s); last error: {failure.message}", kind=failure.kind
        )

    async def aclose(self) -> None:
        self.limiter.close()
        await self._client.aclose()

    def stats_snapshot(self) -> dict[str, Any]:
        """Counters plus the limiter's state, for benchmarks and logs (never the key)."""
        return {
            **asdict(self.stats),
            "limit": round(self.limiter.limit, 2),
            "min_limit": round(self.limiter.min_limit_seen, 2),
            "limit_decreases": self.limiter.decreases,
            "in_flight": self.limiter.in_flight,
            "breaker_open": self._broken is not None,
        }

    # -- one attempt ------------------------------------------------------------------

    async def _attempt(self, body: bytes, request: CompletionRequest) -> Completion:
        self.stats.attempts += 1
        started = time.monotonic()
        try:
            # httpx's own timeouts bound each phase; this bounds the whole exchange.
            async with asyncio.timeout(self.config.timeout_s):
                response = await self._client.post(self._urls[next(self._turn) % len(self._urls)], content=body)
        except (httpx2.TimeoutException, TimeoutError):
            self.stats.timeouts += 1
            raise _Retryable(f"no reply within {self.config.timeout_s:g} s", kind="timeout") from None
        except httpx2.RequestError as exc:
            self.stats.connection_errors += 1
            refused = isinstance(exc, httpx2.ConnectError)
            raise _Retryable(f"{type(exc).__name__}: {exc or 'connection failed'}", refused=refused) from None
        self._ever_answered = True
        latency = time.monotonic() - started
        status = response.status_code
        if 200 <= status < 300:
            completion = self._parse(response, request)
            self._consecutive_failures = 0
            self.stats.successes += 1
            self.limiter.on_success(latency)
            return completion
        raise self._error_for(response)

    def _error_for(self, response: httpx2.Response) -> Exception:
        """The exception a non-2xx reply becomes (see the table at the top of this module)."""
        status = response.status_code
        message = f"HTTP {status}: {_server_message(response)}"
        if status in (429, 503):
            retry_after = parse_retry_after(response.headers)
            if retry_after is not None:
                retry_after = min(retry_after, self.config.retry_after_max_s)
            self.limiter.on_overload(retry_after)
            if status == 429:
                self.stats.http_429 += 1
            else:
                self.stats.http_503 += 1
            return _Retryable(message, transport=status == 503, retry_after=retry_after)
        if status >= 500:
            self.stats.http_5xx += 1
            return _Retryable(message)
        self.stats.http_4xx += 1
        if status in (408, 409):  # the server asks us to try again
            return _Retryable(message, kind="timeout" if status == 408 else "llm_error", transport=False)
        self._consecutive_failures = 0
        if status in (401, 403):
            where = f"check the key in ${self.config.api_key_env}" if self.config.api_key_env else (
                "the server wants a key: set `api_key_env` to the variable that holds it"
            )
            return self._open_breaker(f"{self.base_url} refused the API key ({message}); {where}")
        if status == 404:
            return self._open_breaker(
                f"{self.base_url}: {message}; check `base_url` (often ends in /v1) and `model` {self.config.model!r}"
            )
        self.stats.failed_calls += 1
        return LLMCallFailure(f"{self.base_url}: {message}")

    def _parse(self, response: httpx2.Response, request: CompletionRequest) -> Completion:
        try:
            data = json.loads(response.content)
        except ValueError:
            self.stats.invalid_bodies += 1
            raise _Retryable(f"HTTP {response.status_code} with a body that is not valid JSON (cut short?)") from None
        try:
            return read_completion(data, request)
        except LLMCallFailure as exc:
            self._consecutive_failures = 0  # it answered, just not with a completion
            self.stats.failed_calls += 1
            raise LLMCallFailure(f"{self.base_url}: {exc}") from None

    # -- request body, backoff, circuit breaker ------------------------------------------

    def _encode(self, request: CompletionRequest) -> bytes:
        return json.dumps(encode_body(self.config, request), ensure_ascii=False).encode("utf-8")

    def _backoff(self, attempt: int, failure: _Retryable) -> float:
        """Full jitter: uniform in [0, base·2^(attempt-1)], capped; never less than the server's Retry-After."""
        cap = min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * 2 ** (attempt - 1))
        if failure.refused and not self._ever_answered:
            # A server that has never answered and refuses connections is a wrong URL or a server
            # that is not running: reach the circuit breaker in seconds, not minutes. A server that
            # dies mid-run keeps the full backoff, in case it is only restarting.
            cap = min(cap, self.config.retry_backoff_s)
        delay = self._rng.uniform(0.0, cap)
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        return delay

    def _count_failure(self, failure: _Retryable) -> None:
        if not failure.transport:
            self._consecutive_failures = 0  # the server answered: it is alive
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.config.circuit_breaker_failures:
            raise self._open_breaker(
                f"{self.base_url} looks down: {self._consecutive_failures} requests in a row failed "
                f"(circuit breaker open); last error: {failure.message}"
            )

    def _open_breaker(self, message: str) -> ServerUnavailable:
        """Open the circuit breaker (the first reason sticks); every later call fails with it at once."""
        if self._broken is None:
            self._broken = message
        return ServerUnavailable(self._broken)

    def _check_breaker(self) -> None:
        if self._broken is not None:
            raise ServerUnavailable(self._broken)
