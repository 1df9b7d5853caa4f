"""What a finished batch said about each request: read from its output and error files, by `custom_id`.

Each line of either file is `{"custom_id", "response": {"status_code", "body"}, "error"}`. A request's outcome is a
`Completion` (status 200 with a choice), or a `RequestError`: retryable for 408/409/429/5xx, a line-level `error`
(e.g. `batch_expired`) and a request the batch never answered; not retryable for another 4xx or a 200 without a
choice (as online, asking again would fail the same way).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatailor.errors import LLMCallFailure
from datatailor.llm.base import Completion, CompletionRequest
from datatailor.llm.batch.journal import BatchJournal, LocalBatch
from datatailor.llm.openai import read_completion

# Finished batches whose line index is kept in memory (for requests asked after their batch ended, e.g. on resume).
INDEXED_BATCHES = 4


@dataclass
class RequestError:
    message: str
    retryable: bool


Outcome = Completion | RequestError


def outcome_of(row: dict[str, Any], request: CompletionRequest, batch_id: str | None) -> Outcome:
    """One line of an output or error file, for the request it answers."""
    error = row.get("error")
    if error:
        message = error.get("message") or error.get("code") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        return RequestError(f"{code + ': ' if code else ''}{message}", retryable=True)
    response = row.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if status == 200:
        try:
            return read_completion(body, request, batch_id)
        except LLMCallFailure as exc:
            return RequestError(str(exc), retryable=False)
    detail = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message", detail)
    retryable = not isinstance(status, int) or status >= 500 or status in (408, 409, 429)
    return RequestError(f"HTTP {status}: {str(detail)[:300]}", retryable=retryable)


def iter_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, row) for each readable line of a result file; a damaged line is skipped (its request is then
    treated as unanswered and retried)."""
    if not path.exists():
        return
    offset = 0
    with path.open("rb") as fh:
        for raw in fh:
            try:
                row = json.loads(raw)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
                yield offset, row
            offset += len(raw)


class ResultFiles:
    """Looks up one request's outcome in a finished batch's files, keeping a small index of recent batches."""

    def __init__(self, journal: BatchJournal):
        self.journal = journal
        self._index: OrderedDict[str, dict[str, tuple[Path, int]]] = OrderedDict()

    def lookup(self, batch: LocalBatch, cid: str, request: CompletionRequest) -> Outcome:
        index = self._index_of(batch)
        found = index.get(cid)
        if found is None:
            return unanswered(batch)
        path, offset = found
        with path.open("rb") as fh:
            fh.seek(offset)
            row = json.loads(fh.readline())
        return outcome_of(row, request, batch.batch_id)

    def _index_of(self, batch: LocalBatch) -> dict[str, tuple[Path, int]]:
        if batch.tag in self._index:
            self._index.move_to_end(batch.tag)
            return self._index[batch.tag]
        index: dict[str, tuple[Path, int]] = {}
        # the error file first, so that an answer in the output file wins for a request listed in both
        for path in (self.journal.errors_path(batch.tag), self.journal.output_path(batch.tag)):
            for offset, row in iter_lines(path):
                index[row["custom_id"]] = (path, offset)
        self._index[batch.tag] = index
        while len(self._index) > INDEXED_BATCHES:
            self._index.popitem(last=False)
        return index

    def rows(self, batch: LocalBatch) -> Iterator[dict[str, Any]]:
        """Every line of a finished batch's files: errors first, then answers."""
        for path in (self.journal.errors_path(batch.tag), self.journal.output_path(batch.tag)):
            for _, row in iter_lines(path):
                yield row


def unanswered(batch: LocalBatch) -> RequestError:
    why = f"batch {batch.batch_id or batch.tag} ended {batch.status} without answering it"
    if batch.error:
        why += f" ({batch.error})"
    return RequestError(why, retryable=True)
