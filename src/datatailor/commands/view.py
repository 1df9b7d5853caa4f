"""`datatailor view`: look at runs and bake-offs in a browser (a local, read-only web app)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("view")(view)


def view(
    folders: list[Path] = typer.Argument(..., help="Run directories or bake-off folders; give two runs to compare them."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but 127.0.0.1, localhost or ::1 "
                             "is refused unless --allow-remote is given too."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Listen on a --host beyond this machine anyway (there is "
                                      "no login: whoever reaches it reads the runs and can write flags). Prints a warning."),
    flags: bool = typer.Option(True, "--flags/--no-flags", help="Let reviewers flag records (written to RUN_DIR/flags.jsonl); "
                               "--no-flags writes nothing at all."),
    index_dir: Path | None = typer.Option(None, "--index-dir", help="Where the record indexes are kept (default: "
                                             "$DATATAILOR_CACHE_DIR/viewer, else ~/.cache/datatailor/viewer)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the address in the default browser."),
) -> int:
    """Serve a local web app over runs and bake-offs: the run's status, stages, usage and recipe; every record with
    full-text search and filters (stage, method, failure kind, quality, flags); each record's lineage and its
    method's evidence (CodecLM scores in both orders, REFED and CoachLM diffs, the TeaMs-RL operation chain);
    failures grouped by kind; two runs side by side; a bake-off's table and each cell's judged items.

    Large runs are indexed on first open (SQLite, in a cache folder; pages appear while it builds); a run in
    progress is followed as its checkpoints grow. Nothing is written into the folders but flags.jsonl.
    """
    from datatailor.viewer.server import serve

    serve(list(folders), host=host, port=port, allow_remote=allow_remote, index_root=index_dir,
          allow_flags=flags, open_browser=open_browser)
    return 0
