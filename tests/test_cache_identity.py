"""The request cache never answers for a different model: local weights are identified by content, served models
by name and revision; `--no-cache` bypasses it; truncated replies are recorded and never used as targets."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from datatailor.cli import main
from datatailor.llm.base import Completion, CompletionRequest, Message
from datatailor.llm.cache import RequestCache
from datatailor.llm.config import HFModel, LlamaCppModel, OpenAIModel, ScriptedModel
from datatailor.llm.models import RoleModel
from datatailor.llm.usage import UsageLedger
from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from tests.support import echo_model, questions, read_jsonl, write_rows


def test_a_gguf_file_is_identified_by_its_content(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF weights v1")
    first = LlamaCppModel(model=str(gguf)).identity()
    gguf.write_bytes(b"GGUF weights v1")  # rewritten with the same bytes: the same model
    assert LlamaCppModel(model=str(gguf)).identity() == first
    gguf.write_bytes(b"GGUF weights v2")  # replaced in place under the same name: another model
    assert LlamaCppModel(model=str(gguf)).identity() != first
    local = LlamaCppModel(model="local:qwen2.5-coder-0.5b-instruct").identity()
    assert local["weights"].startswith("1d9614638d18")  # the packaged model's pinned SHA-256


def test_an_hf_folder_and_an_adapter_are_identified_by_their_content(tmp_path: Path) -> None:
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights A")
    before = HFModel(model=str(folder)).identity()
    (folder / "model.safetensors").write_bytes(b"weights B")
    assert HFModel(model=str(folder)).identity() != before
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora 1")
    tuned = HFModel(model="local:gemma-3-270m", adapter=str(adapter)).identity()
    assert tuned != HFModel(model="local:gemma-3-270m").identity()
    # each file's digest is remembered by path, size and mtime (a large GGUF is hashed once)
    index = json.loads((Path(os.environ["DATATAILOR_CACHE_DIR"]) / "fingerprints.json").read_text())
    entry = index[str((adapter / "adapter_model.safetensors").resolve())]
    assert entry["sha256"] == hashlib.sha256(b"lora 1").hexdigest()


def test_served_models_are_told_apart_by_revision() -> None:
    a = OpenAIModel(model="m", base_url="http://127.0.0.1:1/v1", revision="2026-01").identity()
    b = OpenAIModel(model="m", base_url="http://127.0.0.1:1/v1", revision="2026-02").identity()
    assert a != b and a["revision"] == "2026-01"
    assert "revision" not in OpenAIModel(model="m").identity()


class CountingBackend:
    native_json_schema = False

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        return Completion(text=f"answer {self.calls}", prompt_tokens=3, completion_tokens=2, finish_reason="stop")

    async def aclose(self) -> None:
        return None


async def test_retraining_into_the_same_folder_invalidates_the_cache(tmp_path: Path) -> None:
    adapter = tmp_path / "tuned"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"first training")
    cache = RequestCache(tmp_path / "cache.sqlite")
    backend = CountingBackend()
    config = HFModel(model="local:gemma-3-270m", adapter=str(adapter))

    async def ask() -> str:
        role = RoleModel("candidate", config, backend, cache, UsageLedger())  # a new run: identity computed afresh
        return (await role.generate(messages=[Message(role="user", content="Say hi.")], seed_key="k")).text

    assert await ask() == "answer 1"
    assert await ask() == "answer 1" and backend.calls == 1  # same weights: the cache answers
    (adapter / "adapter_model.safetensors").write_bytes(b"second training, same folder")
    assert await ask() == "answer 2" and backend.calls == 2  # retrained: never the old model's answer
    cache.close()


def test_no_cache_flag_makes_every_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"models": {"strong": echo_model()}, "input": str(write_rows(tmp_path / "q.jsonl", questions(3))),
                                  "stages": [{"type": "respond"}]}), encoding="utf-8")
    assert main(["run", str(recipe), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["run", str(recipe), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    usage_b = json.loads((tmp_path / "b" / "usage.json").read_text())["run"]["all"]
    assert (usage_b["requests"], usage_b["cache_hits"]) == (0, 3)  # a second run directory, served by the cache
    assert main(["run", str(recipe), "--out", str(tmp_path / "c"), "--no-progress", "--no-cache"]) == 0
    usage_c = json.loads((tmp_path / "c" / "usage.json").read_text())["run"]["all"]
    assert (usage_c["requests"], usage_c["cache_hits"]) == (3, 0)


# ----------------------------------------------------------------------------- truncation


def long_answer(request: CompletionRequest) -> str:
    if request.template == "codec/decode.j2":
        items = [f"Write a detailed guide about topic number {i} for new readers." for i in range(1, 6)]
        return "\n".join(f"{i}. {t}" for i, t in enumerate(items, 1))
    return "one two three four five six seven eight nine ten eleven twelve"


def test_a_truncated_answer_is_recorded_and_not_a_training_target(tmp_path: Path) -> None:
    model = {"backend": "scripted", "model": "long", "max_tokens": 8, "handler": "tests.test_cache_identity:long_answer"}
    rows = write_rows(tmp_path / "q.jsonl", questions(6))

    def run(stage: dict, name: str):
        recipe = parse_recipe({"models": {"strong": model}, "input": str(rows), "stages": [stage], "systematic_failures": 0}, "t", tmp_path)
        return run_recipe_sync(recipe, tmp_path / name, show_progress=False)

    result = run({"type": "respond"}, "dropped")
    assert result.records == 0
    assert {f["kind"] for f in read_jsonl(tmp_path / "dropped" / "failures.jsonl")} == {"truncated"}
    assert json.loads((tmp_path / "dropped" / "usage.json").read_text())["run"]["all"]["truncated"] == 6
    result = run({"type": "respond", "keep_truncated": True}, "kept")
    kept = read_jsonl(tmp_path / "kept" / "data.jsonl")
    assert len(kept) == 6 and all(r["lineage"][-1]["details"]["truncated"] is True for r in kept)


def test_the_last_item_of_a_cut_off_list_is_dropped(tmp_path: Path) -> None:
    model = {"backend": "scripted", "model": "long", "max_tokens": 30, "handler": "tests.test_cache_identity:long_answer"}
    recipe = parse_recipe({
        "models": {"strong": model},
        "stages": [{"type": "codec.metadata", "entries": [{"use_case": "guides", "skills": ["writing"]}]},
                   {"type": "codec.decode", "instructions_per_entry": 5, "top_up_rounds": 0}],
    }, "t", tmp_path)
    run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    decoded = [r["instruction"] for r in read_jsonl(tmp_path / "out" / "data.jsonl")]
    # 30 words hold items 1–2 whole and item 3 cut mid-sentence: only the two whole ones are kept.
    assert decoded == [f"Write a detailed guide about topic number {i} for new readers." for i in (1, 2)]


def test_scripted_model_identity_includes_its_script() -> None:
    a = ScriptedModel(model="same", rules=[{"match": ".*", "reply": "a"}]).identity()
    b = ScriptedModel(model="same", rules=[{"match": ".*", "reply": "b"}]).identity()
    assert a != b
