"""What every method report shares: a captioned figure, the HTML page around the figures, and writing the three
files (JSON numbers, Markdown summary, HTML page) of a report atomically."""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any, Callable

from datatailor.io import atomic_open, write_json

WARNING_CSS = ".warning{background:#fff3cd;border-left:4px solid #d39e00;padding:.6rem .8rem}\n"
BASE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222;padding:0 1rem}\n"
    "pre{white-space:pre-wrap;background:#f6f6f6;padding:.8rem} figure{margin:1rem 0} "
    "table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem} th,td{border:1px solid #ddd;padding:.25rem .5rem;"
    "text-align:left;vertical-align:top} th{background:#f3f3f3} code{background:#f3f3f3;padding:0 .2rem}\n"
    "figcaption{font-size:.8rem;color:#555}\n"
    + WARNING_CSS
)


def figure(fig_id: str, body: str, caption: str) -> str:
    """A chart (SVG or HTML) in `<figure id=…>` with its caption; the rendering test looks figures up by id."""
    return f'<figure id="{fig_id}">{body}<figcaption>{escape(caption)}</figcaption></figure>'


def warning_banner(text: str, label: str = "Warning") -> str:
    """A warning the reader cannot miss (styled by WARNING_CSS)."""
    return f'<p class="warning" role="alert"><strong>{escape(label)}:</strong> {escape(text)}</p>'


def page(title: str, body: str, css: str = "") -> str:
    """A standalone HTML page: no script, no external resource."""
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>\n'
            f"<style>\n{BASE_CSS}{css}</style></head><body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def _inline(text: str) -> str:
    html = escape(text)
    html = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html)


def html_table(headers: list[str], rows: list[list[str]], cell: Callable[[str], str] = escape) -> str:
    """A plain HTML table; each header and cell is written by `cell` (default: escaped text)."""
    head = "".join(f"<th>{cell(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def markdown_html(markdown: str) -> str:
    """The Markdown the reports write, as HTML: headings, tables, bullet lists, paragraphs, **bold** and `code`.
    Only that subset: the reports' summaries are written by this package, not by users."""
    out: list[str] = []
    blocks = re.split(r"\n\s*\n", markdown.strip())
    for block in blocks:
        lines = block.splitlines()
        if all(line.startswith("|") for line in lines) and len(lines) >= 2:
            out.append(html_table(_cells(lines[0]), [_cells(line) for line in lines[2:]], cell=_inline))
        elif lines[0].startswith("#"):
            level = min(len(lines[0]) - len(lines[0].lstrip("#")) + 1, 4)  # the page's <h1> is the title
            out.append(f"<h{level}>{_inline(lines[0].lstrip('#').strip())}</h{level}>")
            if lines[1:]:
                out.append(markdown_html("\n".join(lines[1:])))
        else:
            out += _text_block(lines)
    return "\n".join(out)


def _text_block(lines: list[str]) -> list[str]:
    """Paragraph lines and bullet items ("- ", continued by indented lines), in their order."""
    out: list[str] = []
    para: list[str] = []
    items: list[str] = []
    for line in lines:
        if line.startswith("- ") or (items and line.startswith("  ")):
            if para:
                out.append(f"<p>{_inline(' '.join(para))}</p>")
                para = []
            if line.startswith("- "):
                items.append(line[2:])
            else:
                items[-1] += " " + line.strip()
        else:
            if items:
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
                items = []
            para.append(line.strip())
    if para:
        out.append(f"<p>{_inline(' '.join(para))}</p>")
    if items:
        out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
    return out


def summary_page(title: str, summary: str, figures: list[str]) -> str:
    """The page of a method report: the Markdown summary (without its title line) as HTML, then the figures."""
    body = summary.split("\n", 1)[1] if summary.startswith("# ") else summary
    return page(title, markdown_html(body) + "\n" + "\n".join(figures))


def write_report_files(folder: Path, stem: str, report: dict[str, Any], markdown: str, html: str) -> None:
    """Write folder/stem.json, .md and .html; each file appears whole or not at all."""
    write_json(folder / f"{stem}.json", report)
    for suffix, text in ((".md", markdown), (".html", html)):
        with atomic_open(folder / f"{stem}{suffix}") as fh:
            fh.write(text)
