"""`datatailor run`, `datatailor validate`, `datatailor export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from datatailor.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("validate")(validate)
    app.command("export")(export)


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out: str = typer.Option(..., "--out", "-o", help="Run directory, or an object-store URL (s3://bucket/run, gs://, abfs://; "
                            "pip install 'datatailor[cloud]'). Re-running with the same --out resumes."),
    force: bool = typer.Option(False, "--force", help="Discard an existing run of a different recipe in --out."),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="Override the recipe's budget.max_usd."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Override the recipe's budget.max_tokens."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show live progress on stderr."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the request cache: every call goes to the model."),
    field: Optional[list[str]] = typer.Option(
        None, "--field", metavar="TARGET=COLUMN", help="Map a column of the input: TARGET=COLUMN (targets instruction, input, response, category, id); "
        "repeatable; overrides/extends the recipe's input.fields."
    ),
    executor: str = typer.Option("local", "--executor", help="local: every stage in this process; ray: spread map stages "
                                 "(and dedup's signatures) over a Ray cluster (pip install 'datatailor[ray]')."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: the cluster's HOST:PORT (default: RAY_ADDRESS, else a local Ray)."),
    workers: int = typer.Option(2, "--workers", min=1, help="ray: actors per distributed stage."),
    shard_size: int = typer.Option(128, "--shard-size", min=1, help="ray: records per task."),
    stall_timeout: float = typer.Option(600.0, "--stall-timeout", min=1.0, help="ray: stop as interrupted (resumable) "
                                        "when no worker made progress for this many seconds."),
    flush_records: int = typer.Option(256, "--flush-records", min=1, help="ray with --out in an object store: a worker "
                                      "uploads its results every this many records (or --flush-seconds)."),
    flush_seconds: float = typer.Option(5.0, "--flush-seconds", min=0.1, help="ray with --out in an object store: … or "
                                        "every this many seconds; a node lost loses at most that much work."),
    batch: bool = typer.Option(False, "--batch", help="Send every role that can through the provider's batch API "
                               "(about half the price, results within 24 h; see docs/batch.md)."),
) -> int:
    """Run a recipe. Prints where the data went, what it cost, and where each stage's report is.

    Exit 0 when complete; 4 when every stage finished but fewer pairs than asked were delivered (the
    message names the stage, how many of how many, and why); 3 when the budget ran out (raise it and
    re-run to continue); 2 when the recipe cannot work, or a server or input problem, or a stage that
    failed the same way for its first records stopped the run; 130 on Ctrl-C (re-run to resume).
    """
    from datatailor.io import parse_field_options
    from datatailor.llm.config import batched_roles
    from datatailor.llm.usage import Budget
    from datatailor.recipe import load_recipe
    from datatailor.runner import run_recipe_sync

    fields = parse_field_options(field)
    r = load_recipe(recipe)
    if fields:
        if r.input is None:
            raise UserError(f"--field: {recipe} has no `input` to map columns of")
        r.input = r.input.model_copy(update={"fields": {**r.input.fields, **fields}})
        if r.input.format is not None and "instruction" in r.input.fields:
            raise UserError(f"--field instruction=...: {recipe} sets input.format {r.input.format!r}; give one or the other")
    if budget_usd is not None or budget_tokens is not None:
        b = r.budget or Budget()
        r.budget = Budget(
            max_usd=budget_usd if budget_usd is not None else b.max_usd,
            max_tokens=budget_tokens if budget_tokens is not None else b.max_tokens,
        )
    if no_cache:
        r.cache = False
    if batch:
        from datatailor.llm.config import force_batch

        r.models, switched, online = force_batch(dict(r.models))
        if not switched:
            raise UserError(f"--batch: no role of {recipe} can use a batch API ({'; '.join(f'{k}: {v}' for k, v in online.items()) or 'no models'})")
        typer.echo(f"batch: {', '.join(switched)} through the batch API" + "".join(f"; {k} stays online: {v}" for k, v in online.items()), err=True)
    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor!r}: use local or ray")
    if executor == "ray" and (batched := batched_roles(r.models)):
        raise UserError(f"batched role(s) {', '.join(batched)} need the local executor (their batches are driven from one process); "
                        "drop --executor ray, or set batch: false")
    if executor == "local" and address is not None:
        raise UserError("--address is for --executor ray")
    runner_executor = None
    if executor == "ray":
        from datatailor.executors import RaySettings, ray_executor

        runner_executor = ray_executor(RaySettings(address=address, workers=workers, shard_size=shard_size, stall_timeout_s=stall_timeout,
                                                   flush_records=flush_records, flush_s=flush_seconds))
        runner_executor.start()  # a missing extra or an unreachable cluster fails here, before anything is touched
    from datatailor.storage import check_url, is_url

    remote = is_url(out)
    location = check_url(out.rstrip("/")) if remote else Path(out)
    result = run_recipe_sync(r, location, force=force, show_progress=progress, executor=runner_executor)
    summary = (f"{result.status}: {result.records} records in {location}/data.jsonl, {result.failures} in failures.jsonl | "
               f"{spend_summary(result.usage)}")
    if result.status in ("complete", "shortfall"):
        typer.echo(summary)
        if not remote:
            for report in sorted([*location.glob("stages/*/*.html"), *location.glob("reports/*.html")]):  # type: ignore[union-attr]
                typer.echo(f"report: {report}")
    else:
        typer.echo(spend_summary(result.usage), err=True)
    if result.status == "complete":
        return 0
    if result.status == "shortfall":
        typer.secho(f"shortfall: {result.message}", err=True, fg="yellow")
        return 4
    typer.secho(f"{result.status}: {result.message}", err=True, fg="yellow")
    typer.echo(f"checkpoints kept in {out}; re-run the same command to continue", err=True)
    return 3 if result.status == "budget_exhausted" else 2


def spend_summary(usage: dict) -> str:
    """What this invocation asked for, and the run's total over every invocation (with the requests a killed
    process left in flight, whose outcome nobody recorded)."""

    def line(section: dict) -> str:
        a = section.get("all", {})
        return (f"{a.get('requests', 0)} requests, {a.get('cache_hits', 0)} cache hits, "
                f"{a.get('prompt_tokens', 0) + a.get('completion_tokens', 0)} tokens, ${a.get('cost_usd', 0.0):.4f}")

    run, total = usage.get("run", {}), usage.get("total", {})
    text = f"this run: {line(run)}"
    if total and total.get("all") != run.get("all"):
        text += f" | run total: {line(total)}"
    lost = int(total.get("unaccounted_requests", 0) or 0)
    if lost:
        text += (f" | up to {lost} more request(s) were in flight when a process was killed: not in these figures "
                 "(the server may have answered them)")
    return text


def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")) -> int:
    """Check a recipe without spending anything: fields, roles, templates, input file, keys, local models."""
    from datatailor.validate import validate_recipe

    report = validate_recipe(recipe)
    for line in report.lines:
        typer.echo(line)
    if report.problems:
        for problem in report.problems:
            typer.secho(f"problem: {problem}", err=True, fg="red")
        raise UserError(f"{recipe}: {len(report.problems)} problem(s) found")
    typer.secho("ok: the recipe is valid", fg="green")
    return 0


def export(
    source: Path = typer.Argument(..., help="A run directory or a dataset file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.jsonl, .json or .parquet)."),
    format: str = typer.Option("alpaca", "--format", "-f", help="alpaca | sharegpt | openai | datatailor"),
    decontaminate: Optional[str] = typer.Option(
        None, "--decontaminate", help="Drop pairs overlapping these test sets (comma-separated: vicuna80,selfinstruct252,mtbench,coachlm150, alpacaeval:PATH or a path)."
    ),
    decontam_n: int = typer.Option(13, "--decontam-n", min=1, help="Word n-gram length of the overlap check."),
    decontam_report: Optional[Path] = typer.Option(None, "--decontam-report", help="Where the dropped pairs are listed (default: OUT with suffix .decontam.json)."),
    drop_flagged: bool = typer.Option(False, "--drop-flagged", help="Leave out the records flagged bad with `datatailor view` (the run's flags.jsonl)."),
) -> int:
    """Export a run's data (or any dataset datatailor can read) to a training format."""
    from datatailor.io import export_records, read_records

    path = source / "data.jsonl" if source.is_dir() and (source / "data.jsonl").exists() else source
    if source.is_dir() and (source / "manifest.json").exists() and not (source / "data.jsonl").exists():
        raise UserError(f"{source}: the run is not complete yet (no data.jsonl); re-run it first")
    records = read_records(path)
    if drop_flagged:
        from datatailor.stages.flags import without_flagged

        records, note = without_flagged(records, source)
        typer.echo(note)
    if decontaminate:
        from datatailor.evaluate.decontam import DecontamSettings
        from datatailor.evaluate.decontam import decontaminate as drop_overlaps
        from datatailor.io import write_json

        names = [n.strip() for n in decontaminate.split(",") if n.strip()]
        records, report = drop_overlaps(records, names, DecontamSettings(n=decontam_n))
        report_path = decontam_report or out.with_suffix(".decontam.json")
        write_json(report_path, report)
        typer.echo(f"decontamination: dropped {len(report['dropped'])} of {report['records']} pairs overlapping {', '.join(names)}; report in {report_path}")
    n = export_records(records, out, format)
    typer.echo(f"wrote {n} records to {out} ({format})")
    return 0
