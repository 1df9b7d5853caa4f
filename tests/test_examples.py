"""Every shipped example recipe validates as it is (no model call is made)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datatailor.validate import validate_recipe
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "codec.yaml", "codec_metadata.yaml", "codec_openai.yaml",
            "self_instruct.yaml", "evol_instruct.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    report = validate_recipe(path)
    assert report.problems == [], report.problems
    assert any(line.startswith("stage 0:") for line in report.lines)
