"""The Python API: the README's example runs as written (on a scripted model), and its results convert to
pandas and HF datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import datatailor as dt
from tests.conftest import REPO
from tests.support import echo_model, questions, write_rows


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's ten-line example, with the local model swapped for a scripted one."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- api-example -->")
    code = readme[readme.index("```python", start) + len("```python"): readme.index("```", readme.index("```python", start) + 9)]
    monkeypatch.chdir(REPO)
    original = dt.load_recipe

    def scripted(path):  # the same recipe, answered by a scripted model, written under tmp_path
        recipe = original(path)
        recipe.models = {"strong": dt.recipe_from_dict({"models": {"strong": echo_model()}, "stages": [{"type": "dedup"}]}).models["strong"]}
        return recipe

    monkeypatch.setattr(dt, "load_recipe", scripted)
    code = code.replace('"runs/quickstart"', repr(str(tmp_path / "quickstart")))
    namespace: dict = {}
    exec(compile(code, "README api-example", "exec"), namespace)  # noqa: S102 - the README's own example
    result = namespace["run"]
    assert result.status == "complete" and len(result.records) == 5
    df = namespace["df"]
    assert list(df.columns) == ["id", "instruction", "input", "response", "metadata"] and len(df) == 5


def test_run_resumes_and_converts(tmp_path: Path) -> None:
    data = {
        "models": {"strong": echo_model()},
        "input": str(write_rows(tmp_path / "q.jsonl", questions(4))),
        "stages": [{"type": "respond"}],
    }
    first = dt.run(data, tmp_path / "out")
    assert first.complete and [r.response for r in first.records] == [f"Answer for {i}." for i in range(4)]
    assert first.usage["all"]["requests"] == 4 and first.failures == []
    again = dt.run(data, tmp_path / "out")
    assert again.usage["all"]["requests"] == 0  # resumed: nothing recomputed
    ds = again.to_dataset()
    assert ds.num_rows == 4 and json.loads(ds[0]["metadata"]) == {}
    assert dt.load_run(tmp_path / "out").records == again.records
    with pytest.raises(dt.UserError, match="not a datatailor run directory"):
        dt.load_run(tmp_path)


def test_a_bad_recipe_dict_is_a_user_error() -> None:
    with pytest.raises(dt.UserError, match="stages"):
        dt.recipe_from_dict({"models": {}, "stages": [{"type": "no.such.stage"}]})
