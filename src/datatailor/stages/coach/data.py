"""CoachLM's per-record data: the `coach` namespace of a revised (or kept) pair."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datatailor.stages.contract import register_capability
from datatailor.stages.namespace import Namespace

# Why an original pair was kept instead of the coach's revision.
KeptReason = Literal[
    "unparsable", "empty_field", "too_short", "too_long", "copies_prompt", "truncated", "unchanged", "rated_high"
]


class CoachData(Namespace):
    key = "coach"

    mode: Literal["trained", "prompted"]
    original: dict[str, str]  # instruction, input, response before revision
    revision: dict[str, str] | None = None  # what the coach proposed (parsed), also when it was not used
    revised: bool = False  # the record now holds the revision
    kept_original: KeptReason | None = None
    reason: str | None = None
    edit_distance: int = Field(0, description="Characters changed from the original pair to the record's pair.")
    changed: list[str] = Field(default_factory=list, description="Fields the revision changed: instruction, input, response.")
    raw_output: str | None = None
    non_english_removed: int = Field(
        0, description="Characters of other scripts the cleanup removed from the revision of an English pair."
    )
    unrated: bool = Field(
        False, description="The rating gate found no rating (the judge's rating did not parse), so the coach revised it."
    )


register_capability("coach.revised", "a CoachLM revision (coach.revise)", lambda r: CoachData.of(r) is not None)
