"""What every method report shares: a captioned figure, the HTML page around the figures, and writing the three
files (JSON numbers, Markdown summary, HTML page) of a report atomically."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from datatailor.io import atomic_open, write_json

BASE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222;padding:0 1rem}\n"
    "pre{white-space:pre-wrap;background:#f6f6f6;padding:.8rem} figure{margin:1rem 0} "
    "figcaption{font-size:.8rem;color:#555}\n"
)


def figure(fig_id: str, body: str, caption: str) -> str:
    """A chart (SVG or HTML) in `<figure id=…>` with its caption; the rendering test looks figures up by id."""
    return f'<figure id="{fig_id}">{body}<figcaption>{escape(caption)}</figcaption></figure>'


def page(title: str, body: str, css: str = "") -> str:
    """A standalone HTML page: no script, no external resource."""
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>\n'
            f"<style>\n{BASE_CSS}{css}</style></head><body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def summary_page(title: str, summary: str, figures: list[str]) -> str:
    """The page of a method report: the Markdown summary as preformatted text, then the figures."""
    return page(title, f"<pre>{escape(summary)}</pre>\n" + "\n".join(figures))


def write_report_files(folder: Path, stem: str, report: dict[str, Any], markdown: str, html: str) -> None:
    """Write folder/stem.json, .md and .html; each file appears whole or not at all."""
    write_json(folder / f"{stem}.json", report)
    for suffix, text in ((".md", markdown), (".html", html)):
        with atomic_open(folder / f"{stem}{suffix}") as fh:
            fh.write(text)
