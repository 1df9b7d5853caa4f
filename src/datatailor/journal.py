"""Append-only JSONL journals: what the runner's checkpoints and a stage's shared calls are written to.

One row per line, flushed as it is written, so a crash (even `kill -9`) loses at most the row being
written. Reading cuts a torn last line off the file, so the next append starts on a clean line.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator
from typing import Any


def iter_journal_offsets(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, row) for each complete row, read as a stream. A torn last line (killed mid-write) is cut
    off the file once the reading reaches it."""
    if not path.exists():
        return
    good_bytes = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            yield good_bytes, row
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(good_bytes)


def iter_journal(path: Path) -> Iterator[dict[str, Any]]:
    for _, row in iter_journal_offsets(path):
        yield row


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The rows of a journal. A torn last line (killed mid-write) is cut off the file."""
    return list(iter_journal(path))


def append_row(fh: Any, row: dict[str, Any]) -> None:
    """Write one row and flush it to the OS."""
    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    fh.flush()
