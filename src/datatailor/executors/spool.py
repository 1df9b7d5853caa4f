"""A worker's local spool when --out is an object store, and adopting what a killed worker left in it.

A worker appends its results (`stages/NN-name/parts/<writer>.outputs.jsonl`, `.failures.jsonl`) and its spend log
(`usage/<invocation>.<writer>.jsonl`) to files in a folder on its own node, flushed per row, and uploads what
was appended as write-once segments every `flush_records` records or `flush_s` seconds and at the end of each
shard (`storage.JournalPusher`). A worker killed between two uploads leaves the rest in the spool: the next
process of the same run on that machine (a restarted worker, or the driver of the next invocation) uploads it,
so its records are not done again and its spend is not lost. Only a whole node lost takes the unsent rest with
it: at most one flush window of records, done again.

The spool is `$DATATAILOR_SPOOL_DIR` (default: `<system temp>/datatailor-spool`) / a hash of the run's URL.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from datatailor.storage import JournalPusher, RunStore


def spool_dir(location: str) -> Path:
    from datatailor.runner.remote import run_key

    root = os.environ.get("DATATAILOR_SPOOL_DIR") or os.path.join(tempfile.gettempdir(), "datatailor-spool")
    return Path(root) / run_key(location)


def writer_of(name: str) -> str:
    """The writer of a spool file: `<writer>.outputs.jsonl`, `<writer>.failures.jsonl`, `<invocation>.<writer>.jsonl`."""
    stem = name.removesuffix(".jsonl")
    for suffix in (".outputs", ".failures"):
        if stem.endswith(suffix):
            return stem.removesuffix(suffix)
    return stem.split(".", 1)[-1]


def alive(writer: str) -> bool:
    """Whether a writer (host-pid-tag) may still be running: on another host we cannot tell, so yes."""
    try:
        host, pid, _ = writer.rsplit("-", 2)
        pid_n = int(pid)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def adopt_orphans(store: RunStore, location: str, keep: Any = None) -> dict[str, int]:
    """Upload what dead writers of this run left unsent in this machine's spool, then remove it. `keep(row)` is
    called with each output or failure row adopted (a restarted worker skips those records). Returns counts."""
    counts = {"files": 0, "bytes": 0}
    if not store.remote:
        return counts
    folder = spool_dir(location)
    if not folder.exists():
        return counts
    for path in sorted(folder.rglob("*.jsonl")):
        rel = path.relative_to(folder).as_posix()
        if not (rel.startswith("usage/") or "/parts/" in rel) or alive(writer_of(path.name)):
            continue
        try:
            counts["bytes"] += _adopt(store, path, rel, keep)
        except FileNotFoundError:  # another process of the run adopted it first (the same segments: harmless)
            continue
        counts["files"] += 1
    return counts


def _adopt(store: RunStore, path: Path, rel: str, keep: Any) -> int:
    generation, end = store.journal_end(rel)
    st = path.stat()
    sent = 0
    if st.st_size > end:
        sent = JournalPusher(store, path, rel, {"gen": generation, "at": end, "inode": st.st_ino}).push()
    if keep is not None and "/parts/" in rel:
        with path.open("rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    keep(json.loads(line))
                except json.JSONDecodeError:
                    break
    path.unlink()
    return sent
