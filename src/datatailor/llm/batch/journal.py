"""The durable state of a run's provider batches: `batches/` in the run directory.

    batches/run.json              a random token naming this run's batches on the server (their metadata)
    batches/journal.jsonl         append-only, one row per event, fsync'd before the step it records goes further
    batches/<tag>.input.jsonl     the batch input file, written (atomically) before anything is uploaded
    batches/<tag>.output.jsonl    the provider's output file, once the batch has ended
    batches/<tag>.errors.jsonl    the provider's error file, when it has one

Events, in the order a batch goes through them:

    planned    the input file is written; the row lists every request's custom_id and its owner ("stage:record"),
               the batch's worst-case cost, and the server and key variable it goes to (never the key)
    uploaded   the input file's id on the server
    created    the batch's id on the server
    status     the server's status, when it changed (validating, in_progress, finalizing, cancelling)
    finished   the batch ended (completed, failed, expired, cancelled) and its output/error files are stored here
    dropped    a planned batch that was never created (found nowhere on the server after a crash, or cancelled
               before it was created): its requests are asked again when their records ask for them
    cancel     `datatailor batches --cancel` asked the server to cancel it

A batch whose `created` row is missing (killed between the HTTP call and the write) is looked up on the server by
its tag, which every batch carries in its metadata (`datatailor_batch`), before anything is created again.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatailor.io import atomic_open
from datatailor.journal import append_row, iter_journal

JOURNAL = "journal.jsonl"
# Statuses the server gives a batch that has ended; every other one is still pending.
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
METADATA_KEY = "datatailor_batch"


@dataclass
class LocalBatch:
    """One batch as the run knows it."""

    tag: str
    planned_at: float
    requests: int
    bytes: int
    worst_usd: float
    worst_tokens: int
    model: str
    base_url: str
    api_key_env: str | None
    cids: list[str] | None = None  # custom_ids in file order; dropped from memory once the batch is resolved
    stages: dict[str, int] = field(default_factory=dict)  # how many of its requests each stage made
    file_id: str | None = None
    batch_id: str | None = None
    created_at: float | None = None
    status: str = "planned"
    counts: dict[str, int] = field(default_factory=dict)
    finished: bool = False  # ended, and its output/error files are stored beside the journal
    dropped: str | None = None  # why a planned batch will never be created
    error: str | None = None  # why the server failed it, or why the run gave up waiting
    cancel_requested: bool = False

    @property
    def pending(self) -> bool:
        """Still to be created, or created and not ended."""
        return not self.finished and self.dropped is None

    @property
    def server_pending(self) -> bool:
        return self.pending and self.batch_id is not None


def new_token() -> str:
    return secrets.token_hex(6)


class BatchJournal:
    """Reads and appends `batches/journal.jsonl`; knows every batch of the run and, for each request, the last batch
    it went into and how many batches it went through."""

    def __init__(self, folder: Path, *, create: bool = True):
        self.folder = folder
        self.path = folder / JOURNAL
        self.batches: dict[str, LocalBatch] = {}
        # custom_id -> (tag of the last batch it went into, how many batches it went through)
        self.where: dict[str, tuple[str, int]] = {}
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        token_path = folder / "run.json"
        if token_path.exists():
            self.token = json.loads(token_path.read_text(encoding="utf-8"))["token"]
        else:
            self.token = new_token()
            if create:
                _write_text(token_path, json.dumps({"token": self.token}) + "\n")
        for row in iter_journal(self.path) if self.path.exists() else ():
            self._apply(row)
        for batch in self.batches.values():
            if not batch.pending:
                batch.cids = None  # resolved in an earlier invocation: `where` still finds its requests
        self._seq = len(self.batches)

    # -- paths --------------------------------------------------------------------------

    def input_path(self, tag: str) -> Path:
        return self.folder / f"{tag}.input.jsonl"

    def output_path(self, tag: str) -> Path:
        return self.folder / f"{tag}.output.jsonl"

    def errors_path(self, tag: str) -> Path:
        return self.folder / f"{tag}.errors.jsonl"

    # -- writing ------------------------------------------------------------------------

    def plan(self, lines: list[str], cids: list[str], owners: list[str | None], worst_usd: float, worst_tokens: int,
             *, model: str, base_url: str, api_key_env: str | None) -> LocalBatch:
        """Write a batch's input file, then its `planned` row: from here on a crash cannot lose track of it."""
        self._seq += 1
        tag = f"{self.token}-{self._seq:04d}"
        _write_text(self.input_path(tag), "".join(lines))
        self.append({
            "event": "planned", "tag": tag, "t": time.time(), "requests": [[c, o] for c, o in zip(cids, owners)],
            "bytes": sum(len(line.encode("utf-8")) for line in lines), "worst_usd": round(worst_usd, 8),
            "worst_tokens": worst_tokens, "model": model, "base_url": base_url, "api_key_env": api_key_env,
        })
        return self.batches[tag]

    def append(self, row: dict[str, Any]) -> None:
        """Append one event (fsync'd) and apply it."""
        row.setdefault("t", time.time())
        with self.path.open("a", encoding="utf-8") as fh:
            append_row(fh, row)
            os.fsync(fh.fileno())
        self._apply(row)

    # -- reading ------------------------------------------------------------------------

    def _apply(self, row: dict[str, Any]) -> None:
        event, tag = row["event"], row["tag"]
        if event == "planned":
            requests = row["requests"]
            self.batches[tag] = LocalBatch(
                tag=tag, planned_at=row["t"], requests=len(requests), bytes=row["bytes"], worst_usd=row["worst_usd"],
                worst_tokens=row["worst_tokens"], model=row["model"], base_url=row["base_url"],
                api_key_env=row.get("api_key_env"), cids=[c for c, _ in requests],
                stages=dict(Counter((o or "?").split(":", 1)[0] for _, o in requests)),
            )
            for cid, _ in requests:
                self.where[cid] = (tag, self.where.get(cid, ("", 0))[1] + 1)
            return
        batch = self.batches.get(tag)
        if batch is None:  # a row about a batch whose `planned` row was torn off: nothing was sent for it
            return
        if event == "uploaded":
            batch.file_id = row["file_id"]
            batch.status = "uploaded"
        elif event == "created":
            batch.batch_id = row["batch_id"]
            batch.created_at = row.get("created_at") or row["t"]
            batch.status = row.get("status") or "validating"
        elif event == "status":
            batch.status = row["status"]
            batch.counts = row.get("counts") or batch.counts
        elif event == "finished":
            batch.status = row["status"]
            batch.counts = row.get("counts") or batch.counts
            batch.error = row.get("error")
            batch.finished = True
        elif event == "dropped":
            batch.dropped = row["why"]
            batch.status = "dropped"
            for cid in batch.cids or []:  # never sent: it does not count as one of the request's batches
                last, n = self.where.get(cid, (tag, 1))
                if last == tag:
                    self.where[cid] = (tag, n - 1)
        elif event == "cancel":
            batch.cancel_requested = True

    def pending(self) -> list[LocalBatch]:
        return [b for b in self.batches.values() if b.pending]

    def reserved(self) -> tuple[float, int]:
        """Worst-case $ and tokens of the batches not ended yet (not yet billed)."""
        pending = self.pending()
        return sum(b.worst_usd for b in pending), sum(b.worst_tokens for b in pending)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Counts for progress lines: batches submitted / in progress / completed / failed, requests, oldest pending."""
        now = time.time() if now is None else now
        created = [b for b in self.batches.values() if b.batch_id is not None]
        waiting = [b for b in created if b.pending]
        done = [b for b in self.batches.values() if b.finished and b.status == "completed"]
        failed = [b for b in self.batches.values() if b.finished and b.status != "completed"]
        return {
            "submitted": len(created),
            "in_progress": len(waiting),
            "completed": len(done),
            "failed": len(failed),
            "requests": sum(b.requests for b in created),
            "requests_done": sum(b.counts.get("completed", 0) for b in created),
            "oldest_pending_s": max((now - (b.created_at or b.planned_at) for b in waiting), default=None),
        }


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file, fsync, rename): a crash leaves the old file or the whole new one."""
    with atomic_open(path) as fh:
        fh.write(text)
