"""The records table: filters and full-text search turned into one SQL query over the index, a page of rows read
back from the run's files, and bounded counts (a count never scans more than `COUNT_CAP` rows)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlencode

from datatailor.stages.flags import VERDICTS, Flag
from datatailor.viewer.index import CHECKPOINT, FAILED, FINAL, RunIndex, read_rows

PER_PAGE = 50
COUNT_CAP = 100_000
SNIPPET = 240
STATUSES = ("kept", "failed", "all")
FLAG_CHOICES = ("", *VERDICTS, "any", "none")
SORTS = {"": "rows.rowid", "quality": "quality IS NULL, quality, rows.rowid", "-quality": "quality IS NULL, quality DESC, rows.rowid",
         "length": "rlen, rows.rowid", "-length": "rlen DESC, rows.rowid"}
_ID = re.compile(r"^[0-9a-f]{16}$")
_WORD = re.compile(r"\w+", re.UNICODE)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Filters:
    """What the records table shows; made from the page's query string (unknown values fall back to defaults)."""

    q: str = ""
    status: str = "kept"
    stage: str = ""
    method: str = ""
    kind: str = ""
    qmin: float | None = None
    qmax: float | None = None
    flag: str = ""
    verdict: str = ""
    sort: str = ""
    page: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Filters:
        status = params.get("status", "kept")
        kind = params.get("kind", "")
        try:
            page = max(1, int(params.get("page", "1")))
        except ValueError:
            page = 1
        return cls(
            q=params.get("q", "").strip()[:500],
            status="failed" if kind else (status if status in STATUSES else "kept"),
            stage=params.get("stage", ""), method=params.get("method", ""), kind=kind,
            qmin=_number(params.get("qmin")), qmax=_number(params.get("qmax")),
            flag=params.get("flag", "") if params.get("flag", "") in FLAG_CHOICES else "",
            verdict=params.get("verdict", "") if params.get("verdict", "") in ("a", "b", "tie") else "",
            sort=params.get("sort", "") if params.get("sort", "") in SORTS else "", page=page,
        )

    def link(self, **changes: Any) -> str:
        """The query string of these filters with `changes` (page 1 unless a page is given)."""
        changed = replace(self, **{"page": 1, **changes})
        params = {f.name: getattr(changed, f.name) for f in fields(changed)}
        defaults = Filters()
        return urlencode({k: ("" if v is None else v) for k, v in params.items() if v != getattr(defaults, k)})

    @property
    def narrowed(self) -> bool:
        """Whether anything but the status narrows the rows (then the count is not known from the facets)."""
        return bool(self.q or self.stage or self.method or self.kind or self.qmin is not None or self.qmax is not None
                    or self.flag or self.verdict)


def fts_query(text: str) -> str | None:
    """The user's words as an FTS5 query: every word must occur (quoted, so no word is read as an operator)."""
    words = _WORD.findall(text)
    return " ".join(f'"{w}"' for w in words) if words else None


@dataclass
class Row:
    rowid: int
    id: str
    status: str
    stage: str | None
    methods: list[str]
    kind: str | None
    quality: float | None
    verdict: str | None
    instruction: str = ""
    response: str | None = None
    message: str = ""
    flag: Flag | None = None
    missing: bool = False  # the file changed since it was indexed


@dataclass
class Page:
    rows: list[Row]
    total: int
    capped: bool  # the total is at least `total`
    page: int
    pages: int | None
    facets: dict[str, Any] = field(default_factory=dict)


