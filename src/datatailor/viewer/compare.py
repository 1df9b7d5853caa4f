"""Two runs side by side: the same record id in both (e.g. before and after a recipe change), and the kept
records' distributions — response length, quality, distinct-2 per response — overlaid, with corpus distinct-n on
a sample. Everything is read from the two runs' indexes and files; nothing is loaded whole."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatailor.viewer.evidence import Segment, word_diff
from datatailor.viewer.index import FAILED, RunIndex, read_rows

LENGTH_EDGES = (0, 10, 25, 50, 100, 200, 400, 800, 1600)  # response words; the last bin is open
D2_BINS = 10
SAMPLE = 5_000  # records whose texts are read for corpus distinct-n (picked by id hash: the same ids in both runs)
PER_PAGE = 25


@dataclass
class Histogram:
    labels: list[str]
    series: list[tuple[str, list[float | None]]]  # (run, share of its kept records in each bin)
    counts: dict[str, int]  # run -> records counted


def _kept(alias: str = "") -> str:
    return f"{alias}status != '{FAILED}'"


def _length_bins(conn: sqlite3.Connection) -> tuple[list[int], int]:
    counts = [0] * len(LENGTH_EDGES)
    total = 0
    for rlen, n in conn.execute(f"SELECT rlen, count(*) FROM rows WHERE {_kept()} GROUP BY rlen"):
        i = max(k for k, edge in enumerate(LENGTH_EDGES) if rlen >= edge)
        counts[i] += n
        total += n
    return counts, total


def _shares(counts: list[int], total: int) -> list[float | None]:
    return [c / total if total else None for c in counts]


def length_histogram(runs: dict[str, RunIndex]) -> Histogram:
    labels = [f"{a}–{b - 1}" for a, b in zip(LENGTH_EDGES, LENGTH_EDGES[1:])] + [f"{LENGTH_EDGES[-1]}+"]
    series, totals = [], {}
    for name, index in runs.items():
        conn = index.connect()
        try:
            counts, total = _length_bins(conn)
        finally:
            conn.close()
        series.append((name, _shares(counts, total)))
        totals[name] = total
    return Histogram(labels, series, totals)


def quality_histogram(runs: dict[str, RunIndex]) -> Histogram:
    """Shares of kept records by quality score (rounded down to a half point); records without a score are not counted."""
    per_run: dict[str, dict[float, int]] = {}
    for name, index in runs.items():
        conn = index.connect()
        try:
            per_run[name] = {q: n for q, n in conn.execute(
                f"SELECT floor(quality * 2) / 2.0 AS q, count(*) FROM rows WHERE {_kept()} AND quality IS NOT NULL GROUP BY q")}
        except sqlite3.OperationalError:  # an SQLite without floor(): round down in Python
            per_run[name] = {}
            for q, n in conn.execute(f"SELECT quality, count(*) FROM rows WHERE {_kept()} AND quality IS NOT NULL GROUP BY quality"):
                key = int(q * 2) / 2.0
                per_run[name][key] = per_run[name].get(key, 0) + n
        finally:
            conn.close()
    keys = sorted({q for counts in per_run.values() for q in counts})
    series = [(name, _shares([counts.get(q, 0) for q in keys], sum(counts.values()))) for name, counts in per_run.items()]
    return Histogram([f"{q:g}" for q in keys], series, {name: sum(c.values()) for name, c in per_run.items()})


def distinct2_histogram(runs: dict[str, RunIndex]) -> Histogram:
    """Shares of kept records by their response's distinct-2 (unique / all word bigrams, in tenths)."""
    labels = [f"{i / D2_BINS:.1f}–{(i + 1) / D2_BINS:.1f}" for i in range(D2_BINS)]
    series, totals = [], {}
    for name, index in runs.items():
        conn = index.connect()
        try:
            counts = [0] * D2_BINS
            for bucket, n in conn.execute(f"SELECT min(CAST(d2 * {D2_BINS} AS INTEGER), {D2_BINS - 1}), count(*) FROM rows "
                                          f"WHERE {_kept()} AND d2 IS NOT NULL GROUP BY 1"):
                counts[int(bucket)] += n
        finally:
            conn.close()
        series.append((name, _shares(counts, sum(counts))))
        totals[name] = sum(counts)
    return Histogram(labels, series, totals)


