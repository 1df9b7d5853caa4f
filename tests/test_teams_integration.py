"""`examples/teams_rl.yaml` end to end on the embedded local model, shrunk to one TRPO update of one episode and
one seed: the policy is checkpointed and logged, generation uses it and the expert answers, and a re-run costs no
model call."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from tests.conftest import REPO
from tests.support import read_jsonl

RECIPE = REPO / "examples" / "teams_rl.yaml"


@pytest.mark.integration
def test_teams_rl_example_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sb3_contrib")
    from datatailor.llm.local_models import check_local_model

    if problem := check_local_model("local:qwen2.5-coder-0.5b-instruct"):
        pytest.skip(problem)
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["input"]["limit"] = 1
    data["budget_pairs"] = 1
    data["stages"][0].update(updates=1, n_envs=1)
    recipe = parse_recipe(data, str(RECIPE), RECIPE.parent)
    out = tmp_path / "run"
    result = run_recipe_sync(recipe, out, show_progress=False)
    assert result.status in ("complete", "shortfall"), result.message
    policy = out / "stages" / "00-teams.train" / "policy"
    assert (policy / "checkpoints" / "update_0001.zip").is_file()
    rows = list(csv.DictReader((policy / "training_log.csv").open()))
    assert len(rows) == 1 and rows[0]["episodes"] == "1"
    for pair in read_jsonl(out / "data.jsonl"):
        ns = pair["metadata"]["teams_rl"]
        assert pair["response"].strip() and len(ns["ops"]) == 6 and ns["ops"][1] == ns["ops"][4] == "breadth"
    usage = json.loads((out / "usage.json").read_text())["total"]["stages"]
    assert usage["teams.train"]["requests"] == 6 * 2  # one episode: 6 rewrites, 6 reviews
    report = json.loads((out / "reports" / "teams_rl_report.json").read_text())
    assert report["training"]["updates"] == 1
    again = run_recipe_sync(recipe, out, show_progress=False)
    assert again.usage["run"]["all"]["requests"] == 0
