"""Serving the viewer: bind a socket (127.0.0.1 unless the user insists, loudly), print the address, run uvicorn."""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

from datatailor.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def missing_extra() -> str | None:
    """Why the web parts cannot load (None when they can)."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"`datatailor view` needs the view extra ({exc.name} is missing): pip install 'datatailor[view]'"
    return None


def check_host(host: str, allow_remote: bool) -> str | None:
    """A warning to print when binding beyond this machine is allowed; a UserError when it is not."""
    if host in LOOPBACK:
        return None
    if not allow_remote:
        raise UserError(f"--host {host}: the viewer binds 127.0.0.1 only. It has no login: anyone who can reach {host} could read "
                        "every record of the runs and write flags into them. Use an SSH tunnel (ssh -L 8765:127.0.0.1:8765 "
                        "HOST), or add --allow-remote if you really mean to serve it on that address.")
    return (f"WARNING: serving on {host}, beyond this machine, with no login: anyone who can reach it can read every record "
            "of these runs and write flags into them (start it with --no-flags to prevent that). Stop it (Ctrl-C) when done.")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another viewer?); pass --port N, or --port 0 for any free port") from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(folders: list[Path], *, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          index_root: Path | None = None, allow_flags: bool = True, open_browser: bool = False) -> None:
    problem = missing_extra()
    if problem:
        raise UserError(problem)
    import uvicorn

    from datatailor.viewer.app import create_app
    from datatailor.viewer.index import default_index_root
    from datatailor.viewer.registry import Registry

    warning = check_host(host, allow_remote)
    root = index_root or default_index_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot keep the record indexes in {root} ({exc.strerror}); give a writable folder with --index-dir") from None
    registry = Registry(folders, root)
    for entry in registry.top_runs():
        entry.index.start()  # the given runs start indexing now, so their first page is quick
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{actual}/"
    hosts = ["*"] if warning else ["127.0.0.1", "localhost", "[::1]", "::1"]
    app = create_app(registry, allow_flags=allow_flags, allowed_hosts=hosts)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    runs, bakeoffs = len(registry.top_runs()), len(registry.bakeoffs)
    what = ", ".join(p for p in (f"{runs} run(s)" if runs else "", f"{bakeoffs} bake-off(s)" if bakeoffs else "") if p)
    print(f"datatailor view: {what} at {url} ({'read-only' if not allow_flags else 'read-only but for flags.jsonl'}; Ctrl-C to stop)",
          flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        registry.close()
        sock.close()
