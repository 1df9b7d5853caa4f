"""The documentation: the committed reference docs match the code (regenerate with `datatailor docs --out docs`), the
Python API page documents every public name, and the site's build hook turns links to repository files into paths."""

from __future__ import annotations

import pytest
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
              *(REPO / "docs").rglob("*.md"), REPO / "README.md", REPO / "mkdocs.yml"]
    offenders = [str(p.relative_to(REPO)) for p in places if p.is_file() and "methods.md" in p.read_text(encoding="utf-8", errors="ignore")]
    assert offenders == []


def test_the_python_api_page_documents_every_public_name() -> None:
    import datatailor

    page = (REPO / "docs" / "python-api.md").read_text(encoding="utf-8")
    undocumented = [name for name in datatailor.__all__ if not name.startswith("_") and f"`dt.{name}" not in page]
    assert undocumented == []


def test_every_docs_page_is_in_the_site_navigation() -> None:
    """`mkdocs build --strict` refuses a page left out of the nav; this says which, without building the site."""
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(entry: object) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [p for item in entry for p in pages(item)]
        if isinstance(entry, dict):
            return [p for value in entry.values() for p in pages(value)]
        return []

    nav = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md") if "_hooks" not in p.parts}
    assert on_disk - nav == set(), "add these pages to the nav in mkdocs.yml"
    generated = {"benchmarks/README.md", "benchmarks/RESULTS.md"}  # added by the build hook
    assert nav - on_disk - generated == set(), "the nav names pages that do not exist"


def test_benchmark_pages_keep_page_links_and_turn_file_links_into_paths() -> None:
    hook = _load_hook()
    pages = {"benchmarks/README.md", "benchmarks/RESULTS.md", "index.md"}
    text = ("see [RESULTS.md](RESULTS.md), [the docs](../docs/index.md#top), [`bench_scale.py`](bench_scale.py), "
            "[the README](../README.md), [web](https://example.org/x.md) and [a section](#figures)")
    out = hook.repo_links_as_paths(text, "benchmarks/README.md", pages)
    assert "[RESULTS.md](RESULTS.md)" in out and "[web](https://example.org/x.md)" in out and "[a section](#figures)" in out
    assert "`bench_scale.py` (`benchmarks/bench_scale.py`)" in out and "the README (`README.md`)" in out
    assert "](bench_scale.py)" not in out and "](../README.md)" not in out
    assert hook.stale_references() == []


def _load_hook():
    import importlib.util

    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("docs_hook", REPO / "docs" / "_hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
