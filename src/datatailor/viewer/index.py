"""The on-disk index of a run's records: what lets the viewer page, search and filter a run of a million
records without loading it.

One SQLite file per run, in a cache folder (never in the run directory): a `rows` table with what the filters
and charts need of each record (id, stage, methods, failure kind, quality, judge verdict, lengths, distinct-2)
and *where the record is* (file, byte offset, position in the line), and a contentless FTS5 table over the
instruction, input and response. The texts themselves stay in the run's files; a page reads its 50 rows from
there by offset.

Which files are indexed depends on the run:

* a finished run (`complete` or `shortfall`): `data.jsonl` (kept) and `failures.jsonl` (dropped). Each kept
  record's *stage of origin* (the first stage whose outputs hold its id; `input` for an input record that
  passed every stage) is worked out afterwards from the stages' `records.jsonl` ids, 16 bytes a record;
* a run in progress (or stopped): every stage's checkpoints — `outputs.jsonl` as it grows (or `records.jsonl`
  once the stage is complete) and `failures.jsonl` — so the viewer follows a live run.

A background thread builds the index and keeps it current (`RunIndex.start`): each file is read from the byte
where the last pass stopped, complete lines only, committed every few thousand rows with that byte, so pages
are served from the first batch on, a stopped build resumes, and a growing journal is extended, not re-read.
A file that was replaced or shortened (a stage's compaction) is indexed again; a finished run whose files
changed, or a run that finished since, gets a fresh index file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

from datatailor.store import DIGEST, JsonlSource, id_digest
from datatailor.errors import UserError
from datatailor.viewer.folders import RunFolder

SCHEMA_VERSION = "1"
FINAL, FAILED, CHECKPOINT = "final", "failed", "checkpoint"
INPUT_STAGE = "input"
# A method's namespace key in record metadata -> the method's key (datatailor.stages.contract.METHODS).
NAMESPACE_METHODS = {"codec": "codec", "refed": "refed", "coach": "coachlm", "teams_rl": "teams_rl",
                     "evol": "evol", "self_instruct": "self_instruct"}
FIRST_BATCH = 2_000  # rows in the first commit of a file: the first page appears quickly
BATCH = 20_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
  file INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, layout TEXT NOT NULL, status TEXT NOT NULL, stage TEXT,
  ino INTEGER NOT NULL, offset INTEGER NOT NULL DEFAULT 0, lines INTEGER NOT NULL DEFAULT 0,
  first_row INTEGER, last_row INTEGER, facets TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS rows(
  rowid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, status TEXT NOT NULL, stage TEXT, methods TEXT NOT NULL,
  kind TEXT, quality REAL, verdict TEXT, ilen INTEGER NOT NULL, rlen INTEGER NOT NULL, d2 REAL, roots INTEGER NOT NULL,
  file INTEGER NOT NULL, offset INTEGER NOT NULL, item INTEGER NOT NULL, h INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rows_id ON rows(id);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(instruction, input, response, content='', detail=none, columnsize=0);
"""

# Where a row's record sits in its line: the line is the record (RECORD), a failure row holding it (FAILURE), or
# a journal row {"src", "records": [...]} holding it at position >= 0.
RECORD, FAILURE = -1, -2


@dataclass(frozen=True)
class Source:
    """One file of the run the index reads."""

    path: Path
    layout: str  # "records": one record a line; "journal": {"src", "records"} rows; "failures": failure rows
    status: str  # FINAL, FAILED or CHECKPOINT
    stage: str | None  # the stage whose checkpoint it is (None: the run's final files)


def plan(run: RunFolder) -> tuple[str, list[Source]]:
    """("final" or "live", the files to index, in order)."""
    if run.final:
        return "final", [Source(run.path / "data.jsonl", "records", FINAL, None),
                         Source(run.path / "failures.jsonl", "failures", FAILED, None)]
    sources: list[Source] = []
    for stage in run.stages():
        if stage.complete:
            sources.append(Source(stage.folder / "records.jsonl", "records", CHECKPOINT, stage.name))
        else:
            sources.append(Source(stage.folder / "outputs.jsonl", "journal", CHECKPOINT, stage.name))
        sources.append(Source(stage.folder / "failures.jsonl", "failures", FAILED, stage.name))
    return "live", sources


