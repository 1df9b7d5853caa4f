"""Data-quality rating: an AlpaGasus-style 0–5 score per pair, and CoachLM's summary of it.

A judge model rates each (instruction, input, response) on 0–5 (prompt: prompts/eval/quality_rating.j2).
The summary is CoachLM's (methods.md §3.5): the mean, a histogram over the buckets
[0, 3.5) [3.5, 4) [4, 4.5) [4.5, 5], and the high-quality share (score ≥ 4.5), its headline metric.
The summary functions are pure; only `rate_pair` calls a model.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict

from datatailor.llm.models import Generation, RoleModel
from datatailor.llm.structured import parse_single_score
from datatailor.prompts import load_prompt
from datatailor.records import Record

QUALITY_TEMPLATE = "eval/quality_rating.j2"
SCORE_MIN, SCORE_MAX = 0.0, 5.0
HIGH_QUALITY = 4.5
# (label, lower bound inclusive, upper bound exclusive — except the last, which includes 5)
BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("[0,3.5)", 0.0, 3.5),
    ("[3.5,4)", 3.5, 4.0),
    ("[4,4.5)", 4.0, 4.5),
    ("[4.5,5]", 4.5, 5.0),
)


def bucket_of(score: float) -> str:
    """The histogram bucket label of a score in [0, 5]."""
    if not SCORE_MIN <= score <= SCORE_MAX:
        raise ValueError(f"quality score {score} is outside [0, 5]")
    for label, _low, high in BUCKETS[:-1]:
        if score < high:
            return label
    return BUCKETS[-1][0]


class QualitySummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    mean: float | None
    histogram: dict[str, int]
    shares: dict[str, float | None]
    high_quality_share: float | None


def summarize_quality(scores: Iterable[float]) -> QualitySummary:
    values = list(scores)
    counts = {label: 0 for label, _, _ in BUCKETS}
    for s in values:
        counts[bucket_of(s)] += 1
    n = len(values)
    return QualitySummary(
        n=n,
        mean=statistics.fmean(values) if values else None,
        histogram=counts,
        shares={label: (c / n if n else None) for label, c in counts.items()},
        high_quality_share=(sum(s >= HIGH_QUALITY for s in values) / n) if n else None,
    )


def stored_score(record: Record, key: str = "quality") -> float | None:
    """The rating a `quality.rate` stage stored in `metadata.<key>` (a number), if any."""
    value = record.metadata.get(key)
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def stored_scores(records: Sequence[Record], key: str = "quality") -> list[float]:
    return [s for r in records if (s := stored_score(r, key)) is not None]


async def rate_pair(
    model: RoleModel,
    record: Record,
    *,
    template: str = QUALITY_TEMPLATE,
    seed_key: Any = None,
    base_dir: Any = None,
    **sampling: Any,
) -> Generation[float]:
    """Ask `model` for the 0–5 rating of one pair; the parsed score is `.value`."""
    prompt = load_prompt(template, base_dir)
    variables = {"instruction": record.instruction, "input": record.input, "response": record.response or ""}
    return await model.generate(
        prompt, variables, parse=partial(parse_single_score, low=SCORE_MIN, high=SCORE_MAX), seed_key=seed_key, **sampling
    )
