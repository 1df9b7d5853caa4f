"""Review flags: the `flags.jsonl` file a reviewer writes with `datatailor view`, and the `filter.flags` stage
that drops the records flagged there.

A flag is a person's verdict on one record id: `bad`, `good` or `note` (a remark, no verdict), with an optional
note. The viewer appends one row per click to `RUN_DIR/flags.jsonl` (never touching `data.jsonl`)::

    {"id": "e7262ae6dde5d9a4", "flag": "bad", "note": "the answer is wrong", "at": "2026-12-03T18:20:00+00:00"}

The file is append-only; the last row for an id wins, and a `clear` row removes the id's flag. `filter.flags`
and `datatailor export --drop-flagged` read it with `read_flags`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from datatailor.errors import UserError
from datatailor.records import LineageEvent, Record
from datatailor.stages.base import Decision, FilterStage, StageConfig, StageContext, register

if TYPE_CHECKING:
    from datatailor.store import RecordSource

FLAGS_FILE = "flags.jsonl"
VERDICTS = ("bad", "good", "note")
CLEAR = "clear"


@dataclass(frozen=True)
class Flag:
    flag: str  # one of VERDICTS
    note: str = ""
    at: str = ""


def flags_path(source: str | Path) -> Path:
    """The flags file of a run directory, or `source` itself when it names a file."""
    p = Path(source)
    return p / FLAGS_FILE if p.is_dir() else p


def iter_flag_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a flags file. A last line cut off mid-write (no newline, not JSON) is ignored; any
    other malformed line or unknown flag is a UserError naming the file and line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if not line.endswith("\n"):
                    return  # torn last line: the write that was cut off never happened
                raise UserError(f"{path}:{lineno}: malformed JSON line in a flags file: {exc.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise UserError(f"{path}:{lineno}: a flag row needs a string `id`")
            if row.get("flag") not in (*VERDICTS, CLEAR):
                raise UserError(f"{path}:{lineno}: unknown flag {row.get('flag')!r} (use {', '.join(VERDICTS)} or {CLEAR})")
            yield lineno, row


def read_flags(path: Path) -> dict[str, Flag]:
    """Each flagged id's current flag (last row wins; cleared ids are absent). A missing file: no flags."""
    flags: dict[str, Flag] = {}
    if not path.exists():
        return flags
    for _, row in iter_flag_rows(path):
        if row["flag"] == CLEAR:
            flags.pop(row["id"], None)
        else:
            flags[row["id"]] = Flag(row["flag"], str(row.get("note") or ""), str(row.get("at") or ""))
    return flags


_APPEND_LOCK = threading.Lock()


def append_flag(path: Path, record_id: str, flag: str, note: str = "") -> dict[str, Any]:
    """Append one flag row (flushed and fsynced: a click is not lost by a crash). Returns the row."""
    if flag not in (*VERDICTS, CLEAR):
        raise ValueError(f"unknown flag {flag!r}")
    row = {"id": record_id, "flag": flag, "note": note, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    with _APPEND_LOCK, path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return row


def drop_flagged(records: Iterable[Record], flags: dict[str, Flag], drop: Iterable[str]) -> Iterator[tuple[Record, Flag | None]]:
    """Each record with the flag that drops it (None: kept)."""
    dropping = set(drop)
    for record in records:
        flag = flags.get(record.id)
        yield record, (flag if flag is not None and flag.flag in dropping else None)


def without_flagged(records: list[Record], source: Path, drop: Iterable[str] = ("bad",)) -> tuple[list[Record], str]:
    """`datatailor export --drop-flagged`: the records not flagged (`bad` by default) in the flags file of `source`
    (a run directory, or a file in one), and a line saying what was dropped."""
    folder = source if source.is_dir() else source.parent
    path = folder / FLAGS_FILE
    if not path.exists():
        raise UserError(f"--drop-flagged: {folder} has no {FLAGS_FILE}; nothing was flagged there with `datatailor view`")
    flags = read_flags(path)
    kept = [r for r, flag in drop_flagged(records, flags, drop) if flag is None]
    dropped = len(records) - len(kept)
    return kept, f"flags: dropped {dropped} of {len(records)} records flagged {', '.join(drop)} in {path}"


class FlagsFilterConfig(StageConfig):
    type: Literal["filter.flags"] = "filter.flags"
    flags: str = Field(..., description="A run directory reviewed with `datatailor view` (its flags.jsonl is read), or a flags file.")
    drop: list[Literal["bad", "good", "note"]] = Field(["bad"], min_length=1, description="Which flags drop a record.")


@register("filter.flags")
class FlagsFilter(FilterStage[FlagsFilterConfig]):
    """Drop the records a reviewer flagged in `datatailor view` (`bad` by default), as `flagged` failures that
    carry the reviewer's note; every other record is kept unchanged but for a lineage event. Reads the flags file
    once, when the stage is built, so a missing or malformed file stops the run before anything is spent.
    Usable after any method: records are matched by id (a run's `data.jsonl` read as input keeps its ids)."""

    Config = FlagsFilterConfig
    # The contract: a generic stage (no method) that needs only record ids, provides nothing new and clears nothing.
    method = None
    needs = ()
    provides = ()

    def __init__(self, config: FlagsFilterConfig, ctx: StageContext):
        super().__init__(config, ctx)
        source = Path(config.flags).expanduser()
        if not source.is_absolute():
            source = ctx.base_dir / source
        if not source.exists():
            raise UserError(f"filter.flags: {source} does not exist (give a run directory reviewed with `datatailor view`, "
                            "or its flags.jsonl)")
        self.path = flags_path(source)
        self.flags = read_flags(self.path)

    def decide(self, records: RecordSource) -> Iterator[Decision]:
        drop = ", ".join(self.config.drop)
        kept_event = LineageEvent(stage=self.name, decision="kept", reason=f"not flagged {drop} in {self.path}")
        for record, flag in drop_flagged(records, self.flags, self.config.drop):
            if flag is None:
                yield record, record.with_event(kept_event), None
            else:
                note = f": {flag.note}" if flag.note else ""
                yield record, None, ("flagged", f"flagged {flag.flag} by a reviewer{note} ({self.path}, {flag.at or 'no time'})")