def row_columns(record: dict[str, Any], quality_key: str) -> tuple[Any, ...]:
    """(methods, quality, verdict, prompt words, response words, distinct-2 of the response, parents) of a record."""
    metadata = record.get("metadata") or {}
    methods = ",".join(sorted(m for key, m in NAMESPACE_METHODS.items() if key in metadata))
    q = metadata.get(quality_key)
    quality = float(q) if isinstance(q, (int, float)) and not isinstance(q, bool) else None
    judge = metadata.get("judge")
    verdict = judge.get("verdict") if isinstance(judge, dict) else None
    prompt = f"{record.get('instruction') or ''} {record.get('input') or ''}"
    words = (record.get("response") or "").lower().split()  # whitespace words: cheap enough for a million records
    pairs = len(words) - 1
    d2 = len(set(itertools.pairwise(words))) / pairs if pairs > 0 else None
    return methods, quality, verdict, len(prompt.split()), len(words), d2, len(record.get("parents") or [])


def id_hash(record_id: str) -> int:
    """A stable 56-bit number of an id: a sample "by hash" picks the same ids in two runs."""
    return int.from_bytes(id_digest(record_id)[:7], "big")


@dataclass
class IndexState:
    """What a page says about the index while it is built."""

    phase: str = "starting"  # starting, indexing, origins, ready, error
    bytes_done: int = 0
    bytes_total: int = 0
    rows: int = 0
    error: str | None = None
    version: int = 0  # bumped at every commit: caches keyed on it stay correct
    started: float = field(default_factory=time.time)
    ready_at: float | None = None

    @property
    def share(self) -> float:
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else 1.0


