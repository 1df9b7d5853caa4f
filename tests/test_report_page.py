"""The reports' Markdown as HTML: tables, lists, paragraphs, bold and code, everything escaped."""

from __future__ import annotations

import json
from pathlib import Path

from datatailor.report.page import markdown_html, summary_page


def test_the_reports_markdown_subset_becomes_html() -> None:
    md = ("# Title\n\nRanking (bootstrap):\n- a **ahead** of b\n- b level with c,\n  continued\n\n"
          "| method | CRR \\| W/T/L | note |\n|---|---|---|\n| a | **50.0** (1/0/1) | `<script>` |\n\nplain\ntext")
    html = markdown_html(md)
    assert html.splitlines() == [
        "<h2>Title</h2>",
        "<p>Ranking (bootstrap):</p>",
        "<ul><li>a <strong>ahead</strong> of b</li><li>b level with c, continued</li></ul>",
        "<table><thead><tr><th>method</th><th>CRR | W/T/L</th><th>note</th></tr></thead><tbody><tr><td>a</td>"
        "<td><strong>50.0</strong> (1/0/1)</td><td><code>&lt;script&gt;</code></td></tr></tbody></table>",
        "<p>plain text</p>",
    ]


def test_the_bakeoff_page_shows_its_tables_as_tables(tmp_path: Path) -> None:
    from datatailor.bakeoff.config import load_bakeoff
    from datatailor.bakeoff.run import run_bakeoff
    from tests.test_bakeoff import world

    run_bakeoff(load_bakeoff(world(tmp_path)), tmp_path / "out", log_stream=None)
    html = (tmp_path / "out" / "bakeoff_report.html").read_text()
    md = (tmp_path / "out" / "bakeoff_report.md").read_text()
    assert "<pre>" not in html and html.count("<table>") == 2
    assert "<tr><td>good</td><td>100.0 (24/0/0)</td><td>100.0 (16/0/0)</td><td><strong>100.0</strong>" in html  # two test sets
    assert "| good | 100.0 (24/0/0)" in md
    # a warning shows once, as a banner, not again in the text
    from datatailor.bakeoff.report import render_html, render_markdown

    report = json.loads((tmp_path / "out" / "bakeoff_report.json").read_text())
    report["warnings"] = ["the <judge> was inconsistent"]
    warned = render_html(report, render_markdown(report))
    assert warned.count("the &lt;judge&gt; was inconsistent") == 1 and 'class="warning"' in warned
    assert summary_page("R", "# R\n\nx", []).count("<h1>") == 1
