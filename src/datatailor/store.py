"""Records on disk, read in order without holding them in memory, and compact sets of record ids.

The runner passes a `RecordSource` from stage to stage instead of a list: iterating it streams the records
from a file in their order, as many times as a stage needs. What the runner keeps in memory per record is a
16-byte digest of its id (`IdSet`, `IdIndex`), so a run of millions of records stays in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from datatailor.journal import iter_journal_offsets
from datatailor.records import Record

DIGEST = np.dtype("S16")
_LEADING_ID = re.compile(r'^\{"id": ("(?:[^"\\]|\\.)*")')


def id_digest(record_id: str) -> bytes:
    """16 bytes that stand for a record id: 120 bits of BLAKE2b (a collision is not a practical concern at
    10^10 ids) and a final 0x01, because numpy's fixed-width bytes drop trailing zero bytes."""
    return hashlib.blake2b(record_id.encode("utf-8"), digest_size=15).digest() + b"\x01"


def record_line(record: Record) -> str:
    """A record as one JSONL line: the bytes data.jsonl and every stage's records.jsonl hold."""
    return json.dumps(record.model_dump(mode="json"), ensure_ascii=False) + "\n"


class IdSet:
    """A set of record ids kept as sorted 16-byte digests (about 16 bytes per id), with a small Python set
    in front for recent additions that is merged in every `merge_every` ids."""

    def __init__(self, ids: Iterable[str] = (), merge_every: int = 65_536):
        self._sorted = np.empty(0, dtype=DIGEST)
        self._recent: set[bytes] = set()
        self._merge_every = merge_every
        for i in ids:
            self.add(i)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, record_id: str) -> bool:
        return self._has(id_digest(record_id))

    def _has(self, d: bytes) -> bool:
        if d in self._recent:
            return True
        pos = int(np.searchsorted(self._sorted, d))
        return pos < len(self._sorted) and self._sorted[pos] == d

    def add(self, record_id: str) -> bool:
        """Add an id; False when it was already there."""
        d = id_digest(record_id)
        if self._has(d):
            return False
        self._recent.add(d)
        if len(self._recent) >= self._merge_every:
            self._merge()
        return True

    def _merge(self) -> None:
        if self._recent:
            fresh = np.array(sorted(self._recent), dtype=DIGEST)
            self._sorted = np.concatenate([self._sorted, fresh])
            self._sorted.sort(kind="stable")
            self._recent = set()


class IdIndex:
    """Where each id's row starts in a journal file: sorted digests and byte offsets, built by one pass."""

    def __init__(self, digests: np.ndarray, offsets: np.ndarray):
        order = np.argsort(digests, kind="stable")
        self.digests = digests[order]
        self.offsets = offsets[order]

    @classmethod
    def of_journal(cls, path: Path, key: str) -> IdIndex:
        """Index the rows of a journal by `row[key]`; a later row for the same id wins (its offset is kept)."""
        digests: list[bytes] = []
        offsets: list[int] = []
        chunks: list[tuple[np.ndarray, np.ndarray]] = []  # in numpy every 64K rows: 24 bytes a row, not ~100
        for offset, row in iter_journal_offsets(path):
            value = row.get(key)
            if isinstance(value, str):
                digests.append(id_digest(value))
                offsets.append(offset)
                if len(digests) >= 65_536:
                    chunks.append((np.array(digests, dtype=DIGEST), np.array(offsets, dtype=np.int64)))
                    digests, offsets = [], []
        chunks.append((np.array(digests, dtype=DIGEST), np.array(offsets, dtype=np.int64)))
        d = np.concatenate([c[0] for c in chunks])
        o = np.concatenate([c[1] for c in chunks])
        # keep the last row per id: reverse, stable-unique, so the first seen in reverse is the last written
        if len(d):
            rev_d, rev_o = d[::-1], o[::-1]
            _, first = np.unique(rev_d, return_index=True)
            d, o = rev_d[first], rev_o[first]
        return cls(d, o)

    def offset(self, record_id: str) -> int | None:
        d = id_digest(record_id)
        pos = int(np.searchsorted(self.digests, d))
        if pos < len(self.digests) and self.digests[pos] == d:
            return int(self.offsets[pos])
        return None

    def __len__(self) -> int:
        return len(self.digests)