def corpus_distinct(index: RunIndex, sample: int = SAMPLE) -> dict[str, Any]:
    """distinct-1/2 of instructions and responses over at most `sample` kept records (the lowest id hashes)."""
    from datatailor.evaluate.diversity import distinct_n  # only the compare page needs it (and its imports)

    conn = index.connect()
    try:
        picked = conn.execute(f"SELECT file, offset, item FROM rows WHERE {_kept()} ORDER BY h LIMIT ?", (sample,)).fetchall()
        total = conn.execute(f"SELECT count(*) FROM rows WHERE {_kept()}").fetchone()[0]
        paths = index.file_paths(conn)
    finally:
        conn.close()
    records = [r for r in read_rows(paths, picked) if isinstance(r, dict)]
    instructions = [r.get("instruction") or "" for r in records]
    responses = [r.get("response") or "" for r in records]
    return {"sample": len(records), "of": total,
            "instruction": {n: distinct_n(instructions, n) for n in (1, 2)},
            "response": {n: distinct_n(responses, n) for n in (1, 2)}}


@dataclass
class Pair:
    id: str
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    same_response: bool
    diff: list[Segment]


def common_ids(a: RunIndex, b: RunIndex, page: int, only_different: bool = False) -> tuple[list[Pair], bool]:
    """A page of the ids kept in both runs (in A's order), each with both records; and whether there is a next page.
    With `only_different`, only ids whose response differs (read from the files page by page)."""
    conn = a.connect()
    try:
        conn.execute("ATTACH DATABASE ? AS other", (str(b.path()),))
        query = (f"SELECT x.id, x.file, x.offset, x.item, y.file, y.offset, y.item FROM rows x JOIN other.rows y ON x.id = y.id "
                 f"WHERE {_kept('x.')} AND {_kept('y.')} ORDER BY x.rowid LIMIT ? OFFSET ?")
        paths_a, paths_b = a.file_paths(conn), {f: Path(p) for f, p in conn.execute("SELECT file, path FROM other.files")}
        pairs: list[Pair] = []
        skip = (page - 1) * PER_PAGE
        offset, seen = 0, 0
        while len(pairs) <= PER_PAGE:
            chunk = conn.execute(query, (PER_PAGE * 4, offset)).fetchall()
            if not chunk:
                break
            offset += len(chunk)
            left = read_rows(paths_a, [(r[1], r[2], r[3]) for r in chunk])
            right = read_rows(paths_b, [(r[4], r[5], r[6]) for r in chunk])
            for r, x, y in zip(chunk, left, right):
                pair = _pair(r[0], x, y)
                if only_different and pair.same_response:
                    continue
                seen += 1
                if seen > skip:
                    pairs.append(pair)
            if not only_different and offset >= skip + PER_PAGE + 1:
                break
    finally:
        conn.close()
    return pairs[:PER_PAGE], len(pairs) > PER_PAGE


def _pair(record_id: str, x: dict[str, Any] | None, y: dict[str, Any] | None) -> Pair:
    ra, rb = (x or {}).get("response") or "", (y or {}).get("response") or ""
    return Pair(record_id, x, y, ra == rb, word_diff(ra, rb) if ra != rb else [])


def overlap(a: RunIndex, b: RunIndex) -> dict[str, int]:
    """How many kept ids the runs share, and how many each holds alone."""
    conn = a.connect()
    try:
        conn.execute("ATTACH DATABASE ? AS other", (str(b.path()),))
        both = conn.execute(f"SELECT count(*) FROM rows x WHERE {_kept('x.')} AND EXISTS "
                            f"(SELECT 1 FROM other.rows y WHERE y.id = x.id AND {_kept('y.')})").fetchone()[0]
        kept_a = conn.execute(f"SELECT count(*) FROM rows WHERE {_kept()}").fetchone()[0]
        kept_b = conn.execute(f"SELECT count(*) FROM other.rows WHERE {_kept()}").fetchone()[0]
    finally:
        conn.close()
    return {"both": both, "only_a": kept_a - both, "only_b": kept_b - both}
