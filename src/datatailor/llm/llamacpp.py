"""The embedded backend: a GGUF model run in-process by llama-cpp-python.

One `Llama` object is not thread-safe, so every call holds one lock around it; calls run in a
worker thread (`asyncio.to_thread`) so the event loop keeps serving the rest of the run while the
model generates. The model loads on the first call. Structured output is native: llama.cpp turns
the JSON schema into a grammar that constrains sampling.

Log-probabilities (`sampling.top_logprobs`): llama-cpp-python's own `logprobs`/`top_logprobs` need the
model loaded with `logits_all=True`, which keeps n_ctx × vocab float32 logits (2.4 GiB for Qwen2.5 at
n_ctx 4096, ~0.6 MiB per evaluated prompt token) and computes the output layer for every prompt token.
Instead, a logits processor (`TopLogprobRecorder`) sees the last position's logits at each sampling
step, keeps its top-k log-softmax, and learns which token was chosen at the next step (or, for the
last one, from the text): one vocabulary-sized vector of extra memory, well under 1 ms per token.
The probabilities are the model's own (temperature 1, before penalties and grammar), as OpenAI reports them.

Every call is bounded twice: by its token limit (`max_tokens`, at least 1: llama.cpp reads 0 or less as "until the
context is full"), and by the model's `timeout_s`, checked after every generated token (`Deadline`, a stopping
criterion), which ends the call as a `timeout` failure. The default thread count is half the CPUs this process
may use: llama.cpp's threads wait for each other at every step, so more threads than free cores slow every token
down (on a busy 2-core machine, 2 threads decoded 2-4 tokens/s where 1 thread decoded 10-20).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from datatailor.errors import LLMCallFailure, UserError
from datatailor.llm.base import Completion, CompletionRequest, PositionLogprobs
from datatailor.llm.config import LlamaCppModel
from datatailor.llm.local_models import INSTALL_HINT, is_local_name, resolve_local_model

log = logging.getLogger(__name__)


def resolve_gguf(model: str) -> Path:
    """A `local:` name or a path → an existing GGUF file."""
    if is_local_name(model):
        return resolve_local_model(model)
    path = Path(model).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF model file not found: {model} (give a path or a local: name; see `datatailor models list`)")
    return path


class Deadline:
    """A llama-cpp-python stopping criterion: stop (and say so in `fired`) once `seconds` have passed since it was made.

    llama.cpp checks it after every generated token, so a call ends within one token of its limit (the prompt's own
    evaluation, bounded by the context size, comes before the first token)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.tokens = 0
        self.fired = False

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        if self.clock() - self.start > self.seconds:
            self.fired = True
        else:
            self.tokens += 1
        return self.fired


def chat_with_deadline(llm: Any, deadline: Deadline, **kwargs: Any) -> Any:
    """`llm.create_chat_completion(**kwargs)`, stopped by `deadline`.

    The chat API takes no stopping criteria, and a logits processor cannot stop it (llama-cpp-python swallows its
    exceptions, and a grammar overrides forced end tokens); its chat handlers generate through
    `llm.create_completion`, which does take them, so the deadline joins them there for this one call (the caller
    holds the model's lock). tests/test_llamacpp_backend.py checks it on the real model."""
    plain = llm.create_completion

    def create_completion(*args: Any, **kw: Any) -> Any:
        theirs = kw.get("stopping_criteria")
        kw["stopping_criteria"] = lambda ids, logits: deadline(ids, logits) or bool(theirs and theirs(ids, logits))
        return plain(*args, **kw)

    llm.create_completion = create_completion
    try:
        return llm.create_chat_completion(**kwargs)
    finally:
        del llm.create_completion


