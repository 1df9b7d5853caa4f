"""The hf backend on the embedded Gemma-3-270M (GGUF loaded through transformers). Tiny generations only.

The fp32 conversion is cached under the normal model directory, so only the first run on a machine
pays for it (about a minute).
"""

from __future__ import annotations

import asyncio

import pytest

from datatailor.errors import UserError
from datatailor.llm.base import CompletionRequest, Message, Sampling
from datatailor.llm.config import HFModel
from datatailor.llm.hf import HFBackend, _cut_at_stop, converted_dir

GEMMA = "local:gemma-3-270m"
QUESTION = [Message(role="user", content="What is the capital of France?")]


def _request(text: str, max_tokens: int = 8, **sampling: object) -> CompletionRequest:
    return CompletionRequest(
        messages=[Message(role="user", content=text)], sampling=Sampling(max_tokens=max_tokens, **sampling)
    )


def test_stop_strings_cut_the_text() -> None:
    assert _cut_at_stop("one\n### Instruction: two", ["###", "\n\n"]) == ("one\n", True)
    assert _cut_at_stop("plain", ["###"]) == ("plain", False)


def test_not_a_model_directory_is_a_user_error(tmp_path) -> None:
    b = HFBackend(HFModel(model=str(tmp_path)))
    with pytest.raises(UserError, match="not an HF model directory"):
        asyncio.run(b.complete(_request("hi")))


def test_cache_identity_tells_adapters_apart(tmp_path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(b"first")
    base = HFModel(model=GEMMA).identity()
    tuned = HFModel(model=GEMMA, adapter=str(adapter)).identity()
    assert base != tuned
    weights.write_bytes(b"retrained")  # same folder, new weights: another model for the cache
    assert HFModel(model=GEMMA, adapter=str(adapter)).identity() != tuned


def test_bad_adapter_folders_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not a PEFT adapter directory"):
        asyncio.run(HFBackend(HFModel(model=GEMMA, adapter=str(tmp_path))).complete(_request("hi")))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="is a PEFT adapter: set `model` to its base model"):
        asyncio.run(HFBackend(HFModel(model=str(tmp_path))).complete(_request("hi")))


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    b = HFBackend(HFModel(model=GEMMA, batch_size=4, device="cpu"))
    yield b
    asyncio.run(b.aclose())


@pytest.mark.integration
async def test_completion(backend: HFBackend) -> None:
    c = await backend.complete(_request("The capital of France is", max_tokens=6, temperature=0.0))
    assert c.text.strip()
    assert 0 < c.completion_tokens <= 6
    assert c.prompt_tokens > 3
    assert (converted_dir(GEMMA) / "config.json").is_file()  # the conversion was cached


@pytest.mark.integration
async def test_concurrent_requests_run_as_one_batch_with_per_row_limits(backend: HFBackend) -> None:
    before = len(backend.batch_sizes)
    prompts = ["Name a fruit.", "Count from one to ten.", "Write a long sentence about the ocean and its waves.", "Hi"]
    limits = [2, 10, 4, 10]
    results = await asyncio.gather(
        *(backend.complete(_request(p, max_tokens=m, temperature=0.8, seed=i)) for i, (p, m) in enumerate(zip(prompts, limits)))
    )
    assert backend.batch_sizes[before:] == [4]
    for r, m in zip(results, limits):
        assert 0 < r.completion_tokens <= m
    assert results[0].completion_tokens <= 2


@pytest.mark.integration
async def test_a_stop_string_ends_its_row_early(backend: HFBackend) -> None:
    prompt = "Write a sentence about dogs and cats."
    stopped, full = await asyncio.gather(
        backend.complete(_request(prompt, max_tokens=12, temperature=0.0, stop=[" "])),
        backend.complete(_request(prompt, max_tokens=12, temperature=0.0)),
    )
    assert " " in full.text.strip()
    assert stopped.text == full.text[: full.text.index(" ")]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens


@pytest.mark.integration
async def test_a_request_gets_the_same_tokens_alone_and_in_a_batch(backend: HFBackend) -> None:
    target = _request("Tell me about dogs.", max_tokens=8, temperature=0.8, seed=11)
    alone = await backend.complete(target)
    others = [_request("A much longer prompt that forces padding of the shorter rows in the batch.", max_tokens=8, seed=3),
              _request("Cats?", max_tokens=8, seed=4)]
    batched = await asyncio.gather(backend.complete(target), *(backend.complete(o) for o in others))
    assert batched[0].text == alone.text


@pytest.mark.integration
async def test_loglikelihood_scores_each_response_token(backend: HFBackend) -> None:
    likely = await backend.loglikelihood(QUESTION, "The capital of France is Paris.")
    garbage = await backend.loglikelihood(QUESTION, "zebra quantum fork banana seven.")
    tokenizer = backend._tokenizer
    assert len(likely.logprobs) == len(likely.tokens) == len(tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"])
    assert all(lp <= 0.0 for lp in likely.logprobs + garbage.logprobs)
    assert likely.mean_nll < garbage.mean_nll
    assert (await backend.loglikelihood(QUESTION, "")).logprobs == []


@pytest.mark.integration
async def test_loglikelihood_is_causal_and_conditioned_on_the_prompt(backend: HFBackend) -> None:
    full = await backend.loglikelihood(QUESTION, "The capital of France is Paris.")
    prefix = await backend.loglikelihood(QUESTION, "The capital of France")
    # Teacher forcing is causal: the scores of a prefix do not depend on what follows it.
    assert full.tokens[: len(prefix.tokens)] == prefix.tokens
    assert full.logprobs[: len(prefix.logprobs)] == pytest.approx(prefix.logprobs, abs=1e-4)
    # The prompt matters: "Paris." is likelier as the answer about France than about Japan.
    japan = [Message(role="user", content="What is the capital of Japan?")]
    assert (await backend.loglikelihood(QUESTION, "Paris.")).mean_nll < (await backend.loglikelihood(japan, "Paris.")).mean_nll


@pytest.mark.integration
async def test_a_second_backend_loads_the_cached_conversion(backend: HFBackend) -> None:
    first = await backend.loglikelihood(QUESTION, "Paris.")
    other = HFBackend(HFModel(model=GEMMA, device="cpu"))
    try:
        again = await other.loglikelihood(QUESTION, "Paris.")
        assert other.conversion_seconds is None  # loaded from the saved fp32 model, not from the GGUF
        assert again.tokens == first.tokens
        assert again.logprobs == pytest.approx(first.logprobs, abs=1e-4)
    finally:
        await other.aclose()


@pytest.mark.integration
async def test_an_adapter_is_applied_on_top(backend: HFBackend, tmp_path) -> None:
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(str(converted_dir(GEMMA)), dtype=torch.float32)
    torch.manual_seed(0)
    # Random (not zero) LoRA weights, so the adapter visibly changes the model.
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    tuned = HFBackend(HFModel(model=GEMMA, adapter=str(tmp_path / "adapter"), device="cpu"))
    try:
        with_adapter = await tuned.loglikelihood(QUESTION, "Paris.")
    finally:
        await tuned.aclose()
    without = await backend.loglikelihood(QUESTION, "Paris.")
    assert with_adapter.tokens == without.tokens
    assert with_adapter.logprobs != pytest.approx(without.logprobs, abs=1e-3)