def read_row_at(fh: Any, offset: int) -> dict[str, Any]:
    fh.seek(offset)
    return json.loads(fh.readline())


class RecordSource:
    """An ordered, re-iterable sequence of records of known length."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        raise NotImplementedError

    def ids(self) -> Iterator[str]:
        for r in self:
            yield r.id

    def load(self) -> list[Record]:
        """Every record in memory: for the whole-set stages that need it (small by nature: LLM-heavy ones)."""
        return list(self)

    def digest(self) -> str:
        """Identity of the sequence's ids in order (equal to `stable_hash([ids])`, computed as a stream)."""
        h = hashlib.sha256(b"[[")
        for n, i in enumerate(self.ids()):
            h.update((b"," if n else b"") + json.dumps(i, ensure_ascii=False).encode("utf-8"))
        h.update(b"]]")
        return h.hexdigest()[:16]


class ListSource(RecordSource):
    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def load(self) -> list[Record]:
        return list(self.records)


class JsonlSource(RecordSource):
    """Records stored one per line (records.jsonl, data.jsonl)."""

    def __init__(self, path: Path, count: int | None = None, digest: str | None = None):
        self.path = path
        self._count = count
        self._digest = digest

    def __len__(self) -> int:
        if self._count is None:
            with self.path.open("rb") as fh:
                self._count = sum(1 for _ in fh)
        return self._count

    def __iter__(self) -> Iterator[Record]:
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                yield Record.model_validate_json(line)

    def ids(self) -> Iterator[str]:
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                # a record line starts with its id (`record_line`): read just that, not the whole record
                m = _LEADING_ID.match(line)
                yield json.loads(m.group(1)) if m else json.loads(line)["id"]

    def digest(self) -> str:
        if self._digest is None:
            self._digest = super().digest()
        return self._digest


class StreamSource(RecordSource):
    """Records from a function that yields them afresh each time (the recipe's input file)."""

    def __init__(self, open_stream: Callable[[], Iterator[Record]]):
        self._open = open_stream
        self._count: int | None = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._open())
        return self._count

    def __iter__(self) -> Iterator[Record]:
        n = 0
        for r in self._open():
            n += 1
            yield r
        self._count = n


class RecordWriter:
    """Writes records.jsonl-style files atomically (temp file, fsync, rename), checking that ids are unique."""

    def __init__(self, path: Path, where: str):
        self.path = path
        self.where = where
        self.count = 0
        self._ids = hashlib.sha256(b"[[")  # the digest of the ids written, as RecordSource.digest computes it
        self._seen = IdSet()
        self._tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._tmp.open("w", encoding="utf-8")

    def write(self, record: Record) -> None:
        if not self._seen.add(record.id):
            self._fh.close()
            self._tmp.unlink(missing_ok=True)
            raise RuntimeError(f"duplicate record id {record.id} in {self.where}; a stage must give derived records distinct ids")
        self._fh.write(record_line(record))
        self._add_id(record.id)

    def write_line(self, record_id: str, line: str) -> None:
        """A record already serialised as `record_line` gives it (no parse, no re-serialisation)."""
        if not self._seen.add(record_id):
            self._fh.close()
            self._tmp.unlink(missing_ok=True)
            raise RuntimeError(f"duplicate record id {record_id} in {self.where}; a stage must give derived records distinct ids")
        self._fh.write(line)
        self._add_id(record_id)

    def _add_id(self, record_id: str) -> None:
        self._ids.update((b"," if self.count else b"") + json.dumps(record_id, ensure_ascii=False).encode("utf-8"))
        self.count += 1

    def close(self) -> JsonlSource:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        self._ids.update(b"]]")
        return JsonlSource(self.path, self.count, self._ids.hexdigest()[:16])

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)
