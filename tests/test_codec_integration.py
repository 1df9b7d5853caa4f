"""`examples/codec.yaml` end to end on the embedded local models, shrunk to two seeds and two pairs for CI time.

Checks what must hold whatever the small models say: every decoded instruction is kept or dropped with a
reason, kept pairs carry the four raw judge scores and G = mean(strong) − mean(target), the pool file and the
report agree with the data, and re-running the finished recipe costs no model call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from tests.conftest import REPO

RECIPE = REPO / "examples" / "codec.yaml"


def _skip_without_local_models() -> None:
    pytest.importorskip("llama_cpp")
    from datatailor.llm.local_models import check_local_model

    for name in ("local:qwen2.5-coder-0.5b-instruct", "local:gemma-3-270m"):
        if problem := check_local_model(name):
            pytest.skip(problem)


def _small_recipe() -> dict[str, Any]:
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["input"]["path"] = str(RECIPE.parent / data["input"]["path"])
    data["input"]["limit"] = 2
    data["budget_pairs"] = 2
    for stage in data["stages"]:
        if stage["type"] == "codec.augment":
            stage["pool_size"] = 2
        if stage["type"] == "codec.rubrics":
            stage.update(count=2, max_tokens=120)
        if stage["type"] == "codec.decode":
            stage["max_tokens"] = 80
        if stage["type"] == "codec.contrastive":
            # Answers cut at 40 tokens keep CI fast; they are kept, flagged `truncated` in lineage.
            stage.update(max_iterations=2, response_max_tokens=40, keep_truncated=True)
    return data


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.integration
def test_codec_example_end_to_end(tmp_path: Path) -> None:
    _skip_without_local_models()
    recipe = parse_recipe(_small_recipe(), str(RECIPE), RECIPE.parent)
    out = tmp_path / "run"
    result = run_recipe_sync(recipe, out, show_progress=False)
    assert result.status == "complete", result.message

    pool = _rows(out / "stages" / "01-codec.augment" / "metadata.jsonl")
    assert 1 <= len(pool) <= 2 and all(p["seeds"] and p["skills"] for p in pool)
    decoded = [r for row in _rows(out / "stages" / "03-codec.decode" / "outputs.jsonl") for r in row["records"]]
    assert decoded, "the strong model wrote no instruction"
    dropped = [f for f in _rows(out / "failures.jsonl") if f["stage"] == "codec.contrastive"]
    kept = [r for row in _rows(out / "stages" / "04-codec.contrastive" / "outputs.jsonl") for r in row["records"]]
    assert len(kept) + len(dropped) == len(decoded)

    data = _rows(out / "data.jsonl")
    assert len(data) == min(len(kept), 2)
    for pair in data:
        codec = pair["metadata"]["codec"]["contrastive"]
        scores = codec["scores"]
        raw = [scores[order][side] for order in ("strong_shown_first", "target_shown_first") for side in ("strong", "target")]
        assert all(1 <= s <= 10 for s in raw)
        assert codec["G"] == pytest.approx(scores["mean_strong"] - scores["mean_target"])
        assert pair["response"].strip() and pair["response"] == codec[f"{codec['kept']}_response"]
        assert any(e["decision"] == "scored" for e in pair["lineage"])

    report_dir = out / "stages" / "04-codec.contrastive"
    report = json.loads((report_dir / "codec_report.json").read_text())
    assert report["instructions"] == len(decoded) and report["kept"] == len(kept)
    assert report["pool_size"] == len(pool)
    assert (report_dir / "codec_report.md").is_file() and (report_dir / "codec_report.html").is_file()

    again = run_recipe_sync(recipe, out, show_progress=False)
    assert again.status == "complete"
    assert again.usage["run"]["all"]["requests"] == 0
