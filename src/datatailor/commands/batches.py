"""`datatailor batches RUN_DIR`: a run's provider batches (roles with `batch: true`), and `--cancel`."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import typer

from datatailor.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("batches")(batches)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def batches(
    run_dir: Path = typer.Argument(..., help="A run directory (datatailor run --out)."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel the run's pending batches on the server (asks first). "
                                "Stop the run first: a running run retries what a cancelled batch did not answer."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before cancelling (for scripts)."),
) -> int:
    """List a run's provider batches: id, status, requests answered, when created; --cancel cancels the pending ones.

    Answers a cancelled batch already produced are kept; re-running the run submits what is still missing in new
    batches. Reads the run's batches/journal.jsonl; only --cancel contacts the server (with the key variable the
    recipe named)."""
    from datatailor.llm.batch.journal import JOURNAL, BatchJournal

    folder = run_dir / "batches"
    if not (folder / JOURNAL).exists():
        raise UserError(f"{run_dir}: no batches here (no batches/{JOURNAL}); only roles with `batch: true` (or run --batch) make them")
    journal = BatchJournal(folder, create=False)
    now = time.time()
    typer.echo(f"{'tag':<18} {'batch id':<34} {'status':<11} {'requests':>8} {'done':>6} {'failed':>6}  created (UTC)     age")
    for b in journal.batches.values():
        age = f"{(now - (b.created_at or b.planned_at)) / 60:.0f} min" if b.pending else ""
        typer.echo(f"{b.tag:<18} {b.batch_id or '-':<34} {b.status:<11} {b.requests:>8} {b.counts.get('completed', 0):>6} "
                   f"{b.counts.get('failed', 0):>6}  {_when(b.created_at):<17} {age}")
        typer.echo(f"{'':<18} for " + ", ".join(f"{stage} ({n})" for stage, n in b.stages.items()))
        if b.error or b.dropped:
            typer.echo(f"{'':<18} {b.error or b.dropped}")
    s = journal.summary(now)
    typer.echo(f"{s['submitted']} submitted: {s['in_progress']} in progress, {s['completed']} completed, {s['failed']} failed "
               f"(expired, cancelled or failed); {s['requests_done']} of {s['requests']} requests answered")
    if not cancel:
        return 0
    pending = journal.pending()
    if not pending:
        typer.echo("nothing to cancel: no batch is pending")
        return 0
    n = sum(b.requests for b in pending)
    if not yes and not typer.confirm(f"Cancel {len(pending)} pending batch(es) holding {n} request(s)?", default=False):
        typer.echo("nothing cancelled")
        return 1
    import asyncio

    from datatailor.llm.batch.admin import cancel_batches

    for line in asyncio.run(cancel_batches(journal, pending)):
        typer.echo(line)
    return 0
