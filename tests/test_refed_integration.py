"""`examples/refed.yaml` end to end on the embedded local model, shrunk to one pair for CI time.

Checks what must hold whatever the 0.5B teacher writes: LIMA's multi-turn conversations are failure rows, every
drawn reference's feedback is in its namespace, each kept pair is an improved draft with its lineage, the report
agrees with the data, and re-running the finished recipe makes no model call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from tests.conftest import REPO, SHARED_DATA
from tests.support import read_jsonl

RECIPE = REPO / "examples" / "refed.yaml"


def _small_recipe() -> dict[str, Any]:
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["input"] = str(SHARED_DATA / "lima" / "train.jsonl")
    data["budget_pairs"] = 1
    for stage in data["stages"]:
        if stage["type"] == "refed.synthesize":
            stage["features"] = ["subject_areas"]
        if stage["type"] == "refed.references":
            stage.update(pairs_per_reference=1, top_up_rounds=1)
    return data


@pytest.mark.integration
def test_refed_example_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from datatailor.llm.local_models import check_local_model

    if problem := check_local_model("local:qwen2.5-coder-0.5b-instruct"):
        pytest.skip(problem)
    if not (SHARED_DATA / "lima" / "train.jsonl").is_file():
        pytest.skip("LIMA train is not beside the repository")
    recipe = parse_recipe(_small_recipe(), str(RECIPE), RECIPE.parent)
    out = tmp_path / "run"
    result = run_recipe_sync(recipe, out, show_progress=False)
    assert result.status in ("complete", "shortfall"), result.message
    failures = read_jsonl(out / "failures.jsonl")
    assert sum(1 for f in failures if f["kind"] == "multi_turn") == 30  # LIMA's 30 multi-turn conversations
    with_feedback = read_jsonl(out / "stages" / "01-refed.feedback" / "outputs.jsonl")
    for row in with_feedback:
        (ref,) = row["records"]
        d = ref["metadata"]["refed"]
        assert d["subject_areas"] and d["relevant_skills"] and d["response_feedback"]
    data = read_jsonl(out / "data.jsonl")
    assert len(data) == result.records <= 1
    for pair in data:
        d = pair["metadata"]["refed"]
        assert pair["response"].strip() and d["draft"].strip() and d["analysis"] is not None
        assert [e["stage"] for e in pair["lineage"] if e["stage"].startswith("refed.")][-1] == "refed.improve"
    report = json.loads((out / "reports" / "refed_report.json").read_text())
    assert report["kept_pairs"] == len(data) and report["references"]["rejected"]["multi_turn"] == 30
    assert report["cost"]["feedback_calls"] == 2 * len(with_feedback)
    again = run_recipe_sync(recipe, out, show_progress=False)
    assert again.usage["run"]["all"]["requests"] == 0
