"""`codec.contrastive`: Contrastive Filtering with Self-Rubrics improvement, and the CodecLM report."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import Field

from datatailor.errors import RecordFailure, Rejected
from datatailor.llm.models import Generation
from datatailor.records import LineageEvent, Record
from datatailor.report.codec import run_file_rows, write_codec_report
from datatailor.scoring.judge import SCORES_ONLY, PairwiseScores, judge_pair
from datatailor.stages.base import MapStage, StageConfig, register
from datatailor.stages.codec.data import METADATA_FILE, POOL_FILE, ActionStep, CodecData, ContrastiveResult, entry_key
from datatailor.stages.codec.generation import improve_instruction, pick_action
from datatailor.stages.contract import Contract


class ContrastiveConfig(StageConfig):
    type: Literal["codec.contrastive"] = "codec.contrastive"
    strong_role: str = Field("strong", description="Model whose answers are distilled.")
    target_role: str = Field(
        "target", description="Model that stands for the target (the paper used an instruction-tuned sibling)."
    )
    judge_role: str = Field("strong", description="Scorer S (the paper: the strong model itself).")
    improver_role: str = Field("strong", description="Model that rewrites instructions between iterations.")
    threshold: float = Field(3.0, ge=0, description="Keep when |G| > threshold (paper: 3 on the 1–10 scale).")
    max_iterations: int = Field(4, ge=1, description="Iterations, counting basic generation as the first (paper: 4).")
    keep_below_threshold: bool = Field(
        False, description="Keep what is still within the threshold after the last iteration (flagged) instead of dropping it."
    )
    respond_template: str = "respond.j2"
    judge_template: str = Field(SCORES_ONLY, description="Pairwise scorer prompt; two scores on the first line.")
    improve_template: str = "codec/improve.j2"
    judge_temperature: float | None = Field(0.0, description="Scorer temperature (not given by the paper).")
    scoring: Literal["sampled", "logprob"] = Field(
        "sampled",
        description=(
            "sampled: the two numbers the scorer wrote (the paper); logprob: expected scores over the score tokens' "
            "probabilities (llama.cpp, transformers, OpenAI), steadier with small judges."
        ),
    )
    improve_temperature: float | None = Field(0.7, description="Improver temperature (paper: 0.7).")
    response_max_tokens: int | None = Field(None, description="Override max_tokens of both answers.")
    keep_truncated: bool = Field(
        False,
        description=(
            "Keep a pair whose kept answer was cut off by max_tokens (default: such an instruction fails as `truncated`; "
            "a cut-off target answer is still judged, since running out of room is how the target behaves)."
        ),
    )
    consistency_threshold: float = Field(
        0.6, ge=0, le=1,
        description="The report warns that G is dominated by answer order when the judge's position consistency is below this.",
    )
    report: bool = Field(True, description="Write codec_report.json/.md/.html into this stage's folder.")


def named_scores(scores: PairwiseScores) -> dict[str, Any]:
    """The four raw scores with their sides named: strong is side A, target side B."""
    return {
        "strong_shown_first": {"strong": scores.a_first[0], "target": scores.a_first[1]},
        "target_shown_first": {"strong": scores.b_first[0], "target": scores.b_first[1]},
        "mean_strong": scores.mean_a,
        "mean_target": scores.mean_b,
        "position_consistent": scores.position_consistent,
    }


@register("codec.contrastive")
class Contrastive(MapStage[ContrastiveConfig]):
    """Contrastive Filtering with Self-Rubrics improvement (CodecLM, Wang et al., NAACL 2024, arXiv 2404.05875).

    Per iteration: strong and target answer; the judge scores both in both orders; G = S_strong − S_target
    (means over the orders). |G| > θ: keep (I, strong answer) when G > 0, (I, target answer) when G < 0.
    Otherwise rewrite I with a sampled action and try again, up to `max_iterations` (basic generation is the
    first). Still within θ at the end: rejected as `below_threshold`, or, with `keep_below_threshold`, kept
    with the strong answer and flagged (`codec.contrastive.below_threshold`). An answer cut off by max_tokens
    is a `truncated` failure: it is never kept as a training target.
    """

    Config = ContrastiveConfig
    method = "codec"
    needs = ("instruction",)
    provides = ("response",)
    templates = {
        "respond_template": ("id", "instruction", "input", "response", "prompt", "metadata"),
        "judge_template": ("question", "answer_1", "answer_2"),
        "improve_template": ("instruction", "action"),
    }

    @classmethod
    def contract(cls, config: Any) -> Contract:
        needs = list(cls.needs)
        if config is not None and config.max_iterations > 1:
            needs.append("codec.actions")  # iterations after the first rewrite by a Self-Rubrics action
        return Contract.of(needs, cls.provides, cls.clears)

    async def _improve(self, record: Record, instruction: str, iteration: int, events: list[LineageEvent]) -> tuple[str, ActionStep]:
        """Rewrite `instruction` by one action sampled from the entry's actions; returns it and the chain step."""
        cfg = self.config
        index, action, rubric = pick_action(record, self.ctx.rng(record.id, "action", iteration))
        gen = await improve_instruction(
            self, cfg.improver_role, "improve_template", instruction, action,
            seed_key=(self.name, record.id, iteration, index), temperature=cfg.improve_temperature,
        )
        events.append(gen.event(self.name, decision="improved", iteration=iteration, action=action, rubric=rubric))
        return gen.value, ActionStep(action=action, rubric=rubric, before=instruction, iteration=iteration)

    async def _score(
        self, record: Record, instruction: str, iteration: int, events: list[LineageEvent]
    ) -> tuple[str, str, bool, PairwiseScores]:
        """Both answers, judged in both orders: (strong answer, target answer, whether the target's was cut off, scores)."""
        cfg = self.config
        key = (self.name, record.id, iteration)
        asked = record.model_copy(update={"instruction": instruction, "response": None})
        strong, target = await asyncio.gather(
            self.answer(cfg.strong_role, asked, seed_key=(*key, "strong"), max_tokens=cfg.response_max_tokens,
                        keep_truncated=cfg.keep_truncated),
            self.answer(cfg.target_role, asked, seed_key=(*key, "target"), max_tokens=cfg.response_max_tokens,
                        keep_truncated=True),
            return_exceptions=True,
        )
        for side, gen in (("strong", strong), ("target", target)):
            if isinstance(gen, BaseException):
                raise gen
            events.append(gen.event(self.name, decision="answered", iteration=iteration, side=side))
        assert isinstance(strong, Generation) and isinstance(target, Generation)
        strong_text, target_text = strong.text.strip(), target.text.strip()
        scores, judged = await judge_pair(
            self.ctx.model(cfg.judge_role), asked.prompt, strong_text, target_text,
            template=cfg.judge_template, base_dir=self.ctx.base_dir, seed_key=key, temperature=cfg.judge_temperature,
            mode=cfg.scoring, stage=self.name,
        )
        event = judged[0].event(self.name, decision="scored", iteration=iteration, G=scores.gap, **named_scores(scores))
        event.prompt_tokens += judged[1].prompt_tokens
        event.completion_tokens += judged[1].completion_tokens
        event.cost_usd += judged[1].cost_usd
        events.append(event)
        return strong_text, target_text, target.truncated, scores

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        events: list[LineageEvent] = []
        history: list[dict[str, Any]] = []
        chain: list[ActionStep] = list(CodecData.get(record).action_chain)
        instruction = record.instruction
        strong_text = target_text = ""
        try:
            for iteration in range(1, cfg.max_iterations + 1):
                step: dict[str, Any] = {"iteration": iteration}
                if iteration > 1:
                    instruction, link = await self._improve(record, instruction, iteration, events)
                    chain.append(link)
                    step.update(action=link.action, rubric=link.rubric)
                step["instruction"] = instruction
                history.append(step)
                strong_text, target_text, target_truncated, scores = await self._score(record, instruction, iteration, events)
                step.update(scores=named_scores(scores), G=scores.gap)
                if abs(scores.gap) > cfg.threshold:
                    side = "strong" if scores.gap > 0 else "target"
                    if side == "target" and target_truncated and not cfg.keep_truncated:
                        raise RecordFailure(
                            f"G = {scores.gap:+.2f} keeps the target's answer, but it was cut off by max_tokens", kind="truncated"
                        )
                    return [self._kept(record, instruction, side, strong_text, target_text, history, chain, events, False)]
        except RecordFailure as failure:
            failure.record = self._trace(record, history, chain, events)
            raise
        if cfg.keep_below_threshold:
            # Within θ neither answer is clearly better; the target's answer is kept only when it clearly wins.
            return [self._kept(record, instruction, "strong", strong_text, target_text, history, chain, events, True)]
        gaps = ", ".join(f"{h['G']:+.2f}" for h in history)
        events.append(LineageEvent(
            stage=self.name, decision="dropped", reason=f"|G| <= {cfg.threshold} after {len(history)} iteration(s)",
            details={"gaps": [h["G"] for h in history]},
        ))
        raise Rejected(
            f"|G| stayed within the threshold {cfg.threshold} for {len(history)} iteration(s): G = {gaps}",
            kind="below_threshold",
            record=self._trace(record, history, chain, events),
        )

    def _result(self, history: list[dict[str, Any]], kept: Literal["strong", "target"] | None, below: bool, **answers: str) -> ContrastiveResult:
        last = history[-1] if history else {}
        return ContrastiveResult(
            kept=kept, below_threshold=below, iteration=len(history), G=last.get("G"), scores=last.get("scores"),
            threshold=self.config.threshold, history=history, **answers,
        )

    def _trace(self, record: Record, history: list[dict[str, Any]], chain: list[ActionStep], events: list[LineageEvent]) -> Record:
        """The input record with everything that was tried: what a failure row shows."""
        traced = record.model_copy(deep=True)
        data = CodecData.get(record).update(action_chain=chain, contrastive=self._result(history, None, False))
        traced.metadata = data.stored(traced)
        traced.lineage.extend(events)
        return traced

    def _kept(
        self, record: Record, instruction: str, side: Literal["strong", "target"], strong_text: str, target_text: str,
        history: list[dict[str, Any]], chain: list[ActionStep], events: list[LineageEvent], below: bool,
    ) -> Record:
        result = self._result(history, side, below, strong_response=strong_text, target_response=target_text)
        reason = (
            f"|G| = {abs(result.G or 0):.2f} <= {self.config.threshold} after the last iteration; kept by keep_below_threshold"
            if below else f"G = {result.G:+.2f}, |G| > {self.config.threshold}"
        )
        out = record.child(
            ("codec.contrastive", len(history)),
            instruction=instruction,
            response=strong_text if side == "strong" else target_text,
        )
        data = CodecData.get(record).update(action_chain=chain, contrastive=result, entry_id=entry_key(record))
        out.metadata = data.stored(out)
        out.lineage.extend(events)
        out.lineage.append(LineageEvent(
            stage=self.name, decision=f"kept:{side}", reason=reason,
            details={"iteration": len(history), "G": result.G, "below_threshold": below},
        ))
        return out

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:
        if not self.config.report:
            return
        pool_file = self.ctx.earlier_artifact(METADATA_FILE)
        pool_info = self.ctx.earlier_artifact(POOL_FILE)
        requested = json.loads(pool_info.read_text(encoding="utf-8")).get("requested") if pool_info else None
        write_codec_report(
            self.ctx.artifacts_dir,
            kept=outputs,
            dropped=failures,
            pool=run_file_rows(pool_file) if pool_file else [],
            threshold=self.config.threshold,
            max_iterations=self.config.max_iterations,
            budget_pairs=self.ctx.budget_pairs,
            pool_requested=requested,
            consistency_threshold=self.config.consistency_threshold,
        )
