"""A small local OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) on 127.0.0.1 to serve
`POST …/chat/completions`, `GET …/models` and `GET /stats`, from one asyncio event loop, so it
sustains thousands of requests per second. `/stats` counts requests by outcome, and the
complete answers sent (`answered`) with their `prompt_tokens` and `completion_tokens`: what a client's spend
figures can be checked against. It also serves OpenAI's files and batches endpoints (mock_batches.py: upload,
create, poll, list, cancel, with a completion delay, per-request errors, expired and failed batches). It can be
made slow and unreliable on purpose:

* latency: a fixed delay plus uniform jitter before each reply;
* a concurrency ceiling: beyond `max_inflight` requests in flight it answers 429 with Retry-After;
* faults by rate: 429 + Retry-After, 500, 503, a hang longer than any sane client timeout, a 200
  whose JSON body is cut short, and a 400 (record-level rejection);
* `script`: forced outcomes for the first chat requests, in arrival order (for exact unit tests).

Faults and jitter are drawn from a generator seeded by (seed, request body, how many times that same
body was seen), so a run's fault pattern does not depend on request scheduling, and a retried
request gets a fresh draw. Replies echo the last user message (so tests can check content), or are
`reply_text` when that is set; when the request asks for JSON (`response_format` with a schema, or
vLLM's `guided_json`), the reply is a JSON object valid for simple schemas. `handler` ("module:function",
taking the request body) replaces both, for chat and batch requests alike: a test's scripted world.

A request with `logprobs: true` gets `choices[0].logprobs.content` in OpenAI's chat format. The reply is
cut into tokens (one per digit, words and punctuation with their leading space) with made-up but fixed
probabilities, so tests can compute the expected scores by hand: a digit token d has P(d) = 0.6,
P(d−1) = 0.3 and P(d+1) = 0.1 (alternatives outside 0–9 are left out, their mass missing as in any
top-k), written with the same leading space as d; any other token has probability 0.9 and no
alternative. `top_logprobs` (default 0) caps how many alternatives are listed, most likely first.

Use it in-process (`with MockOpenAIServer(MockConfig(...)) as server: server.url`) or as a separate
process (`MockServerProcess`, or `python -m datatailor.testing.mock_openai --help`) so that its CPU
time is not counted with the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import importlib
import json
import math
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from datatailor.testing.mock_batches import BatchEndpoints

OUTCOMES = ("ok", "429", "500", "503", "timeout", "truncated", "400")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class MockConfig:
    """How the mock behaves. Rates are probabilities per chat request and must sum to at most 1."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    max_inflight: int | None = None
    retry_after_s: float = 1.0
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_timeout: float = 0.0
    rate_truncated: float = 0.0
    rate_400: float = 0.0
    hang_s: float = 30.0
    seed: int = 0
    reply_chars: int = 200
    include_usage: bool = True
    model: str = "mock-model"
    script: list[str] = field(default_factory=list)
    keep_bodies: int = 200
    reply_text: str | None = None  # a fixed reply (instead of the echo) for requests without a JSON schema
    # "module:function" taking a chat request body (dict) and returning the reply text (chat and batch requests)
    handler: str | None = None
    # The files and batches endpoints (mock_batches.py): how long a batch takes, and its faults.
    batch_delay_s: float = 0.0
    batch_error_rate: float = 0.0
    batch_error_status: int = 500  # the status of those per-request errors (500: retried; 400: the record fails)
    batch_expire: int = 0
    batch_fail: int = 0

    def __post_init__(self) -> None:
        total = self.rate_429 + self.rate_500 + self.rate_503 + self.rate_timeout + self.rate_truncated + self.rate_400
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:.3f} > 1")
        bad = [s for s in self.script if s not in OUTCOMES]
        if bad:
            raise ValueError(f"unknown scripted outcome(s) {bad}; known: {', '.join(OUTCOMES)}")