def default_threads() -> int:
    """Half the CPUs this process may use, at least 1 (llama-cpp-python's own default, on the usable CPUs)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, usable // 2)


class TopLogprobRecorder:
    """A llama-cpp-python logits processor that records the top-k log-probabilities of each step.

    Called once per sampled token with (tokens evaluated so far, that position's logits); returns the
    logits unchanged. The token chosen at step i is the last evaluated token when step i+1 is called;
    its log-probability comes from step i's full vector, the only one kept.
    """

    def __init__(self, k: int):
        self.k = max(1, k)
        self.tops: list[tuple[list[int], list[float]]] = []  # per step: (token ids, logprobs), most likely first
        self.chosen: list[tuple[int, float]] = []  # (token id, logprob) of steps 0 … len(tops) - 2
        self._last: Any = None  # the last step's logits (a copy) and their log-sum-exp

    def __call__(self, input_ids: Any, logits: Any) -> Any:
        import numpy as np

        if self._last is not None and len(input_ids):
            token = int(input_ids[-1])
            self.chosen.append((token, self._logprob(token)))
        x = np.array(logits, dtype=np.float32)  # a copy: llama.cpp reuses the buffer
        peak = float(x.max())
        lse = peak + float(np.log(np.exp(x - peak).sum(dtype=np.float64)))
        n = x.shape[0]
        k = min(self.k, n)
        top = np.argpartition(x, n - k)[n - k :]
        top = top[np.argsort(-x[top], kind="stable")]
        self.tops.append(([int(i) for i in top], [float(x[i]) - lse for i in top]))
        self._last = (x, lse)
        return logits

    def _logprob(self, token: int) -> float:
        x, lse = self._last
        return float(x[token]) - lse

    def last_logprob(self, token: int) -> float | None:
        if self._last is None or not 0 <= token < self._last[0].shape[0]:
            return None
        return self._logprob(token)


def recorded_positions(
    recorder: TopLogprobRecorder,
    text: str,
    piece: Callable[[int], str],
    tokenize: Callable[[str], list[int]],
) -> list[PositionLogprobs]:
    """The recorder's steps as `PositionLogprobs` for the reply `text`.

    `piece(id)` is a token's text; `tokenize(s)` the ids of a string. Tokens are kept while their
    concatenation stays a prefix of `text` (the end-of-generation token and a stop sequence's tokens are
    not part of the reply). The last step's token is never evaluated by llama.cpp, so it is recovered
    from what is left of `text`.
    """
    out: list[PositionLogprobs] = []
    used = 0
    chosen = list(recorder.chosen)
    if len(chosen) < len(recorder.tops):
        known = "".join(piece(t) for t, _ in chosen)
        rest = text[len(known):] if text.startswith(known) else ""
        if rest:
            ids = [i for i in recorder.tops[len(chosen)][0] if piece(i) == rest] or tokenize(rest)
            if len(ids) == 1 and (lp := recorder.last_logprob(ids[0])) is not None:
                chosen.append((ids[0], lp))
    for (token, logprob), (top_ids, top_lps) in zip(chosen, recorder.tops):
        token_text = piece(token)
        if not text.startswith(token_text, used) or (not token_text and used >= len(text)):
            break
        used += len(token_text)
        top: dict[str, float] = {}
        for i, lp in zip(top_ids, top_lps):
            alt = piece(i)
            top[alt] = _logaddexp(top[alt], lp) if alt in top else lp
        out.append(PositionLogprobs(token=token_text, logprob=logprob, top=top))
    return out


def _logaddexp(a: float, b: float) -> float:
    import math

    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


class LlamaCppBackend:
    native_json_schema = True

    def __init__(self, config: LlamaCppModel):
        self.config = config
        self._llm: Any = None
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    def _load(self) -> Any:
        """Called with the lock held."""
        if self._llm is not None:
            return self._llm
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}") from None
        path = resolve_gguf(self.config.model)
        start = time.perf_counter()
        threads = self.config.n_threads or default_threads()
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=self.config.n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                chat_format=self.config.effective_chat_format(),
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python reports an unreadable model as ValueError
            raise UserError(f"cannot load GGUF model {path}: {exc}") from None
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s (%s) in %.1f s", self.config.model, path, self.load_seconds)
        return self._llm

    def _complete_sync(self, request: CompletionRequest) -> Completion:
        s = request.sampling
        kwargs: dict[str, Any] = {
            "messages": [m.model_dump() for m in request.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            # llama.cpp reads 0 or less as "until the context is full", and cuts a larger limit to the context itself
            "max_tokens": max(1, s.max_tokens),
            "stop": s.stop or None,
        }
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if request.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}
        recorder = TopLogprobRecorder(s.top_logprobs) if s.top_logprobs is not None else None
        with self._lock:
            llm = self._load()
            # The clock starts once the model holds the lock for this call: waiting for other calls is not generating.
            deadline = Deadline(self.config.timeout_s)
            if recorder is not None:
                kwargs["logits_processor"] = [recorder]
            try:
                response = chat_with_deadline(llm, deadline, **kwargs)
            except ValueError as exc:
                message = str(exc)
                if "context window" in message:
                    raise LLMCallFailure(
                        f"{self.config.model}: the prompt does not fit the context window "
                        f"(n_ctx={self.config.n_ctx}): {message}",
                        kind="prompt_too_long",
                    ) from None
                raise LLMCallFailure(f"{self.config.model}: {message}") from None
            except RuntimeError as exc:  # llama_decode failures surface as RuntimeError
                raise LLMCallFailure(f"{self.config.model}: generation failed: {exc}") from None
            if deadline.fired:
                where = f"after {deadline.tokens} tokens" if deadline.tokens else "while it read the prompt"
                raise LLMCallFailure(
                    f"{self.config.model}: the call ran past timeout_s={self.config.timeout_s:g} s {where} (max_tokens "
                    f"{kwargs['max_tokens']}); raise timeout_s, lower max_tokens, or free CPU cores",
                    kind="timeout",
                )
            choice = response["choices"][0]
            text = choice["message"].get("content") or ""
            logprobs = None
            if recorder is not None:
                logprobs = recorded_positions(
                    recorder,
                    text,
                    lambda t: llm.detokenize([t]).decode("utf-8", errors="replace"),
                    lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=False),
                )
        usage = response.get("usage") or {}
        return Completion(
            text=text,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason"),
            logprobs=logprobs,
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        return await asyncio.to_thread(self._complete_sync, request)

    def _close(self) -> None:
        with self._lock:  # waits for a call in progress
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)
