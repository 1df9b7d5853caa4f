"""The folders one `datatailor view` serves, by short URL key: the runs given (and, for a bake-off folder, each
method's data run and each evaluation run inside it), with their indexes and review flags."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatailor.errors import UserError
from datatailor.stages.flags import FLAGS_FILE, Flag, append_flag, read_flags
from datatailor.viewer.bakeoff import BakeoffFolder
from datatailor.viewer.folders import RunFolder, folder_kind
from datatailor.viewer.index import RunIndex

FIRST_PAGE_ROWS = 50  # a page's worth: what a request waits for when it finds an index just started
FIRST_PAGE_WAIT_S = 3.0


class FlagBook:
    """A run's review flags: `flags.jsonl` read again whenever it changed on disk, appended to on each click."""

    def __init__(self, run_path: Path):
        self.path = run_path / FLAGS_FILE
        self._stamp: tuple[int, int] | None = None
        self._flags: dict[str, Flag] = {}
        self.error: str | None = None
        self._lock = threading.Lock()

    def current(self) -> dict[str, Flag]:
        with self._lock:
            try:
                st = self.path.stat()
                stamp: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                try:
                    self._flags, self.error = read_flags(self.path), None
                except UserError as exc:  # shown on the run's pages; the flags read so far stay
                    self.error = str(exc)
                self._stamp = stamp
            return dict(self._flags)

    def set(self, record_id: str, flag: str, note: str) -> dict[str, Any]:
        row = append_flag(self.path, record_id, flag, note)
        self.current()
        return row


@dataclass
class RunEntry:
    key: str
    path: Path
    label: str
    index: RunIndex
    flags: FlagBook
    bakeoff: str | None = None  # the key of the bake-off it belongs to

    def folder(self) -> RunFolder:
        return RunFolder.open(self.path)


@dataclass
class BakeoffEntry:
    key: str
    path: Path
    label: str
    folder: BakeoffFolder
    runs: dict[tuple[str, str], str] = field(default_factory=dict)  # (method, testset or "") -> run key


GENERIC_NAMES = ("out", "run", "runs", "output", "data")


def short_label(path: Path) -> str:
    """A folder's name as the pages show it; `parent/name` when the name alone says little (`out`, `run`)."""
    return f"{path.parent.name}/{path.name}" if path.name in GENERIC_NAMES and path.parent.name else path.name


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


class Registry:
    def __init__(self, folders: list[Path], index_root: Path | None = None, poll_s: float = 1.0):
        self.index_root = index_root
        self.poll_s = poll_s
        self.runs: dict[str, RunEntry] = {}
        self.bakeoffs: dict[str, BakeoffEntry] = {}
        self.order: list[tuple[str, str]] = []  # ("run" | "bakeoff", key) as given on the command line
        self._lock = threading.Lock()
        for folder in folders:
            path = folder.resolve()
            kind = folder_kind(path)
            label = short_label(path)
            if kind == "bakeoff":
                key = self._key(path.name)
                entry = BakeoffEntry(key, path, label, BakeoffFolder(path))
                self.bakeoffs[key] = entry
                self.order.append(("bakeoff", key))
                self._add_bakeoff_runs(entry)
            else:
                key = self._add_run(path, label)
                self.order.append(("run", key))

    def _key(self, name: str) -> str:
        base = _slug(name)
        key, n = base, 2
        while key in self.runs or key in self.bakeoffs:
            key, n = f"{base}-{n}", n + 1
        return key

    def _add_run(self, path: Path, label: str, bakeoff: str | None = None, key: str | None = None) -> str:
        key = key or self._key(short_label(path))
        self.runs[key] = RunEntry(key, path, label, RunIndex(path, self.index_root, self.poll_s), FlagBook(path), bakeoff)
        return key

    def _add_bakeoff_runs(self, entry: BakeoffEntry) -> None:
        """Each method's data run and each evaluation run, as runs of their own (indexed when first opened)."""
        for row in entry.folder.rows():
            found = [("", row.run, f"{row.name} (data)")] if row.run is not None else []
            found += [(ts, cell.run, f"{row.name} on {ts}") for ts, cell in row.cells.items() if cell.available]
            for ts, path, what in found:
                if (row.name, ts) not in entry.runs:
                    key = self._key("~".join(filter(None, (entry.key, row.name, ts))))
                    entry.runs[(row.name, ts)] = self._add_run(path, f"{entry.label}: {what}", entry.key, key)

    def refresh_bakeoff(self, entry: BakeoffEntry) -> None:
        """A bake-off still running gains runs: add the ones that appeared since."""
        with self._lock:
            self._add_bakeoff_runs(entry)

    def run(self, key: str) -> RunEntry | None:
        entry = self.runs.get(key)
        if entry is not None:
            entry.index.start()  # indexed from the first time it is asked for
            entry.index.wait_rows(FIRST_PAGE_ROWS, FIRST_PAGE_WAIT_S)
        return entry

    def top_runs(self) -> list[RunEntry]:
        return [self.runs[k] for kind, k in self.order if kind == "run"]

    def close(self) -> None:
        for entry in self.runs.values():
            entry.index.stop()
