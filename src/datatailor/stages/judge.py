"""`judge.pairwise`: score two answers to one question on 1–10 in both orders; keep the raw scores."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datatailor.errors import Rejected
from datatailor.scoring.judge import SCORES_ONLY, judge_pair
from datatailor.records import FIELD_PATTERN, WRITABLE_FIELD, Record, field_update, read_field
from datatailor.stages.base import MapStage, StageConfig, register
from datatailor.stages.contract import Contract


class PairwiseJudgeConfig(StageConfig):
    type: Literal["judge.pairwise"] = "judge.pairwise"
    role: str = Field("judge", description="Model role that judges.")
    question: str = Field("prompt", pattern=FIELD_PATTERN, description="Field holding the question.")
    a: str = Field("response", pattern=FIELD_PATTERN, description="Field holding answer A.")
    b: str = Field("metadata.reference", pattern=FIELD_PATTERN, description="Field holding answer B.")
    rule: Literal["mean", "strict", "lenient"] = Field(
        "strict", description="mean: average both orders; strict: win both orders (CodecLM); lenient: AlpaGasus."
    )
    template: str = Field(SCORES_ONLY, description="Judge prompt template; must ask for two scores on the first line.")
    output: str = Field("metadata.judge", pattern=WRITABLE_FIELD, description="Where the scores and verdict go.")
    keep: Literal["all", "a", "b"] = Field(
        "all",
        description=(
            "all: keep every record; a (or b): a filter that keeps a record only when that answer wins under `rule` "
            "(e.g. REFED's judge filter: the improved response A must beat the draft B in both orders); the others "
            "are dropped as `judge_filter`, their scores in the failure row."
        ),
    )
    temperature: float | None = Field(0.0, description="Judge temperature (the papers use 0).")
    scoring: Literal["sampled", "logprob"] = Field(
        "sampled",
        description=(
            "sampled: the scores the judge wrote (the papers); logprob: the expected score over the score tokens' "
            "probabilities, where the backend exposes them (llama.cpp, transformers, OpenAI logprobs)."
        ),
    )


@register("judge.pairwise")
class PairwiseJudge(MapStage[PairwiseJudgeConfig]):
    """Judge answer A against answer B; stores both orders' raw scores, means, verdict and consistency.

    With `keep: a` it is a filter: a record is kept only when A wins under `rule` (REFED's LLM-judge filter keeps
    a pair when its improved response beats the draft; usable on any method's output)."""

    Config = PairwiseJudgeConfig
    templates = {"template": ("question", "answer_1", "answer_2")}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        if config is None:
            return Contract.of()
        return Contract.of(needs=[config.question, config.a, config.b], provides=[config.output])

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        texts = {f: read_field(record, f) for f in (cfg.question, cfg.a, cfg.b)}
        missing = [f for f, v in texts.items() if not v]
        if missing:
            raise Rejected(f"nothing to judge: empty field(s) {', '.join(missing)}", kind="missing_field")
        scores, gens = await judge_pair(
            self.ctx.model(cfg.role),
            texts[cfg.question],
            texts[cfg.a],
            texts[cfg.b],
            template=cfg.template,
            seed_key=(self.name, record.id),
            base_dir=self.ctx.base_dir,
            temperature=cfg.temperature,
            mode=cfg.scoring,
            stage=self.name,
        )
        summary = scores.summary(cfg.rule)
        event = gens[0].event(self.name, decision=f"verdict:{summary['verdict']}", reason=f"{cfg.rule} rule", **summary)
        event.prompt_tokens += gens[1].prompt_tokens
        event.completion_tokens += gens[1].completion_tokens
        event.cost_usd += gens[1].cost_usd
        judged = record.with_event(event, **field_update(record, cfg.output, summary))
        if cfg.keep != "all" and summary["verdict"] != cfg.keep:
            raise Rejected(
                f"{cfg.a if cfg.keep == 'a' else cfg.b} did not win under the {cfg.rule} rule (verdict {summary['verdict']}; "
                f"scores with A first {summary['a_first']}, with B first {summary['b_first']})",
                kind="judge_filter", record=judged,
            )
        return [judged]
