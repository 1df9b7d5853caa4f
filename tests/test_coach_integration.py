"""A tiny coach trained on the CPU: its loss goes down, and the result loads as the `coach` role and revises a
held-out pair (kept or revised, with the reason recorded). Uses the embedded gemma-3-270m (converted once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from datatailor.stages.coach import prepare
from tests.support import read_jsonl


@pytest.mark.integration
def test_a_tiny_coach_learns_and_revises(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datatailor.llm.local_models import check_local_model
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import load_train_config

    if problem := check_local_model("local:gemma-3-270m"):
        pytest.skip(problem)
    prepare("coachlm", tmp_path / "prep", holdout=5, alpha=0.3, direction="ascending")  # short pairs: fast on a CPU
    settings = load_train_config(None, {"preset": "coachlm_coach", "epochs": 3, "batch_size": 2, "lora_r": 8,
                                        "max_length": 384, "threads": 2})
    assert (settings.lora_alpha, settings.learning_rate, settings.lr_scheduler) == (32, 2e-4, "cosine")  # the paper's, kept
    report = train_sft(tmp_path / "prep" / "train.jsonl", "local:gemma-3-270m", tmp_path / "coach", settings, limit=4)
    losses = [p.loss for p in report.loss_curve]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"the coach's loss did not go down: {losses}"

    recipe = parse_recipe({
        "models": {"coach": {**report.use_as, "temperature": 0.0, "max_tokens": 64, "device": "cpu"}},
        "input": {"path": str(tmp_path / "prep" / "heldout.jsonl"), "limit": 1},
        "stages": [{"type": "coach.revise"}],
    }, "coach-revise", tmp_path)
    result = run_recipe_sync(recipe, tmp_path / "revised", show_progress=False)
    assert result.status == "complete" and result.records == 1
    (pair,) = read_jsonl(tmp_path / "revised" / "data.jsonl")
    coach = pair["metadata"]["coach"]
    assert coach["mode"] == "trained" and coach["raw_output"]
    assert coach["revised"] or coach["kept_original"] in ("unparsable", "truncated", "empty_field", "too_short", "too_long",
                                                          "copies_prompt", "unchanged")
    report_json = json.loads((tmp_path / "revised" / "reports" / "coachlm_report.json").read_text())
    assert report_json["pairs"] == 1 and report_json["closeness_to_expert"]["pairs"] == 1
