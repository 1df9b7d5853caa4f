"""The committed reference docs match the code (regenerate with `datatailor docs --out docs`)."""

from __future__ import annotations

import typer.main

from datatailor.cli import app
from datatailor.docs import render_cli, render_reference
from datatailor.stages import load_all
from tests.conftest import REPO


def test_reference_docs_are_up_to_date() -> None:
    committed = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    assert committed == render_reference(), "docs/reference.md is stale: run `datatailor docs --out docs`"


def test_cli_docs_are_up_to_date() -> None:
    committed = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render_cli(typer.main.get_command(app)), "docs/cli.md is stale: run `datatailor docs --out docs`"


def test_every_stage_and_field_is_documented() -> None:
    reference = render_reference()
    for type_name, cls in load_all().items():
        assert f"### `type: {type_name}`" in reference
        assert cls.__doc__, f"stage {type_name} has no docstring"
        for field in cls.Config.model_fields:
            if field not in ("type",):
                assert f"| `{field}` |" in reference


def test_user_facing_text_cites_papers_not_internal_notes() -> None:
    """Stage descriptions, prompts, examples and docs cite the papers, never the project's research notes."""
    places = [*(REPO / "src").rglob("*.py"), *(REPO / "src").rglob("*.j2"), *(REPO / "examples").rglob("*.*"),
              *(REPO / "docs").glob("*.md"), REPO / "README.md"]
    offenders = [str(p.relative_to(REPO)) for p in places if p.is_file() and "methods.md" in p.read_text(encoding="utf-8", errors="ignore")]
    assert offenders == []
