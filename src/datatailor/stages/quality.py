"""`quality.rate`: an AlpaGasus-style 0–5 rating of each pair, stored in `metadata.quality`.

With `min_score` it is also AlpaGasus's filter: pairs rated below it are dropped with the score as
the reason (AlpaGasus kept pairs rated ≥ 4.5).

A rating that does not parse (after the model's re-asks) loses no pair by default (`unparsable: keep`): the pair
goes on unrated — `metadata.<key>` is null, the judge's error is the reason of its lineage event — so a later stage
still sees it (CoachLM's `coach.revise` revises an unrated pair: its gate leaves alone only pairs rated high), and
the reports count it as unrated. `unparsable: drop` makes it a `parse_error` failure row instead.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datatailor.errors import ParseFailure, Rejected
from datatailor.scoring.logprob import ScoreNotLocated
from datatailor.scoring.quality import QUALITY_TEMPLATE, SCORE_MAX, SCORE_MIN, rate_pair
from datatailor.records import LineageEvent, Record
from datatailor.stages.base import MapStage, StageConfig, register
from datatailor.stages.contract import Contract


class QualityRateConfig(StageConfig):
    type: Literal["quality.rate"] = "quality.rate"
    role: str = Field("judge", description="Model role that rates.")
    template: str = Field(QUALITY_TEMPLATE, description="Rating prompt; must ask for a 0-5 score on the first lines.")
    key: str = Field("quality", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Store the score in metadata.<key>.")
    min_score: float | None = Field(
        None, ge=SCORE_MIN, le=SCORE_MAX, description="Drop pairs rated below this (AlpaGasus used 4.5); none: keep all."
    )
    temperature: float | None = Field(0.0, description="Rater temperature.")
    scoring: Literal["sampled", "logprob"] = Field(
        "sampled", description="sampled: the score the rater wrote; logprob: the expected score over the 0-5 score tokens."
    )
    max_tokens: int | None = Field(None, description="Override the model's max_tokens for the rating.")
    unparsable: Literal["keep", "drop"] = Field(
        "keep",
        description=(
            "A pair whose rating does not parse after the re-asks: keep: it goes on unrated (metadata.<key> null, the "
            "reason in its lineage; with min_score it is not filtered) and reports count it; drop: a parse_error failure."
        ),
    )


@register("quality.rate")
class QualityRate(MapStage[QualityRateConfig]):
    """Rate each pair 0–5 for accuracy and helpfulness; optionally drop low-rated pairs."""

    Config = QualityRateConfig
    needs = ("response",)
    templates = {"template": ("instruction", "input", "response")}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        return Contract.of(cls.needs, [f"metadata.{config.key}"] if config is not None else [])

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        if not record.response:
            raise Rejected("nothing to rate: the pair has no response", kind="missing_field")
        model = self.ctx.model(cfg.role)
        try:
            gen = await rate_pair(
                model,
                record,
                template=cfg.template,
                seed_key=(self.name, record.id),
                base_dir=self.ctx.base_dir,
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                mode=cfg.scoring,
                stage=self.name,
            )
        except (ParseFailure, ScoreNotLocated) as exc:
            if cfg.unparsable == "drop":
                raise
            # Unrated, not dropped: what the judge could not rate is still the pair's to keep (its tokens are in usage.json).
            event = LineageEvent(stage=self.name, role=cfg.role, model=model.name, decision="unrated", reason=str(exc))
            return [record.with_event(event, metadata={**record.metadata, cfg.key: None})]
        score = float(gen.value)
        if cfg.min_score is not None and score < cfg.min_score:
            raise Rejected(f"quality score {score:g} is below min_score {cfg.min_score:g}", kind="low_quality")
        event = gen.event(self.name, decision="rated", reason=f"score {score:g}", score=score, reply=gen.text.strip()[:500], **gen.detail())
        return [record.with_event(event, metadata={**record.metadata, cfg.key: score})]
