"""The systematic-failure probe: a stage whose first records all fail the same way stops the run."""

from __future__ import annotations

from typing import Any

from datatailor.errors import RunAbort
from datatailor.runner.result import STATUS_INTERRUPTED


class SystematicFailureProbe:
    """Watches a map stage's first finished records: when the first `window` all fail with the same
    error (not a filter's decision), the stage is broken for every record — a template typo, a wrong
    model name — and the run stops instead of spending on the rest.

    Until it has decided, such failures are held back (not checkpointed), so that after the fix a
    re-run retries those records; once it has seen a success or a different error they are written.
    """

    def __init__(self, window: int, already_done: int):
        self.window = window
        self.open = window > 0 and already_done == 0
        self.seen = 0
        self.message: str | None = None
        self.held: list[dict[str, Any]] = []
        self.tripped = False

    def observe(self, failure: dict[str, Any] | None, decision: bool) -> list[dict[str, Any]]:
        """Feed one finished record (its failure row, or None for a success). Returns the rows to write now."""
        if self.tripped:
            return [] if failure is not None and failure["message"] == self.message else ([failure] if failure else [])
        if not self.open:
            return [failure] if failure else []
        self.seen += 1
        if failure is None or decision or (self.message is not None and failure["message"] != self.message):
            self.open = False
            rows, self.held = self.held, []
            return rows + ([failure] if failure else [])
        self.message = failure["message"]
        self.held.append(failure)
        if self.seen >= self.window:
            self.tripped = True
            self.held = []
        return []

    def finish(self) -> list[dict[str, Any]]:
        """At the end of the stage: trip when every record (at least 2) failed the same way; else release what is held."""
        if self.open and self.seen >= 2 and len(self.held) == self.seen:
            self.tripped = True
        rows, self.held = ([] if self.tripped else self.held), []
        return rows

    def abort(self, stage: str) -> RunAbort:
        stop = RunAbort(
            f"stage {stage}: the first {self.seen} records all failed with the same error, so it would fail for every "
            f"record; stopped before spending on the rest. Fix it and re-run the same command to resume. "
            f"The error: {self.message}"
        )
        stop.status = STATUS_INTERRUPTED
        return stop
