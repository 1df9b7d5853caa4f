"""Every local call is bounded: a token limit always reaches llama.cpp, and a per-call time limit (`timeout_s`) ends a
call that generates too long, in the llamacpp backend (a fake `llama_cpp` that decodes forever unless stopped) and in
the hf backend (a random 2-layer model). Without the guards these tests fail instead of hanging: the fake gives up
after a few seconds on its own."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from datatailor.errors import LLMCallFailure
from datatailor.llm.base import CompletionRequest, Message, Sampling
from datatailor.llm.config import HFModel, LlamaCppModel
from datatailor.llm.llamacpp import Deadline, LlamaCppBackend, default_threads

GIVE_UP_S = 4.0  # the fake's own bound, so a missing guard fails the test instead of hanging it


class EndlessLlama:
    """Decodes one token every few milliseconds until max_tokens — and, like llama.cpp, with no limit at all when
    max_tokens is 0 or less. Like llama-cpp-python, its chat API takes no stopping criteria and generates through
    `create_completion`, which checks them after every token."""

    made: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any):
        EndlessLlama.made.append(kwargs)

    def create_chat_completion(self, *, max_tokens: int | None, **_: Any) -> dict[str, Any]:
        return self.create_completion(prompt="...", max_tokens=max_tokens, stopping_criteria=None)

    def create_completion(self, *, prompt: str, max_tokens: int | None, stopping_criteria: Any) -> dict[str, Any]:
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else None
        start, n, reason = time.monotonic(), 0, "length"
        while limit is None or n < limit:
            if time.monotonic() - start > GIVE_UP_S:
                raise AssertionError(f"the call ran unbounded ({n} tokens, max_tokens={max_tokens})")
            n += 1
            time.sleep(0.002)
            if stopping_criteria is not None and stopping_criteria([1] * n, [0.0, 0.0]):
                reason = "stop"
                break
        return {"choices": [{"message": {"content": "tok " * n}, "finish_reason": reason}],
                "usage": {"prompt_tokens": 3, "completion_tokens": n}}

    def close(self) -> None:
        pass


@pytest.fixture()
def fake_llama(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=EndlessLlama))
    EndlessLlama.made.clear()
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF")
    return model


def request(max_tokens: int) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content="go on forever")], sampling=Sampling(max_tokens=max_tokens))


def test_a_call_that_runs_past_timeout_s_fails_as_timeout(fake_llama: Path) -> None:
    backend = LlamaCppBackend(LlamaCppModel(model=str(fake_llama), timeout_s=0.3))
    start = time.monotonic()
    with pytest.raises(LLMCallFailure, match=r"timeout_s=0.3 s after \d+ tokens") as caught:
        asyncio.run(backend.complete(request(max_tokens=1_000_000)))
    assert caught.value.kind == "timeout"
    assert time.monotonic() - start < 2.0  # stopped at the limit, not when the fake gave up
    # the backend still answers afterwards (the model object is reused, not left broken)
    done = asyncio.run(backend.complete(request(max_tokens=3)))
    assert done.completion_tokens == 3 and done.finish_reason == "length" and len(EndlessLlama.made) == 1
    assert "create_completion" not in vars(backend._llm)  # the per-call deadline does not stay on the model


def test_the_token_limit_always_reaches_llama_cpp(fake_llama: Path) -> None:
    # llama.cpp reads max_tokens <= 0 as "until the context is full": the backend never sends that
    done = asyncio.run(LlamaCppBackend(LlamaCppModel(model=str(fake_llama), timeout_s=30)).complete(request(max_tokens=0)))
    assert done.completion_tokens == 1


def test_threads_default_to_half_the_usable_cpus(fake_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_threads() == 1  # a 2-core machine: one thread (two ran 4-8x slower while the other core was busy)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_threads() == 8
    asyncio.run(LlamaCppBackend(LlamaCppModel(model=str(fake_llama))).complete(request(max_tokens=1)))
    assert EndlessLlama.made[-1]["n_threads"] == EndlessLlama.made[-1]["n_threads_batch"] == 8
    asyncio.run(LlamaCppBackend(LlamaCppModel(model=str(fake_llama), n_threads=3)).complete(request(max_tokens=1)))
    assert EndlessLlama.made[-1]["n_threads"] == 3


def test_the_deadline_counts_from_its_start() -> None:
    now = [100.0]
    deadline = Deadline(2.0, clock=lambda: now[0])
    for t in (100.5, 101.9, 102.0):
        now[0] = t
        assert deadline([1], [0.0]) is False
    now[0] = 102.01
    assert deadline([1], [0.0]) is True and deadline.fired and deadline.tokens == 3


def test_hf_generation_past_timeout_s_fails_as_timeout() -> None:
    pytest.importorskip("transformers")
    from datatailor.llm.hf import HFBackend

    from .train_fixtures import tiny_model_dir

    folder = str(tiny_model_dir())
    unbounded = asyncio.run(HFBackend(HFModel(model=folder, device="cpu", timeout_s=60)).complete(request(max_tokens=40)))
    assert unbounded.completion_tokens == 40 or unbounded.finish_reason == "stop"  # the random model runs to its limit
    with pytest.raises(LLMCallFailure, match="timeout_s") as caught:
        asyncio.run(HFBackend(HFModel(model=folder, device="cpu", timeout_s=1e-6)).complete(request(max_tokens=40)))
    assert caught.value.kind == "timeout"