def _where(conn: sqlite3.Connection, f: Filters, flags: dict[str, Flag]) -> tuple[str, str, list[Any]]:
    """(FROM, WHERE, arguments) of the rows the filters keep. A word search joins the FTS table and walks its matches
    in rowid order, so a page of a common word stops after 50 matches instead of gathering every match first."""
    source = "rows"
    clauses: list[str] = []
    args: list[Any] = []
    statuses = {"kept": (FINAL, CHECKPOINT), "failed": (FAILED,), "all": (FINAL, CHECKPOINT, FAILED)}[f.status]
    if f.status != "all":
        clauses.append(f"status IN ({','.join('?' * len(statuses))})")
        args += statuses
        low, high = conn.execute(f"SELECT min(first_row), max(last_row) FROM files WHERE status IN ({','.join('?' * len(statuses))})",
                                 statuses).fetchone()
        clauses.append("rows.rowid BETWEEN ? AND ?")  # rows of one status sit in their files' rowid ranges
        args += [low or 0, high or 0]
    if f.stage:
        clauses.append("stage = ?")
        args.append(f.stage)
    if f.method:
        clauses.append("(',' || methods || ',') LIKE ?")
        args.append(f"%,{f.method},%")
    if f.kind:
        clauses.append("kind = ?")
        args.append(f.kind)
    if f.qmin is not None:
        clauses.append("quality >= ?")
        args.append(f.qmin)
    if f.qmax is not None:
        clauses.append("quality <= ?")
        args.append(f.qmax)
    if f.verdict:
        clauses.append("verdict = ?")
        args.append(f.verdict)
    if f.q:
        match = fts_query(f.q)
        if _ID.match(f.q.lower()):
            clauses.append("(id = ?" + (" OR rows.rowid IN (SELECT rowid FROM fts WHERE fts MATCH ?))" if match else ")"))
            args += [f.q.lower(), *([match] if match else [])]
        elif match:
            source = "fts JOIN rows ON rows.rowid = fts.rowid"
            clauses.insert(0, "fts MATCH ?")
            args.insert(0, match)
    if f.flag:
        wanted = [i for i, flag in flags.items() if f.flag in ("any", "none") or flag.flag == f.flag]
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS flagged(id TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM temp.flagged")
        conn.executemany("INSERT OR IGNORE INTO temp.flagged VALUES (?)", ((i,) for i in wanted))
        clauses.append(("rows.id NOT IN" if f.flag == "none" else "rows.id IN") + " (SELECT id FROM temp.flagged)")
    return source, (" AND ".join(clauses) or "1"), args


def records_page(index: RunIndex, f: Filters, flags: dict[str, Flag], per_page: int = PER_PAGE) -> Page:
    conn = index.connect()
    try:
        conn.execute("PRAGMA query_only=OFF")  # the temp table of flagged ids only; the index itself is not written
        facets = index.facets(conn)
        source, where, args = _where(conn, f, flags)
        order = SORTS[f.sort].replace("rows.rowid", "fts.rowid") if source != "rows" else SORTS[f.sort]
        found = conn.execute(
            f"SELECT rows.rowid, id, status, stage, methods, kind, quality, verdict, file, offset, item FROM {source} "
            f"WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?", [*args, per_page, (f.page - 1) * per_page]).fetchall()
        total, capped = _count(conn, f, source, where, args, facets["keys"])
        texts = read_rows(index.file_paths(conn), [(r[8], r[9], r[10]) for r in found])
    finally:
        conn.close()
    rows = [_row(r, text, flags) for r, text in zip(found, texts)]
    pages = None if capped else max(1, -(-total // per_page))
    return Page(rows, total, capped, f.page, pages, facets)


def _count(conn: sqlite3.Connection, f: Filters, source: str, where: str, args: list[Any], keys: Mapping[str, int]) -> tuple[int, bool]:
    if not f.narrowed:  # known without a scan: the facets count every row by status
        wanted = {"kept": (FINAL, CHECKPOINT), "failed": (FAILED,), "all": (FINAL, CHECKPOINT, FAILED)}[f.status]
        return sum(n for k, n in keys.items() if k.split("|", 1)[0] in wanted), False
    n = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {source} WHERE {where} LIMIT ?)", [*args, COUNT_CAP + 1]).fetchone()[0]
    return min(n, COUNT_CAP), n > COUNT_CAP


def _row(r: tuple[Any, ...], text: dict[str, Any] | None, flags: dict[str, Flag]) -> Row:
    row = Row(rowid=r[0], id=r[1], status=r[2], stage=r[3], methods=r[4].split(",") if r[4] else [], kind=r[5],
              quality=r[6], verdict=r[7], flag=flags.get(r[1]), missing=text is None)
    if text is None:
        return row
    record = text.get("record") if r[10] == -2 else text
    if r[10] == -2:
        row.message = str(text.get("message") or "")
    if isinstance(record, dict):
        prompt = record.get("instruction") or ""
        if record.get("input"):
            prompt += f"\n\n{record['input']}"
        row.instruction = _snippet(prompt)
        response = record.get("response")
        row.response = _snippet(response) if isinstance(response, str) else None
    return row


def _snippet(text: str) -> str:
    return text if len(text) <= SNIPPET else text[: SNIPPET - 1].rstrip() + "…"


@dataclass
class Located:
    """One row of the index holding a record id, with what is stored there."""

    rowid: int
    status: str
    stage: str | None
    kind: str | None
    row: dict[str, Any] | None  # the record, or the failure row holding it


def locate(index: RunIndex, record_id: str) -> list[Located]:
    """Every row holding `record_id` (a live run may hold it at several stages), the final or latest first."""
    conn = index.connect()
    try:
        found = conn.execute("SELECT rowid, status, stage, kind, file, offset, item FROM rows WHERE id=? ORDER BY rowid DESC",
                             (record_id,)).fetchall()
        texts = read_rows(index.file_paths(conn), [(r[4], r[5], r[6]) for r in found])
    finally:
        conn.close()
    order = {FINAL: 0, CHECKPOINT: 1, FAILED: 2}
    located = [Located(r[0], r[1], r[2], r[3], t) for r, t in zip(found, texts)]
    return sorted(located, key=lambda x: order.get(x.status, 3))


def failure_groups(index: RunIndex, examples: int = 3) -> list[dict[str, Any]]:
    """Failures grouped by stage and kind (largest first), with a few example rows each."""
    conn = index.connect()
    try:
        keys = index.facets(conn)["keys"]
        groups = []
        low, high = conn.execute("SELECT min(first_row), max(last_row) FROM files WHERE status=?", (FAILED,)).fetchone()
        for key, n in sorted(keys.items(), key=lambda kv: -kv[1]):
            status, stage, kind = key.split("|", 2)
            if status != FAILED or not n:
                continue
            found = conn.execute("SELECT rowid, id, file, offset, item FROM rows WHERE rowid BETWEEN ? AND ? AND status=? "
                                 "AND stage=? AND kind=? ORDER BY rowid LIMIT ?", (low or 0, high or 0, FAILED, stage, kind, examples)).fetchall()
            texts = read_rows(index.file_paths(conn), [(r[2], r[3], r[4]) for r in found])
            shown = [{"id": r[1], "message": (t or {}).get("message", ""), "instruction": _snippet(((t or {}).get("record") or {}).get("instruction") or "")}
                     for r, t in zip(found, texts)]
            groups.append({"stage": stage, "kind": kind, "count": n, "examples": shown})
    finally:
        conn.close()
    return groups