def default_index_root() -> Path:
    root = os.environ.get("DATATAILOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "datatailor")
    return Path(root) / "viewer"


class RunIndex:
    """The index of one run directory; `refresh()` brings it up to date, `start()` keeps doing so in a thread."""

    def __init__(self, run_path: Path, root: Path | None = None, poll_s: float = 1.0):
        self.run_path = run_path.resolve()
        key = hashlib.sha256(str(self.run_path).encode("utf-8")).hexdigest()[:16]
        self.folder = (root or default_index_root()) / key
        self.poll_s = poll_s
        self.state = IndexState()
        self.db_path: Path | None = None
        self._write_lock = threading.Lock()  # one refresh at a time
        self._choose_lock = threading.Lock()  # held only while the index file is picked (or created)
        self._lock_fh: Any = None  # the lock file that makes this process the index's builder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"index {self.run_path.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the lock: another viewer may build from here
            self._lock_fh = None

    def wait_rows(self, rows: int, timeout: float) -> None:
        """Block until `rows` rows are indexed, the index is complete, or `timeout` seconds passed: a page asked for
        right after the index started shows a first page's worth instead of an empty table."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.state.phase not in ("ready", "error", "shared") and self.state.rows < rows:
            time.sleep(0.02)

    def wait_ready(self, timeout: float) -> bool:
        """Block until a full pass has finished (True) or `timeout` seconds passed (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.state.phase in ("ready", "error"):
                return self.state.phase == "ready"
            time.sleep(0.02)
        return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # shown on every page of the run; the loop tries again
                self.state.phase, self.state.error = "error", f"{type(exc).__name__}: {exc}"
                print(f"datatailor view: indexing {self.run_path} failed: {self.state.error}", file=sys.stderr)
            self._stop.wait(self.poll_s)

    # -- reading --------------------------------------------------------------------------------------

    def path(self) -> Path:
        """The index file now in use."""
        if self.db_path is None:
            self.refresh_open()
        assert self.db_path is not None
        return self.db_path

    def connect(self) -> sqlite3.Connection:
        """A read-only connection to the current index file (one per request: cheap, and never shared)."""
        conn = sqlite3.connect(self.path(), timeout=10, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        return conn

    def facets(self, conn: sqlite3.Connection) -> dict[str, Counter[str]]:
        """Counts of rows by "status|stage|kind" and by method, summed over the indexed files."""
        by_key: Counter[str] = Counter()
        methods: Counter[str] = Counter()
        for (raw,) in conn.execute("SELECT facets FROM files"):
            data = json.loads(raw)
            by_key.update(data.get("keys", {}))
            methods.update(data.get("methods", {}))
        return {"keys": by_key, "methods": methods}

    def file_paths(self, conn: sqlite3.Connection) -> dict[int, Path]:
        return {f: Path(p) for f, p in conn.execute("SELECT file, path FROM files")}

    def file_lines(self, conn: sqlite3.Connection) -> dict[str, int]:
        """Complete lines read so far of each indexed file (by path): a live stage's progress."""
        return {p: n for p, n in conn.execute("SELECT path, lines FROM files")}

    # -- building -------------------------------------------------------------------------------------

    def refresh_open(self) -> None:
        """Pick the index file to use (an existing one that still fits the run, else a new one)."""
        with self._choose_lock:
            self._choose_db(*self._wanted(), create=self._own())

    def _own(self) -> bool:
        """Whether this process builds the index: the first `datatailor view` of a run does (it holds a lock file in
        the index folder); another one at the same time only reads what the first commits."""
        if self._lock_fh is not None:
            return True
        if fcntl is None:  # no advisory locks here: every viewer builds (the first one to commit wins each batch)
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = (self.folder / "writer.lock").open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._lock_fh = fh
        return True

    def refresh(self) -> None:
        """One pass: open or replace the index file, read what is new in each file, work out origins. Readers are
        never held up by it: they read what is committed."""
        with self._write_lock:
            run = RunFolder.open(self.run_path)
            mode, sources = plan(run)
            identity = self._identity(run, mode, sources)
            owner = self._own()
            with self._choose_lock:
                self._choose_db(mode, identity, create=owner)
            if not owner:
                self.state.phase = "indexing" if self.db_path is None or self._db_identity(self.db_path) != identity else "shared"
                return
            assert self.db_path is not None
            conn = sqlite3.connect(self.db_path, timeout=30)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=OFF")  # a cache: after a machine crash it is rebuilt, see _db_identity
                self._forget_unplanned(conn, sources)
                sizes = [s.path.stat().st_size if s.path.exists() else 0 for s in sources]
                self.state.bytes_total = sum(sizes)
                done_before = {p: o for p, o in conn.execute("SELECT path, offset FROM files")}
                self.state.bytes_done = sum(min(done_before.get(str(s.path), 0), size) for s, size in zip(sources, sizes))
                if self.state.phase in ("starting", "error"):
                    self.state.phase = "indexing"
                quality_key = run.quality_key()
                for source in sources:
                    if self._stop.is_set():
                        return
                    self._ingest(conn, source, quality_key)
                if mode == "final" and self._meta(conn, "origins") != "done":
                    self.state.phase = "origins"
                    self._origins(conn, run)
                if self.state.ready_at is None:
                    self.state.ready_at = time.time()
                self.state.phase, self.state.error = "ready", None
            finally:
                conn.close()

    def _wanted(self) -> tuple[str, str]:
        run = RunFolder.open(self.run_path)
        mode, sources = plan(run)
        return mode, self._identity(run, mode, sources)

    @staticmethod
    def _identity(run: RunFolder, mode: str, sources: list[Source]) -> str:
        """What the index is of: the recipe, the mode and, for a finished run, its final files' identity."""
        parts: list[Any] = [SCHEMA_VERSION, mode, run.manifest.get("recipe_hash")]
        if mode == "final":
            for s in sources:
                st = s.path.stat() if s.path.exists() else None
                parts.append([st.st_ino, st.st_size, st.st_mtime_ns] if st else None)
        return json.dumps(parts)

    def _choose_db(self, mode: str, identity: str, create: bool = True) -> None:
        if self.db_path is not None and self.db_path.exists() and self._db_identity(self.db_path) == identity:
            return
        if not create:  # another viewer builds it: wait (bounded) for the file it makes
            deadline = time.time() + 10
            while time.time() < deadline:
                found = [p for p in self.folder.glob("index-*.sqlite") if self._db_identity(p) == identity]
                if found:
                    self.db_path = max(found, key=lambda p: int(p.stem.split("-")[1]))
                    return
                time.sleep(0.1)
            raise UserError(f"another `datatailor view` of {self.run_path} is building its index in {self.folder}; "
                            "try again in a moment")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run.txt").write_text(f"{self.run_path}\n", encoding="utf-8")
        existing = sorted(self.folder.glob("index-*.sqlite"), key=lambda p: int(p.stem.split("-")[1]))
        for candidate in reversed(existing):
            if self._db_identity(candidate) == identity:  # an index built earlier (perhaps half): carry on with it
                self.db_path = candidate
                conn = sqlite3.connect(candidate)
                try:
                    self.state.rows = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
                finally:
                    conn.close()
                return
        generation = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        path = self.folder / f"index-{generation}.sqlite"
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            if mode == "live":
                conn.execute("CREATE INDEX IF NOT EXISTS rows_file ON rows(file)")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [("identity", identity), ("mode", mode)])
            conn.commit()
        finally:
            conn.close()
        old, self.db_path = existing, path
        self.state = IndexState(phase="indexing")
        for p in old:  # readers that still hold one keep reading it (the inode lives on until they close it)
            for extra in (p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm")):
                extra.unlink(missing_ok=True)

    @staticmethod
    def _db_identity(path: Path) -> str | None:
        try:
            conn = sqlite3.connect(path)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            return None
        return row[0] if row else None

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _forget_unplanned(self, conn: sqlite3.Connection, sources: list[Source]) -> None:
        """Drop the rows of files no longer read (a live stage's journal, once its records.jsonl is written)."""
        planned = {str(s.path) for s in sources}
        for file, path in conn.execute("SELECT file, path FROM files").fetchall():
            if path not in planned:
                self._drop_file(conn, file)
        conn.commit()

    @staticmethod
    def _drop_file(conn: sqlite3.Connection, file: int) -> None:
        # The FTS entries of dropped rows stay (a contentless table cannot delete them) but match no row.
        conn.execute("DELETE FROM rows WHERE file=?", (file,))
        conn.execute("DELETE FROM files WHERE file=?", (file,))

    def _ingest(self, conn: sqlite3.Connection, source: Source, quality_key: str) -> None:
        """Index the complete lines of `source` that are new since the last pass."""
        try:
            st = source.path.stat()
        except FileNotFoundError:
            return
        known = conn.execute("SELECT file, ino, offset, lines, facets FROM files WHERE path=?", (str(source.path),)).fetchone()
        if known is not None and (known[1] != st.st_ino or known[2] > st.st_size):
            self._drop_file(conn, known[0])  # replaced or cut: read it again from the start
            conn.commit()
            self.state.bytes_done -= known[2]
            known = None
        if known is None:
            cur = conn.execute("INSERT INTO files(path, layout, status, stage, ino) VALUES (?, ?, ?, ?, ?)",
                               (str(source.path), source.layout, source.status, source.stage, st.st_ino))
            file, offset, lines, facets = int(cur.lastrowid or 0), 0, 0, {"keys": {}, "methods": {}}
            conn.commit()
        else:
            file, offset, lines, facets = known[0], known[2], known[3], json.loads(known[4])
        if offset >= st.st_size:
            return
        keys, methods = Counter(facets.get("keys", {})), Counter(facets.get("methods", {}))
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='rows'").fetchone()
        next_rowid = (seq[0] if seq else 0) + 1
        rows: list[tuple[Any, ...]] = []
        texts: list[tuple[Any, ...]] = []
        batch = FIRST_BATCH if offset == 0 else BATCH
        with source.path.open("rb") as fh:
            fh.seek(offset)
            for line_offset, line in _complete_lines(fh, offset):
                lines += 1
                for item, record, stage, kind in _records_of(line, source):
                    cols = row_columns(record, quality_key)
                    status = source.status
                    rows.append((next_rowid, str(record.get("id")), status, stage, cols[0], kind, *cols[1:], file, line_offset, item,
                                 id_hash(str(record.get("id")))))
                    texts.append((next_rowid, record.get("instruction") or "", record.get("input") or "", record.get("response") or ""))
                    keys[f"{status}|{stage or ''}|{kind or ''}"] += 1
                    for m in cols[0].split(",") if cols[0] else ():
                        methods[m] += 1
                    next_rowid += 1
                offset = line_offset + len(line)
                if len(rows) >= batch:
                    self._commit(conn, file, offset, lines, keys, methods, rows, texts)
                    rows, texts, batch = [], [], BATCH
                    if self._stop.is_set():
                        return
            self._commit(conn, file, offset, lines, keys, methods, rows, texts)

    def _commit(self, conn: sqlite3.Connection, file: int, offset: int, lines: int, keys: Counter[str],
                methods: Counter[str], rows: list[tuple[Any, ...]], texts: list[tuple[Any, ...]]) -> None:
        before = conn.execute("SELECT offset FROM files WHERE file=?", (file,)).fetchone()[0]
        conn.executemany("INSERT INTO rows(rowid, id, status, stage, methods, kind, quality, verdict, ilen, rlen, d2, roots, "
                         "file, offset, item, h) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO fts(rowid, instruction, input, response) VALUES (?, ?, ?, ?)", texts)
        conn.execute("UPDATE files SET offset=?, lines=?, facets=?, first_row=coalesce(first_row, ?), last_row=coalesce(?, last_row) "
                     "WHERE file=?", (offset, lines, json.dumps({"keys": keys, "methods": methods}),
                                      rows[0][0] if rows else None, rows[-1][0] if rows else None, file))
        conn.commit()
        self.state.bytes_done += offset - before
        self.state.rows += len(rows)
        self.state.version += 1

    def _origins(self, conn: sqlite3.Connection, run: RunFolder) -> None:
        """Each kept record's stage of origin: the first stage whose records.jsonl holds its id (`input` when that is
        the first stage and the record has no parents). Streams ids, keeping 16-byte digests."""
        data = run.path / "data.jsonl"
        row = conn.execute("SELECT file FROM files WHERE path=?", (str(data),)).fetchone()
        if row is None:
            return
        file = row[0]
        rowids = np.fromiter((r for (r,) in conn.execute("SELECT rowid FROM rows WHERE file=? ORDER BY rowid", (file,))), dtype=np.int64)
        digests = _digests(i for (i,) in conn.execute("SELECT id FROM rows WHERE file=? ORDER BY rowid", (file,)))
        origin = np.full(len(digests), -1, dtype=np.int32)
        stages = [s for s in run.stages() if (s.folder / "records.jsonl").is_file()]
        for k, stage in enumerate(stages):
            todo = np.flatnonzero(origin < 0)
            if not len(todo):
                break
            held = np.sort(_digests(JsonlSource(stage.folder / "records.jsonl").ids()))
            if not len(held):
                continue
            pos = np.minimum(np.searchsorted(held, digests[todo]), len(held) - 1)
            origin[todo[held[pos] == digests[todo]]] = k
        names = [s.name for s in stages]
        keys: Counter[str] = Counter()
        for start in range(0, len(rowids), BATCH):
            chunk = [(names[o] if o >= 0 else None, int(r)) for o, r in zip(origin[start:start + BATCH], rowids[start:start + BATCH])]
            conn.executemany("UPDATE rows SET stage=? WHERE rowid=?", chunk)
        if names:  # an input record that every stage passed on (no parents, first held by the first stage)
            conn.execute("UPDATE rows SET stage=? WHERE file=? AND stage=? AND roots=0", (INPUT_STAGE, file, names[0]))
        for stage_name, n in conn.execute("SELECT stage, count(*) FROM rows WHERE file=? GROUP BY stage", (file,)):
            keys[f"{FINAL}|{stage_name or ''}|"] = n
        facets = json.loads(conn.execute("SELECT facets FROM files WHERE file=?", (file,)).fetchone()[0])
        facets["keys"] = keys
        conn.execute("UPDATE files SET facets=? WHERE file=?", (json.dumps(facets), file))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('origins', 'done')")
        conn.commit()
        self.state.version += 1


def _complete_lines(fh: Any, offset: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of each complete line from the file position; stops at a line still being written."""
    for line in fh:
        if not line.endswith(b"\n"):
            return
        yield offset, line
        offset += len(line)


def _records_of(line: bytes, source: Source) -> Iterator[tuple[int, dict[str, Any], str | None, str | None]]:
    """(position, record, stage, failure kind) of each record a line holds. A line that does not parse is skipped
    (the runner cuts a torn last line itself; the viewer never writes into the run)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return
    if not isinstance(row, dict):
        return
    if source.layout == "records":
        yield RECORD, row, source.stage, None
    elif source.layout == "failures":
        record = row.get("record") if isinstance(row.get("record"), dict) else {"id": row.get("id")}
        yield FAILURE, record, str(row.get("stage") or source.stage or ""), str(row.get("kind") or "error")
    elif not str(row.get("src", "")).startswith("__"):  # a map stage's outputs of one input (batch rows wait for records.jsonl)
        for i, record in enumerate(row.get("records") or []):
            if isinstance(record, dict):
                yield i, record, source.stage, None


def _digests(ids: Iterable[str]) -> np.ndarray:
    """The 16-byte digests of `ids`, in order, built in chunks (no Python object per id is kept)."""
    chunks: list[np.ndarray] = []
    buf: list[bytes] = []
    for i in ids:
        buf.append(id_digest(i))
        if len(buf) >= 65_536:
            chunks.append(np.array(buf, dtype=DIGEST))
            buf = []
    chunks.append(np.array(buf, dtype=DIGEST))
    return np.concatenate(chunks)


def read_rows(paths: dict[int, Path], where: list[tuple[int, int, int]]) -> list[dict[str, Any] | None]:
    """The records (or failure rows) at (file, offset, item) positions, opening each file once. A position that no
    longer holds a record (the file was replaced since) gives None."""
    out: list[dict[str, Any] | None] = [None] * len(where)
    by_file: dict[int, list[int]] = {}
    for n, (file, _, _) in enumerate(where):
        by_file.setdefault(file, []).append(n)
    for file, positions in by_file.items():
        path = paths.get(file)
        if path is None:
            continue
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            continue
        with fh:
            for n in positions:
                _, offset, item = where[n]
                fh.seek(offset)
                try:
                    row = json.loads(fh.readline())
                except json.JSONDecodeError:
                    continue
                if item == RECORD or item == FAILURE:
                    out[n] = row
                elif isinstance(row, dict) and item < len(row.get("records") or []):
                    out[n] = row["records"][item]
    return out
