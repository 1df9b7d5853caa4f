"""`datatailor bakeoff`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("bakeoff")(bakeoff)


def bakeoff(
    config: Path = typer.Argument(..., help="Bake-off config YAML (see examples/bakeoff/local.yaml and openai.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bake-off folder. Running again with the same --out continues."),
    plan: bool = typer.Option(False, "--plan", help="Check everything and print the projected cost; spend nothing."),
    force: bool = typer.Option(False, "--force", help="Reuse --out although it holds a bake-off of another config: a method whose recipe changed starts over, the rest continue."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Live progress of each run on stderr."),
) -> int:
    """Every method at the same budget on the same seeds: data, decontamination, training, judging, one report.

    Splits each test set into seeds (given to the methods) and an evaluation part (only judged); runs each
    method's recipe on the seeds at budget_pairs; drops pairs that overlap the evaluation parts; fine-tunes the
    target on each method's data; judges every tuned target (and the untuned one) against the reference in both
    orders; writes bakeoff_report.{json,md,html}. Exit 0 when done; 2 on a config problem or a stopped step
    (running the same command again continues); 4 when a method delivered fewer pairs than asked (it is in the
    report, marked short).
    """
    from datatailor.bakeoff.config import load_bakeoff
    from datatailor.bakeoff.projection import project, render
    from datatailor.bakeoff.run import prepare, run_bakeoff

    cfg = load_bakeoff(config)
    checked = prepare(cfg, out, force=force)
    typer.echo(render(project(checked)))
    if plan:
        typer.echo("plan only: nothing was run")
        return 0
    report = run_bakeoff(cfg, out, force=force, progress=progress)
    typer.echo((out / "bakeoff_report.md").read_text(encoding="utf-8"))
    typer.echo(f"report: {out / 'bakeoff_report.html'}")
    return 4 if any(m.get("data", {}).get("short") for m in report["methods"].values()) else 0
