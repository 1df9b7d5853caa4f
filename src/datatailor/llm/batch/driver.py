"""One batch on the server: create it (or, after a crash, find it), wait for it to end, store its files.

Each step is written to the journal once it happened on the server, so a crash between two steps resumes at the
right one. Every wait is bounded: HTTP calls by the client's timeouts and retries, the batch by its completion
window plus `batch_wait_margin_s`, after which it is cancelled and `CANCEL_GRACE_S` more are given to end it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datatailor.llm.batch.client import BatchClient
from datatailor.llm.batch.journal import ENDED, METADATA_KEY, BatchJournal, LocalBatch
from datatailor.llm.config import OpenAIModel

# After cancelling a batch that outlived its window + margin: how long to wait for the server to end it.
CANCEL_GRACE_S = 600.0


@dataclass
class Endpoint:
    """One server + key variable + model (a batch holds one model's requests): its client and its next batch's queue."""

    config: OpenAIModel
    client: BatchClient
    queue: list[str] = field(default_factory=list)
    queue_bytes: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    collector: asyncio.Task[None] | None = None
    resumed: bool = False


def endpoint_key(model: str, base_url: str, api_key_env: str | None) -> tuple[str, str, str | None]:
    return base_url.rstrip("/"), model, api_key_env


async def find_created(journal: BatchJournal, endpoint: Endpoint, batch: LocalBatch) -> bool:
    """After a crash, a batch planned but not recorded as created: was it created? It can only have been if it was
    uploaded; then the server's batch list is searched for its tag. False: it was not (the caller drops it)."""
    found = await endpoint.client.find(METADATA_KEY, batch.tag, batch.planned_at) if batch.file_id is not None else None
    if found is None:
        why = "never uploaded" if batch.file_id is None else "its creation was not recorded and the server has no such batch"
        journal.append({"event": "dropped", "tag": batch.tag, "why": why})
        return False
    _created(journal, batch, found)
    return True


async def create(journal: BatchJournal, endpoint: Endpoint, batch: LocalBatch) -> None:
    """Upload the input file (unless it was) and create the batch, its tag in the metadata."""
    if batch.file_id is None:
        file_id = await endpoint.client.upload(journal.input_path(batch.tag))
        journal.append({"event": "uploaded", "tag": batch.tag, "file_id": file_id})
    info = await endpoint.client.create(batch.file_id, endpoint.config.batch_completion_window, METADATA_KEY, batch.tag)  # type: ignore[arg-type]
    _created(journal, batch, info)


def _created(journal: BatchJournal, batch: LocalBatch, info: dict[str, Any]) -> None:
    journal.append({"event": "created", "tag": batch.tag, "batch_id": info["id"],
                    "created_at": info.get("created_at") or time.time(), "status": info.get("status")})


async def wait(journal: BatchJournal, endpoint: Endpoint, batch: LocalBatch, on_change: Callable[[], None]) -> dict[str, Any]:
    """Poll until the batch ends (every `batch_poll_s`, growing ×1.5 to `batch_poll_max_s`); past its window + margin,
    cancel it and wait `CANCEL_GRACE_S` more at most. Returns the server's last word on it."""
    cfg, client = endpoint.config, endpoint.client
    deadline = (batch.created_at or time.time()) + cfg.batch_window_s + cfg.batch_wait_margin_s
    interval, gave_up = cfg.batch_poll_s, False
    while True:
        info = await client.retrieve(batch.batch_id)  # type: ignore[arg-type]
        status, counts = info.get("status"), info.get("request_counts") or {}
        if status in ENDED:
            return info
        if status != batch.status or counts != batch.counts:
            journal.append({"event": "status", "tag": batch.tag, "status": status, "counts": counts})
        on_change()  # after every poll: the progress line says what the run waits for, even while nothing changes
        now = time.time()
        if now > deadline and not gave_up:
            gave_up = True
            journal.append({"event": "status", "tag": batch.tag, "status": status, "counts": counts,
                            "note": f"still {status} {cfg.batch_completion_window} + {cfg.batch_wait_margin_s:g} s after its "
                                    "creation: cancelled, its unanswered requests are retried"})
            await client.cancel(batch.batch_id)  # type: ignore[arg-type]
            deadline = now + CANCEL_GRACE_S
        elif now > deadline:
            return {**info, "status": "expired", "error_note": f"did not end within {CANCEL_GRACE_S:g} s of being cancelled"}
        await asyncio.sleep(min(interval, max(deadline - now, cfg.batch_poll_s)))  # wake at the deadline, if sooner
        interval = min(cfg.batch_poll_max_s, interval * 1.5)


async def download(journal: BatchJournal, endpoint: Endpoint, batch: LocalBatch, info: dict[str, Any]) -> None:
    """Store the ended batch's output and error files beside the journal, then record it as finished."""
    client = endpoint.client
    if info.get("output_file_id"):
        await client.download(info["output_file_id"], journal.output_path(batch.tag))
    if info.get("error_file_id"):
        await client.download(info["error_file_id"], journal.errors_path(batch.tag))
    errors = (info.get("errors") or {}).get("data") or []
    error = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))[:500] or info.get("error_note")
    journal.append({"event": "finished", "tag": batch.tag, "status": info.get("status"),
                    "counts": info.get("request_counts") or {}, "output_file_id": info.get("output_file_id"),
                    "error_file_id": info.get("error_file_id"), "error": error or None})
