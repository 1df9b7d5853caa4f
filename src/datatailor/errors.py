"""Typed errors.

Three families, handled differently by the runner:

* `UserError`: something the user can fix (bad file, recipe, missing key). The CLI prints one clear
  message and exits with code 2. Nothing already written is touched.
* `RecordFailure`: one record could not be processed (a reply that never parsed, a server error
  after all retries, a filter that dropped it). The runner writes a failure row of that `kind` and
  moves on.
* `RunAbort`: the run cannot go on (dead server, bad credentials, budget spent). The runner stops
  starting new work, lets in-flight work finish, checkpoints, and ends with a status.
"""

from __future__ import annotations

from typing import Any


class DatatailorError(Exception):
    """Base class of every error datatailor raises on purpose."""


class UserError(DatatailorError):
    """A mistake in input, recipe or environment. Printed as one message; exit code 2."""


class RecordFailure(DatatailorError):
    """One record failed; becomes a row in failures.jsonl."""

    kind: str = "error"

    def __init__(self, message: str, kind: str | None = None, record: Any = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        # Optional: the input record with the lineage of what was tried, shown in the failure row
        # instead of the bare input (same id), so a dropped row explains itself.
        self.record = record


class Rejected(RecordFailure):
    """A stage decided to drop a record (a filter, a duplicate, a gap below threshold)."""

    kind = "rejected"


class ParseFailure(RecordFailure):
    """The model's reply did not parse after every repair and re-ask."""

    kind = "parse_error"


class LLMCallFailure(RecordFailure):
    """A model call failed after all retries (server errors, timeouts, refused request)."""

    kind = "llm_error"


class RunAbort(DatatailorError):
    """Stop the whole run. `status` goes into manifest.json."""

    status: str = "interrupted"


class BudgetExhausted(RunAbort):
    """The recipe's budget is spent: no new model calls start."""

    status = "budget_exhausted"


class ServerUnavailable(RunAbort, UserError):
    """The model server is unreachable or keeps failing (circuit breaker open), or rejects our key."""

    status = "interrupted"
