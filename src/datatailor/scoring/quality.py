"""Data-quality rating: an AlpaGasus-style 0–5 score per pair, and CoachLM's summary of it.

A judge model rates each (instruction, input, response) on 0–5 (prompt: prompts/eval/quality_rating.j2).
The summary is CoachLM's (arXiv 2311.13246): the mean, a histogram over the buckets
[0, 3.5) [3.5, 4) [4, 4.5) [4.5, 5], and the high-quality share (score ≥ 4.5), its headline metric.
The summary functions are pure; only `rate_pair` calls a model.

`rate_pair(..., mode="logprob")` reads the rating as the expectation over the score tokens 0–5 where
the judge wrote it (temperature 0, top-20 logprobs; see `scoring.logprob`) instead of the written number.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields as dataclass_fields
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict

from datatailor.llm.models import Generation, RoleModel
from datatailor.llm.structured import parse_single_score
from datatailor.prompts import load_prompt
from datatailor.records import Record
from datatailor.scoring.judge import SCORING_MODES, ScoringMode
from datatailor.scoring.logprob import LOGPROB_SAMPLING, require_expected

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


@dataclass
class Rating(Generation[float]):
    """A rating call: `.value` is the score used (the expected one in `logprob` mode)."""

    scoring: ScoringMode = "sampled"
    sampled_value: float | None = None  # the number the judge wrote
    distribution: dict[int, float] | None = None  # logprob mode: renormalised P(score)

    def detail(self) -> dict[str, Any]:
        """What to add to a lineage event: empty in `sampled` mode (so its events stay as they were)."""
        if self.scoring == "sampled":
            return {}
        return {"scoring": self.scoring, "sampled_score": self.sampled_value,
                "distribution": {str(k): round(v, 4) for k, v in (self.distribution or {}).items()}}


async def rate_pair(
    model: RoleModel,
    record: Record,
    *,
    template: str = QUALITY_TEMPLATE,
    seed_key: Any = None,
    base_dir: Any = None,
    mode: ScoringMode = "sampled",
    **sampling: Any,
) -> Rating:
    """Ask `model` for the 0–5 rating of one pair; the score is `.value`.

    `mode="logprob"` asks at temperature 0 for the top-20 logprobs (overriding `temperature` and
    `top_logprobs` in `sampling`) and makes `.value` the expected score; the written one stays in
    `.sampled_value`. A backend that returns no logprobs raises `LogprobsUnavailable` (a UserError); a
    reply whose score cannot be found in its tokens raises `ScoreNotLocated` (a RecordFailure).
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {', '.join(SCORING_MODES)}")
    if mode == "logprob":
        sampling = {**sampling, **LOGPROB_SAMPLING}
    prompt = load_prompt(template, base_dir)
    variables = {"instruction": record.instruction, "input": record.input, "response": record.response or ""}
    gen = await model.generate(
        prompt, variables, parse=partial(parse_single_score, low=SCORE_MIN, high=SCORE_MAX), seed_key=seed_key, **sampling
    )
    fields = {f.name: getattr(gen, f.name) for f in dataclass_fields(gen)}
    if mode == "sampled":
        return Rating(**fields, sampled_value=gen.value)
    who = f"{model.role} ({model.name}, backend {getattr(model.config, 'backend', '?')})"
    (estimate,) = require_expected(gen.logprobs, [gen.value], int(SCORE_MIN), int(SCORE_MAX), who=who)
    fields["value"] = round(estimate.expected, 4)
    return Rating(**fields, scoring="logprob", sampled_value=gen.value, distribution=estimate.distribution)
