"""`datatailor compare`: several runs side by side in one self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def compare(
    runs: List[Path] = typer.Argument(..., help="Run directories (or dataset files) to compare."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Compute the embedding distance (all-MiniLM-L6-v2, CPU)."),
    title: Optional[str] = typer.Option(None, "--title", help="Report title."),
) -> int:
    """Write one HTML page (inline SVG charts, no network) comparing runs: method, size, model calls and $
    (total and per kept pair), quality histogram (after `datatailor rate`), diversity, contamination against
    the shipped test sets, and CRR/WR1/WR2/QS with W/T/L from eval.json files found in RUN_DIR, its
    sub-folders (e.g. `datatailor eval --out RUN_DIR/eval-vicuna80`) or beside it (RUN_DIR-eval*)."""
    from datatailor.report.compare import build_compare_report

    summaries = build_compare_report(list(runs), out, embeddings=embeddings, title=title)
    evals = sum(len(s.evals) for s in summaries)
    typer.echo(f"wrote {out}: {len(summaries)} run(s), {evals} evaluation(s)")
    return 0