def example_for_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A value that satisfies a simple JSON schema (objects, arrays, scalars, enums, $ref, anyOf)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return example_for_schema(target, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combo in ("anyOf", "oneOf", "allOf"):
        if schema.get(combo):
            options = [s for s in schema[combo] if s.get("type") != "null"] or schema[combo]
            return example_for_schema(options[0], root)
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: example_for_schema(sub, root) for name, sub in props.items()}
    if kind == "array":
        item = example_for_schema(schema.get("items", {}), root)
        return [item] * max(1, int(schema.get("minItems", 1)))
    if kind == "integer":
        return max(1, int(schema.get("minimum", 1)))
    if kind == "number":
        return float(max(1.0, float(schema.get("minimum", 1.0))))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "mock" * max(1, int(schema.get("minLength", 1) + 3) // 4)


def _requested_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            return (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        if fmt.get("type") == "json_object":
            return fmt.get("schema") or {"type": "object"}
    if isinstance(body.get("guided_json"), dict):
        return body["guided_json"]
    return None


def _words(text: str) -> int:
    return len(text.split())


_TOKEN = re.compile(r"\s?\d|\s?[A-Za-z]+|\s?[^\sA-Za-z\d]+|\s+")


def mock_logprobs(text: str, top_logprobs: int) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` for `text` (the fixed probabilities of the module docstring)."""
    content: list[dict[str, Any]] = []
    for token in _TOKEN.findall(text):
        digit = token.strip()
        if len(digit) == 1 and digit.isdigit():
            space = token[: len(token) - 1]
            d = int(digit)
            options = [(token, 0.6)] + [(f"{space}{v}", p) for v, p in ((d - 1, 0.3), (d + 1, 0.1)) if 0 <= v <= 9]
        else:
            options = [(token, 0.9)]
        alternatives = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in options]
        content.append({
            "token": token, "logprob": math.log(options[0][1]), "bytes": list(token.encode()),
            "top_logprobs": alternatives[: max(0, top_logprobs)],
        })
    return content


class _Connection(asyncio.Protocol):
    """One client connection: requests are handled one at a time, in order (no pipelining races)."""

    def __init__(self, server: "MockOpenAIServer"):
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.keep_alive = True
        self.pending: asyncio.TimerHandle | None = None
        self.counted = False  # this connection's current request holds an in-flight slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        self._release()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.server.in_flight -= 1

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        try:
            method, path, version = head[0].split(" ", 2)
        except ValueError:
            self.buffer.clear()
            self.keep_alive = False
            self.send(400, b'{"error":{"message":"bad request line"}}')
            return
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.buffer.clear()
            self.keep_alive = False
            self.send(411, b'{"error":{"message":"send a Content-Length body"}}')
            return
        length = int(headers.get("content-length", "0") or 0)
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        self.busy = True
        self.keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        self.server._handle(self, method, path, body, headers)

    def send(self, status: int, body: bytes, extra_headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.pending = None
        self._release()
        if self.transport is None or self.transport.is_closing():
            return
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}", "Connection: " + ("keep-alive" if self.keep_alive else "close")]
        lines.extend(f"{k}: {v}" for k, v in extra_headers)
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.busy = False
        if not self.keep_alive:
            self.transport.close()
        elif self.buffer:
            self._next_request()


class MockOpenAIServer:
    """The mock server. Start it in a background thread (`start`/`stop`, or `with`) or await `serve`."""

    def __init__(self, config: MockConfig | None = None, port: int = 0):
        self.config = config or MockConfig()
        self.port = port
        self.in_flight = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self.bodies: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.config.keep_bodies)
        self._seen: dict[bytes, int] = {}
        self._script = collections.deque(self.config.script)
        self._connections: set[_Connection] = set()
        self.batch_api = BatchEndpoints(self)
        self._handler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL (what `base_url` of a model entry should be)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle ----------------------------------------------------------------

    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Connection(self), "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close_async(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()

    def start(self) -> "MockOpenAIServer":
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close_async())
            loop.close()

        self._thread = threading.Thread(target=main, name="mock-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("mock OpenAI server did not start within 10 s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "MockOpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests -------------------------------------------------------------------

    def _handle(self, conn: _Connection, method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        route = path.split("?", 1)[0].rstrip("/")
        if self.batch_api.handles(route):
            self.batch_api.handle(conn, method, path, headers or {}, body)
        elif method == "GET" and route.endswith("/models"):
            payload = {"object": "list", "data": [{"id": self.config.model, "object": "model", "owned_by": "mock"}]}
            conn.send(200, json.dumps(payload).encode())
        elif method == "GET" and route == "/stats":
            conn.send(200, json.dumps(self.stats_snapshot()).encode())
        elif method == "POST" and route.endswith("/chat/completions"):
            self._chat(conn, body)
        else:
            conn.send(404, json.dumps({"error": {"message": f"no route {method} {route}"}}).encode())

    def stats_snapshot(self) -> dict[str, int]:
        return {**self.stats, "in_flight": self.in_flight}

    def _retry_after(self) -> tuple[tuple[str, str], ...]:
        value = self.config.retry_after_s
        text = str(int(value)) if float(value).is_integer() else f"{value:g}"
        return (("Retry-After", text),)

    def _draw(self, body: bytes) -> tuple[str, float]:
        """The outcome and latency of one request: forced by `script`, else drawn by rate."""
        digest = hashlib.blake2b(body, digest_size=8).digest()
        seen = self._seen.get(digest, 0)
        self._seen[digest] = seen + 1
        rng = random.Random(f"{self.config.seed}:{digest.hex()}:{seen}")
        c = self.config
        latency = c.latency_s + (rng.random() * c.jitter_s if c.jitter_s else 0.0)
        if self._script:
            return self._script.popleft(), latency
        u = rng.random()
        for outcome, rate in (("429", c.rate_429), ("500", c.rate_500), ("503", c.rate_503),
                              ("timeout", c.rate_timeout), ("truncated", c.rate_truncated), ("400", c.rate_400)):
            if u < rate:
                return outcome, latency
            u -= rate
        return "ok", latency

    def _chat(self, conn: _Connection, raw: bytes) -> None:
        self.stats["requests"] += 1
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            self.stats["bad_request"] += 1
            conn.send(400, b'{"error":{"message":"body must be JSON with `messages`"}}')
            return
        self.bodies.append(body)
        c = self.config
        if c.max_inflight is not None and self.in_flight >= c.max_inflight:
            self.stats["429_ceiling"] += 1
            conn.send(429, b'{"error":{"message":"too many requests in flight","type":"rate_limit"}}', self._retry_after())
            return
        self.in_flight += 1
        conn.counted = True
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        outcome, latency = self._draw(raw)
        self.stats[outcome] += 1
        loop = self._loop or asyncio.get_running_loop()
        if outcome == "timeout":
            conn.pending = loop.call_later(c.hang_s, self._reply, conn, body, messages, False)
            return
        if outcome in ("429", "500", "503", "400"):
            status = int(outcome)
            message = {429: "rate limited (injected)", 500: "internal error (injected)",
                       503: "overloaded (injected)", 400: "maximum context length exceeded (injected)"}[status]
            payload = json.dumps({"error": {"message": message, "type": "mock", "code": status}}).encode()
            headers = self._retry_after() if status in (429, 503) else ()
            if latency > 0:
                conn.pending = loop.call_later(latency, conn.send, status, payload, headers)
            else:
                conn.send(status, payload, headers)
            return
        truncated = outcome == "truncated"
        if latency > 0:
            conn.pending = loop.call_later(latency, self._reply, conn, body, messages, truncated)
        else:
            self._reply(conn, body, messages, truncated)

    def _reply(self, conn: _Connection, body: dict[str, Any], messages: list[dict[str, Any]], truncated: bool) -> None:
        payload = self.completion_payload(body)
        data = json.dumps(payload).encode()
        if truncated:
            data = data[: len(data) // 2]
        elif conn.transport is not None and not conn.transport.is_closing():
            # What a client could account for: complete answers sent, and their tokens (spend tests compare these).
            usage = payload.get("usage") or {}
            self.stats["answered"] += 1
            self.stats["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
            self.stats["completion_tokens"] += int(usage.get("completion_tokens", 0))
        conn.send(200, data)

    def completion_payload(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat completion a request body gets (the chat endpoint's reply, and each answered batch line)."""
        c = self.config
        messages = body.get("messages") or []
        last_user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        schema = _requested_schema(body)
        if c.handler is not None:
            if self._handler is None:
                module, _, name = c.handler.partition(":")
                self._handler = getattr(importlib.import_module(module), name)
            text = str(self._handler(body))
        elif schema is not None:
            text = json.dumps(example_for_schema(schema))
        elif c.reply_text is not None:
            text = c.reply_text
        else:
            words = f"Mock reply to: {last_user[: c.reply_chars]}".split()
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or len(words)
            text = " ".join(words[: max(1, int(max_tokens))])
        prompt_tokens = sum(_words(str(m.get("content") or "")) for m in messages)
        completion_tokens = _words(text)
        payload: dict[str, Any] = {
            "id": f"chatcmpl-mock-{self.stats['requests']}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model") or c.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }
        if body.get("logprobs"):
            top = body.get("top_logprobs")
            payload["choices"][0]["logprobs"] = {"content": mock_logprobs(text, int(top) if isinstance(top, int) else 0)}
        if c.include_usage:
            payload["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens}
        return payload


class MockServerProcess:
    """The mock in a child process (its CPU is not the client's). `url` once started; `stats()` over HTTP."""

    def __init__(self, config: MockConfig | None = None, startup_timeout_s: float = 20.0):
        self.config = config or MockConfig()
        self.startup_timeout_s = startup_timeout_s
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "MockServerProcess":
        args = [sys.executable, "-c", "from datatailor.testing.mock_openai import main; main()",
                "--config-json", json.dumps(dataclasses.asdict(self.config))]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                self.stop()
                raise RuntimeError(f"mock server process did not start within {self.startup_timeout_s} s")
            chunk = self._proc.stdout.read1(1024)  # type: ignore[attr-defined]
            if not chunk:
                self.stop()
                raise RuntimeError("mock server process exited before it was ready")
            line += chunk
        text = line.decode().strip()
        if not text.startswith("READY "):
            self.stop()
            raise RuntimeError(f"mock server process said {text!r}")
        self.url = text.split(" ", 1)[1]
        return self

    def stats(self) -> dict[str, int]:
        root = self.url.rsplit("/v1", 1)[0]
        with urllib.request.urlopen(f"{root}/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> "MockServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve_until_signalled(server: MockOpenAIServer) -> None:
    await server.start_async()
    print(f"READY {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close_async()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a mock OpenAI-compatible API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as `READY <url>`).")
    parser.add_argument("--config-json", default=None, help="All MockConfig fields as one JSON object.")
    for f in dataclasses.fields(MockConfig):
        if f.name in ("script",):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            caster = {"float": float, "int": int, "int | None": int, "str": str, "str | None": str}[str(f.type)]
            parser.add_argument(flag, type=caster, default=None)
    args = parser.parse_args(argv)
    values: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    for f in dataclasses.fields(MockConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    asyncio.run(_serve_until_signalled(MockOpenAIServer(MockConfig(**values), port=args.port)))


if __name__ == "__main__":
    main()
