"""The llamacpp backend on the embedded Qwen2.5-Coder-0.5B-Instruct model. Tiny generations only."""

from __future__ import annotations

import asyncio
import sys

import pytest
from pydantic import BaseModel

from datatailor.errors import LLMCallFailure, UserError
from datatailor.llm.base import CompletionRequest, Message, Sampling
from datatailor.llm.config import LlamaCppModel
from datatailor.llm.llamacpp import LlamaCppBackend
from datatailor.llm.models import RoleModel
from datatailor.llm.usage import UsageLedger

QWEN = "local:qwen2.5-coder-0.5b-instruct"


def _request(text: str, max_tokens: int = 8, **sampling: object) -> CompletionRequest:
    return CompletionRequest(
        messages=[Message(role="user", content=text)], sampling=Sampling(max_tokens=max_tokens, **sampling)
    )


@pytest.fixture(scope="module")
def config() -> LlamaCppModel:
    return LlamaCppModel(model=QWEN, n_ctx=512, max_tokens=16)


@pytest.fixture(scope="module")
def backend(config: LlamaCppModel) -> LlamaCppBackend:
    b = LlamaCppBackend(config)
    yield b
    asyncio.run(b.aclose())


def test_missing_llama_cpp_module_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    b = LlamaCppBackend(LlamaCppModel(model=QWEN))
    with pytest.raises(UserError, match=r"pip install 'datatailor\[local\]'"):
        asyncio.run(b.complete(_request("hi")))


def test_missing_model_file_is_a_user_error(tmp_path) -> None:
    b = LlamaCppBackend(LlamaCppModel(model=str(tmp_path / "nope.gguf")))
    with pytest.raises(UserError, match="GGUF model file not found"):
        asyncio.run(b.complete(_request("hi")))


@pytest.mark.integration
async def test_completion_counts_tokens_and_respects_max_tokens(backend: LlamaCppBackend) -> None:
    c = await backend.complete(_request("Name one primary colour. Answer with one word.", max_tokens=8, temperature=0.0))
    assert c.text.strip()
    assert 0 < c.completion_tokens <= 8
    assert c.prompt_tokens > 5
    assert c.finish_reason in {"stop", "length"}
    assert backend.load_seconds is not None


@pytest.mark.integration
async def test_same_seed_same_text(backend: LlamaCppBackend) -> None:
    request = _request("Write a word that rhymes with cat.", max_tokens=8, temperature=0.9, seed=7)
    first = await backend.complete(request)
    await backend.complete(_request("Something else entirely.", max_tokens=4, seed=1))
    again = await backend.complete(request)
    assert first.text == again.text


@pytest.mark.integration
async def test_concurrent_requests_share_one_model_and_keep_the_loop_responsive(backend: LlamaCppBackend) -> None:
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    prompts = [f"Give the number {n} in words." for n in range(4)]
    results = await asyncio.gather(*(backend.complete(_request(p, max_tokens=6, temperature=0.0)) for p in prompts))
    done.set()
    await tick_task
    assert len(results) == 4 and all(r.text.strip() and r.completion_tokens > 0 for r in results)
    # The loop ran while the model generated in its worker thread.
    assert ticks > 5
    # Serialised calls on one model give the same answers as one at a time.
    alone = await backend.complete(_request(prompts[2], max_tokens=6, temperature=0.0))
    assert alone.text == results[2].text


class Colour(BaseModel):
    name: str
    is_warm: bool


@pytest.mark.integration
async def test_json_schema_output_parses_through_the_facade(backend: LlamaCppBackend, config: LlamaCppModel) -> None:
    assert backend.native_json_schema
    role = RoleModel("strong", config, backend, cache=None, ledger=UsageLedger())
    ask = "Give the colour red as JSON with its name and whether it is a warm colour."
    gen = await role.generate(messages=[Message(role="user", content=ask)], schema=Colour, temperature=0.0)
    assert isinstance(gen.value, Colour)
    assert gen.value.name
    assert gen.attempts == 1  # the grammar made the first reply valid
    assert gen.completion_tokens > 0


@pytest.mark.integration
async def test_prompt_longer_than_the_context_is_a_record_failure(backend: LlamaCppBackend) -> None:
    with pytest.raises(LLMCallFailure) as info:
        await backend.complete(_request("word " * 800, max_tokens=4))
    assert info.value.kind == "prompt_too_long"
    assert "n_ctx=512" in str(info.value)
    # The model is still usable afterwards.
    assert (await backend.complete(_request("Say yes.", max_tokens=3))).text.strip()


@pytest.mark.integration
async def test_a_real_call_past_timeout_s_fails_and_the_model_still_answers() -> None:
    b = LlamaCppBackend(LlamaCppModel(model=QWEN, n_ctx=512, timeout_s=0.05))
    try:
        with pytest.raises(LLMCallFailure, match="timeout_s=0.05") as caught:
            await b.complete(_request("Count from one to two hundred in words.", max_tokens=400, temperature=0.0))
        assert caught.value.kind == "timeout"
        b.config = b.config.model_copy(update={"timeout_s": 60.0})
        after = await b.complete(_request("Name one primary colour. Answer with one word.", max_tokens=8, temperature=0.0))
        assert after.text.strip() and after.completion_tokens <= 8
    finally:
        await b.aclose()
