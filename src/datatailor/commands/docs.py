"""`datatailor stages` and `datatailor docs`: reference documentation from the code."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from datatailor.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("stages")(stages)
    app.command("docs")(docs)


def stages(stage_type: Optional[str] = typer.Argument(None, help="Show one stage's fields.")) -> int:
    """List the stage types a recipe can use, or the fields of one."""
    from datatailor.docs import _doc, contract_lines, fields_table
    from datatailor.stages import load_all
    from datatailor.stages.contract import method_title

    registry = load_all()
    if stage_type is None:
        for name, cls in sorted(registry.items()):
            first = (_doc(cls).splitlines() or [""])[0]
            typer.echo(f"{name:22s} {method_title(cls.method) or 'generic':14s} {first}")
        return 0
    if stage_type not in registry:
        raise UserError(f"unknown stage type {stage_type!r} (known: {', '.join(sorted(registry))})")
    cls = registry[stage_type]
    typer.echo(f"{stage_type}: {_doc(cls)}\n")
    typer.echo("\n".join(contract_lines(cls)) + "\n")
    typer.echo(fields_table(cls.Config))
    return 0


def docs(out: Path = typer.Option(Path("docs"), "--out", help="Folder for reference.md and cli.md.")) -> int:
    """Regenerate docs/reference.md (recipe fields, backends, stages) and docs/cli.md (every command)."""
    import typer.main as typer_main

    from datatailor.cli import app
    from datatailor.docs import render_cli, render_reference
    from datatailor.io import atomic_open

    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "reference.md") as fh:
        fh.write(render_reference())
    with atomic_open(out / "cli.md") as fh:
        fh.write(render_cli(typer_main.get_command(app)))
    typer.echo(f"wrote {out / 'reference.md'} and {out / 'cli.md'}")
    return 0
