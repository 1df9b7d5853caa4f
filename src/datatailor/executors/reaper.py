"""Stops the local Ray a run started when the run's process dies without shutting it down (kill -9, OOM).

`ray.init()` without an address starts Ray's processes (GCS, raylet, dashboard and runtime-env agents, workers)
as children of the run. When the run is killed they outlive it. The executor starts this small watcher in its
own session: it polls the run's pid, and once that is gone, sends SIGTERM and then SIGKILL to every process
whose command line names the Ray session's folder, and to their descendants (Ray's workers rename themselves).

    python -m datatailor.executors.reaper --pid PID --session-dir DIR [--poll 0.5] [--grace 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path


def session_processes(session_dir: str) -> set[int]:
    """Pids whose command line contains `session_dir`, with all their descendants."""
    parent: dict[int, int] = {}
    matched: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if session_dir in cmdline:
            matched.add(int(entry.name))
    found = set(matched)
    while True:
        more = {pid for pid, ppid in parent.items() if ppid in found and pid not in found}
        if not more:
            break
        found |= more
    found.discard(os.getpid())
    return found


def stop(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--grace", type=float, default=3.0)
    args = parser.parse_args(argv)
    while alive(args.pid):
        time.sleep(args.poll)
    pids = session_processes(args.session_dir)
    if not pids:
        return 0
    stop(pids, signal.SIGTERM)
    deadline = time.monotonic() + args.grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    stop(session_processes(args.session_dir) | {p for p in pids if alive(p)}, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
