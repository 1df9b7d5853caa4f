"""The systematic-failure probe: a stage whose first records all fail the same way stops the run."""

from __future__ import annotations

from typing import Any

from datatailor.errors import RunAbort
from datatailor.runner.result import STATUS_INTERRUPTED

# How many times the window a run of cut-off replies must last before it counts as systematic.
TRUNCATION_WINDOW = 4


class SystematicFailureProbe:
    """Watches a map stage's first finished records: when the first `window` all fail with the same
    error (not a filter's decision), the stage is broken for every record — a template typo, a wrong
    model name — and the run stops instead of spending on the rest.

    A reply cut off by max_tokens (kind `truncated`) is a failure only in a stage that refuses cut
    replies (a training target, a list or JSON a parser must read whole); where a cut reply is usable
    (the candidate's answers in `eval` and the bake-off, the target's in Contrastive Filtering) the stage
    keeps it and the probe never sees it. Even where it is a failure, whether a reply runs past the limit
    depends on the record (a story runs longer than a definition), so a few cut replies in a row are not
    evidence that every record will fail: the probe waits for `TRUNCATION_WINDOW` × `window` of them
    (20 by default) before it stops, and its message says what happened and names the two ways on: a
    larger max_tokens, or keep_truncated where a cut reply is usable.

    Until it has decided, such failures are held back (not checkpointed), so that after the fix a
    re-run retries those records; once it has seen a success or a different error they are written.
    """

    def __init__(self, window: int, already_done: int):
        self.window = window
        self.open = window > 0 and already_done == 0
        self.seen = 0
        self.message: str | None = None
        self.kind: str | None = None
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
        self.message, self.kind = failure["message"], failure.get("kind")
        self.held.append(failure)
        if self.seen >= self.window * (TRUNCATION_WINDOW if self.kind == "truncated" else 1):
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
        if self.kind == "truncated":
            text = (f"stage {stage}: the first {self.seen} replies were all cut off at the same token limit, and this stage "
                    f"does not keep a cut reply; stopped before spending on the rest, most of which would likely be cut too. "
                    f"Raise max_tokens (or set keep_truncated: true where the stage has it and a cut reply is usable), then "
                    f"re-run the same command to resume. The first: {self.message}")
        else:
            text = (f"stage {stage}: the first {self.seen} records all failed with the same error, so it would fail for every "
                    f"record; stopped before spending on the rest. Fix it and re-run the same command to resume. "
                    f"The error: {self.message}")
        stop = RunAbort(text)
        stop.status = STATUS_INTERRUPTED
        return stop
