"""The `datatailor` command line: parse, load, call. No logic lives here.

Exit codes: 0 success; 2 a user error (bad file, recipe, key, unreachable server) or a run stopped
by one; 3 the run stopped because its budget is spent (re-run with a larger budget to continue);
130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import sys

import typer

from datatailor.errors import UserError

app = typer.Typer(
    name="datatailor",
    help="Tailor instruction-tuning data to a target task and model (CodecLM, REFED, CoachLM, TeaMs-RL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register_commands() -> None:
    import importlib
    import pkgutil

    from datatailor import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"datatailor.commands.{info.name}")
        module.register(app)


_register_commands()


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """`name` from click and from the copy of click that typer ≥ 0.29 ships and raises from."""
    import importlib

    found: list[type[BaseException]] = []
    for module_name in ("click.exceptions", "typer._click.exceptions", "typer.core"):
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _exception_classes("UsageError")
_ABORTS = _exception_classes("Abort")
_EXITS = _exception_classes("Exit")


def main(argv: list[str] | None = None) -> int:
    try:
        result = app(args=argv, standalone_mode=False)
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        return 2
    except _USAGE_ERRORS as exc:
        exc.show()
        return 2
    except _ABORTS:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        return _interrupted()
    except _EXITS as exc:
        return exc.exit_code
    if result == 130:  # typer turns Ctrl-C into a returned 130 when not in standalone mode
        return _interrupted()
    return result if isinstance(result, int) else 0


def _interrupted() -> int:
    typer.echo("interrupted: checkpoints are kept; re-run the same command to resume", err=True)
    return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
