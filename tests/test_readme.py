"""The README's Python example runs exactly as written, and the recipe it uses is the quickstart's.

The example loads `examples/quickstart_replay.yaml`: the quickstart recipe with its model replaced by a replay of
the answers that model gave (scripted backend), so it runs in about a second with no model to install."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

MARKER = "<!-- api-example -->"


def readme_example() -> str:
    """The code of the ```python block that follows the api-example marker in README.md, as written."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert MARKER in readme, f"README.md lost its {MARKER} marker"
    match = re.compile(r"```python\n(.*?)\n```", re.DOTALL).search(readme, readme.index(MARKER))
    assert match is not None, f"no ```python block after {MARKER} in README.md"
    assert readme[readme.index(MARKER) + len(MARKER):match.start()].strip() == "", "the code block must follow the marker"
    return match.group(1) + "\n"


def run_example(cwd: Path) -> dict:
    namespace: dict = {}
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        exec(compile(readme_example(), str(REPO / "README.md"), "exec"), namespace)  # noqa: S102 - the README's own code
    finally:
        os.chdir(previous)
    return namespace


def test_the_readme_python_example_runs_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the example's relative paths, from a clean folder
    first = run_example(tmp_path)
    run = first["run"]
    assert run.status == "complete" and len(run.records) == 5 and run.failures == []
    assert run.usage["all"]["requests"] == 5 and run.out == Path("runs/quickstart-replay")
    assert (tmp_path / "runs" / "quickstart-replay" / "data.jsonl").is_file()
    # the answers are the recorded model's, not some fallback
    recorded = [json.loads(line)["completion"]["text"] for line in
                (REPO / "examples" / "data" / "quickstart_replay.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r.response for r in run.records) == sorted(text.strip() for text in recorded)
    df = first["df"]
    assert list(df.columns) == ["id", "instruction", "input", "response", "metadata"] and len(df) == 5
    assert capsys.readouterr().out.split() == ["complete", "5", "0", "5"]  # what its print() shows

    again = run_example(tmp_path)["run"]  # "resumes like `datatailor run`": nothing is asked again
    assert again.status == "complete" and again.usage["all"]["requests"] == 0 and again.records == run.records


def test_the_replay_example_is_the_quickstart_with_a_recorded_model() -> None:
    """Everything but the model is the quickstart's, and the replayed model samples as the quickstart's did."""
    live = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text(encoding="utf-8"))
    replay = yaml.safe_load((REPO / "examples" / "quickstart_replay.yaml").read_text(encoding="utf-8"))
    for key in ("seed", "input", "stages", "output"):
        assert replay[key] == live[key], key
    live_model, replay_model = live["models"]["strong"], replay["models"]["strong"]
    assert replay_model["backend"] == "scripted" and replay_model["replay"]
    for key in ("temperature", "top_p", "max_tokens"):
        assert replay_model[key] == live_model[key], key


def test_the_readme_stays_short_and_its_links_resolve() -> None:
    """A newcomer reads it in two minutes; the detail lives in docs/, so every relative link must lead somewhere."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 6 * 1024, "README.md grew past 6 KB: move the detail into docs/"
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+:", t)]
    assert targets, "the README links to no documentation"
    missing = [t for t in targets if t and not (REPO / t).exists()]
    assert missing == []
    for marker in ("<!-- quickstart-command -->", "<!-- test-command -->", "<!-- ray-test-command -->"):
        assert readme.count(marker) == 1, f"{marker} is read by .ci/run: keep it once, followed by its ```bash block"
