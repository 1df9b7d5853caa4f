"""MkDocs hook: the pages that come from elsewhere in the repository.

* `docs/cli.md` and `docs/reference.md` are generated from the code (`datatailor docs --out docs`). The build
  stops when the committed files differ from what the code generates, so the site never shows a stale
  reference (tests/test_docs.py checks the same for the test suite).
* `benchmarks/README.md` and `benchmarks/RESULTS.md` are the single source of the benchmark pages: they are
  added to the site as they are, with links to repository files that are not pages (a script, a data file)
  turned into plain paths, since the site cannot link to them.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
# repository file -> the page it becomes on the site
INCLUDED = {"benchmarks/README.md": "benchmarks/README.md", "benchmarks/RESULTS.md": "benchmarks/RESULTS.md"}
_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")


def stale_references() -> list[str]:
    """The generated reference pages whose committed text differs from what the code generates now."""
    import typer.main

    from datatailor.cli import app
    from datatailor.docs import render_cli, render_reference

    expected = {"reference.md": render_reference(), "cli.md": render_cli(typer.main.get_command(app))}
    return [name for name, text in expected.items()
            if not (REPO / "docs" / name).is_file() or (REPO / "docs" / name).read_text(encoding="utf-8") != text]


def on_config(config: Any) -> Any:
    stale = stale_references()
    if stale:
        raise PluginError(f"docs/{' and docs/'.join(stale)} differ from what the code generates: "
                          "run `datatailor docs --out docs` and commit the result")
    return config


def repo_links_as_paths(markdown: str, source: str, pages: set[str]) -> str:
    """Keep links to other pages and to the web; write a link to any other repository file as its path."""

    def replace(match: re.Match[str]) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(source), target.split("#", 1)[0]))
        if path in pages:
            return match.group(0)
        return text if text.strip("`") == path else f"{text} (`{path}`)"

    return _LINK.sub(replace, markdown)


def on_files(files: Files, config: Any) -> Files:
    pages = set(INCLUDED.values()) | {f.src_uri for f in files if f.src_uri.endswith(".md")}
    for source, page in INCLUDED.items():
        path = REPO / source
        if not path.is_file():
            raise PluginError(f"{source} is missing: the benchmark pages are built from it")
        content = repo_links_as_paths(path.read_text(encoding="utf-8"), source, pages)
        files.append(File.generated(config, page, content=content))
    return files
