"""A stage's on-disk state: its journals while it runs, their compaction into input order once it is complete.

A map stage appends one row per finished input to `outputs.jsonl` or `failures.jsonl` as records finish, so a
crash loses only what was in flight; when every input is accounted for, `compact` writes `records.jsonl` (what
the next stage reads) and rewrites `failures.jsonl`, both in input order. A batch stage appends one row per input
set it processed, and a stage that tops up one row per extra round (see `runner.rounds`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datatailor.io import write_json
from datatailor.journal import append_row, iter_journal_offsets
from datatailor.records import Record
from datatailor.store import IdIndex, IdSet, RecordSource, RecordWriter, read_row_at

BATCH = "__batch__"
ROUND = "__round__"


class StageCheckpoint:
    """The on-disk state of one stage: which inputs are finished and where their outputs or failures are.

    A map stage appends one row per finished input to outputs.jsonl or failures.jsonl (journals, in the
    order records finish). A batch stage appends one row per input set it processed (keyed by the set's
    digest, so a later round with more inputs runs it again), and a stage that tops up appends one row per
    extra round. In memory: the finished ids as digests, and the journal offsets of batch and round rows.
    Once the stage is complete, its outputs are written in input order to records.jsonl and its failures
    rewritten in input order.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.outputs_path = folder / "outputs.jsonl"
        self.failures_path = folder / "failures.jsonl"
        self.records_path = folder / "records.jsonl"
        self.done_path = folder / "done.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.finished = IdSet()
        self.failed = IdSet()
        self.batches: dict[str, int] = {}  # input digest -> offset of its row in outputs.jsonl
        self.rounds: dict[int, int] = {}  # extra round -> offset of its row
        for offset, row in iter_journal_offsets(self.outputs_path):
            if row["src"] == BATCH:
                self.batches[row["digest"]] = offset
            elif row["src"] == ROUND:
                self.rounds[int(row["round"])] = offset
            else:
                self.finished.add(row["src"])
        for _, row in iter_journal_offsets(self.failures_path):
            self.failed.add(row["id"])
            self.finished.add(row["id"])
        self._out_fh = self.outputs_path.open("a", encoding="utf-8")
        self._fail_fh = self.failures_path.open("a", encoding="utf-8")

    def done(self) -> dict[str, Any] | None:
        """done.json of the last time the stage completed, if its records.jsonl is there."""
        if not (self.done_path.exists() and self.records_path.exists()):
            return None
        return json.loads(self.done_path.read_text(encoding="utf-8"))

    def add_outputs(self, src: str, records: list[Record]) -> None:
        self.finished.add(src)
        append_row(self._out_fh, {"src": src, "records": [r.model_dump(mode="json") for r in records]})

    def add_output_row(self, row: dict[str, Any]) -> None:
        """An outputs row as a worker wrote it ({"src": id, "records": [...]})."""
        self.finished.add(row["src"])
        append_row(self._out_fh, row)

    def add_failure(self, row: dict[str, Any]) -> None:
        self.finished.add(row["id"])
        self.failed.add(row["id"])
        append_row(self._fail_fh, row)

    def add_batch(self, digest: str, records: list[Record], rejected: list[dict[str, Any]]) -> None:
        self._out_fh.flush()
        self.batches[digest] = self.outputs_path.stat().st_size
        append_row(self._out_fh, {"src": BATCH, "digest": digest, "records": [r.model_dump(mode="json") for r in records], "rejected": rejected})

    def add_round(self, round: int, records: list[Record]) -> None:
        self._out_fh.flush()
        self.rounds[round] = self.outputs_path.stat().st_size
        append_row(self._out_fh, {"src": ROUND, "round": round, "records": [r.model_dump(mode="json") for r in records]})

    def _row_at(self, offset: int) -> dict[str, Any]:
        with self.outputs_path.open("rb") as fh:
            return read_row_at(fh, offset)

    def batch(self, digest: str) -> tuple[list[Record], list[dict[str, Any]]]:
        row = self._row_at(self.batches[digest])
        return [Record.model_validate(r) for r in row["records"]], row.get("rejected", [])

    def round_records(self, round: int) -> list[Record]:
        return [Record.model_validate(r) for r in self._row_at(self.rounds[round])["records"]]

    def replace_failures(self, rows: Iterable[dict[str, Any]]) -> Counter[str]:
        """Rewrite failures.jsonl whole (atomically) with `rows`, streamed; returns the count of each kind."""
        writer = FailureWriter(self)
        try:
            for row in rows:
                writer.write(row)
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    def install_failures(self, written: Path) -> None:
        self._fail_fh.close()
        os.replace(written, self.failures_path)
        self._fail_fh = self.failures_path.open("a", encoding="utf-8")
    def compact(self, inputs: RecordSource, name: str) -> tuple[RecordSource, Counter[str]]:
        """Write the finished stage's outputs to records.jsonl and its failures back to failures.jsonl, both in
        input order, checking that every input is accounted for exactly once. Returns the failure kinds."""
        self.sync()
        outputs_at = IdIndex.of_journal(self.outputs_path, "src")
        failures_at = IdIndex.of_journal(self.failures_path, "id")
        writer = RecordWriter(self.records_path, f"{name} outputs")
        failed = FailureWriter(self)
        try:
            with self.outputs_path.open("rb") as out_fh, self.failures_path.open("rb") as fail_fh:
                for rid in inputs.ids():
                    offset = outputs_at.offset(rid)
                    if offset is not None:
                        row = read_row_at(out_fh, offset)
                        for r in row["records"]:
                            writer.write_line(r["id"], json.dumps(r, ensure_ascii=False) + "\n")
                        continue
                    offset = failures_at.offset(rid)
                    if offset is None:
                        raise RuntimeError(f"stage {name}: input {rid} has neither an output nor a failure row")
                    failed.write(read_row_at(fail_fh, offset))
        except BaseException:
            writer.abort()
            failed.abort()
            raise
        del outputs_at, failures_at
        return writer.close(), failed.close()

    def sync(self) -> None:
        for fh in (self._out_fh, self._fail_fh):
            fh.flush()
            os.fsync(fh.fileno())

    def mark_complete(self, summary: dict[str, Any]) -> None:
        self.sync()
        write_json(self.done_path, summary)

    def close(self) -> None:
        self._out_fh.close()
        self._fail_fh.close()


class FailureWriter:
    """A stage's failure rows in input order, written to a temporary file that replaces failures.jsonl on
    `close()`; counts each kind on the way, so no row is held in memory."""

    def __init__(self, cp: StageCheckpoint):
        self.cp = cp
        self.kinds: Counter[str] = Counter()
        self._tmp = cp.failures_path.with_name(f".{cp.failures_path.name}.tmp")
        self._fh = self._tmp.open("w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.kinds[row["kind"]] += 1

    def close(self) -> Counter[str]:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.cp.install_failures(self._tmp)
        return self.kinds

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def failure_row(record: Record, stage: str, kind: str, message: str, shown: Record | None = None) -> dict[str, Any]:
    return {"id": record.id, "stage": stage, "kind": kind, "message": message, "record": (shown or record).model_dump(mode="json")}


def check_unique(records: list[Record], where: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise RuntimeError(f"duplicate record id {r.id} in {where}; a stage must give derived records distinct ids")
        seen.add(r.id)
