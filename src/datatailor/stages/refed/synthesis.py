"""`refed.synthesize` (new instructions per reference feature), `refed.respond` (a draft with the reference pair
as the worked example) and `refed.improve` (the draft improved by the feedback: the training target)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import Field

from datatailor.errors import RecordFailure
from datatailor.llm.models import Generation
from datatailor.records import Record, inherit_once
from datatailor.stages.base import RECORD_VARIABLES, MapStage, StageConfig, register
from datatailor.stages.codec.parsers import text_key
from datatailor.stages.contract import Contract
from datatailor.stages.refed.data import FEATURES, Feature, Improvement, Instructions, RefedData
from datatailor.stages.refed.feedback import ask_json

# ----------------------------------------------------------------------------- refed.synthesize


def clean_instructions(items: list[Any], reference: str) -> list[str]:
    """Usable new instructions: strings, stripped, without duplicates or copies of the reference."""
    seen = {text_key(reference)}
    out: list[str] = []
    for item in items:
        text = item.strip() if isinstance(item, str) else ""
        key = text_key(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def exactly(obj: Instructions, n: int, reference: str) -> list[str]:
    """n usable instructions (extra ones cut); fewer is a ValueError, so the reply is re-asked."""
    items = clean_instructions(obj.instructions, reference)
    if len(items) < n:
        raise ValueError(f"{len(items)} new, distinct instructions in the list; {n} were asked for")
    return items[:n]


def at_least_one(obj: Instructions, reference: str) -> list[str]:
    """What the last re-ask gave, when short: every usable instruction (the shortfall is recorded)."""
    items = clean_instructions(obj.instructions, reference)
    if not items:
        raise ValueError("no usable instruction in the list")
    return items


def per_feature_counts(features: int, per_feature: int, quota: int | None) -> list[int]:
    """How many new instructions to ask of each feature: `per_feature` each, or, for a reference asked for fewer
    pairs than that (the last one a budget needs), its quota spread over the features, the first ones taking the
    remainder (quota 5 over 2 features: 3 and 2; quota 1: 1 and 0, and no call for the second)."""
    if quota is None or quota >= features * per_feature:
        return [per_feature] * features
    base, rest = divmod(quota, features)
    return [base + (i < rest) for i in range(features)]


class SynthesizeConfig(StageConfig):
    type: Literal["refed.synthesize"] = "refed.synthesize"
    role: str = Field("teacher", description="The teacher model.")
    template: str = "refed/synthesize.j2"
    features: list[Feature] = Field(default_factory=lambda: list(FEATURES), description="Instruction features, one call each (the paper: both).")
    per_feature: int = Field(10, ge=1, description="New instructions per feature call (the paper: 10).")
    temperature: float | None = Field(1.0, description="Sampling temperature (the paper's code: 1.0).")
    max_tokens: int | None = None


@register("refed.synthesize")
class Synthesize(MapStage[SynthesizeConfig]):
    """Instruction synthesis (Mehri et al., arXiv 2502.04511): per reference and per instruction feature, one call
    writes `per_feature` new instructions of similar complexity and length to the reference's (fewer for a reference
    whose quota is smaller: the last one the budget needs, see `per_feature_counts`). The count is enforced:
    extra ones are cut, a short list is re-asked within the parse-retry budget, and what the last re-ask gave is kept
    with the shortfall in lineage. Each instruction is a new record inheriting the reference's namespace; a failed
    feature call loses that feature's instructions only."""

    Config = SynthesizeConfig
    method = "refed"
    needs = ("refed.instruction_feedback",)
    provides = ("instruction",)
    clears = ("response",)
    templates = {"template": ("reference_instruction", "feature_name", "feature_text", "n")}

    async def _feature(self, record: Record, data: RefedData, feature: Feature, n: int) -> Generation[list[str]]:
        cfg = self.config
        ref = data.reference_instruction
        text = getattr(data, feature)
        gen = await self.call(
            cfg.role, "template",
            {"reference_instruction": json.dumps(ref, ensure_ascii=False), "feature_name": feature.replace("_", " "),
             "feature_text": json.dumps(text, ensure_ascii=False), "n": n},
            schema=Instructions, parse=lambda obj: exactly(obj, n, ref), accept_last=lambda obj: at_least_one(obj, ref),
            seed_key=(self.name, record.id, feature), temperature=cfg.temperature, max_tokens=cfg.max_tokens,
        )
        if gen.truncated:
            raise RecordFailure(f"the {feature} instruction list was cut off by max_tokens; raise max_tokens", kind="truncated")
        return gen

    async def process(self, record: Record) -> list[Record]:
        data = RefedData.of(record)
        assert data is not None
        present = [f for f in self.config.features if getattr(data, f)]
        counts = per_feature_counts(len(present), self.config.per_feature, data.quota)
        features = [(f, n) for f, n in zip(present, counts) if n]
        results = await asyncio.gather(*(self._feature(record, data, f, n) for f, n in features), return_exceptions=True)
        children: list[Record] = []
        failures: list[str] = []
        for (feature, n), result in zip(features, results):
            if isinstance(result, RecordFailure):
                failures.append(f"{feature}: {result}")
                continue
            if isinstance(result, BaseException):
                raise result
            for i, text in enumerate(result.value):
                child = record.child(("refed.synthesize", feature, text_key(text)), instruction=text, input="", response=None)
                child.metadata = data.update(feature=feature, feature_text=getattr(data, feature)).stored(child)
                event = result.event(self.name, decision="synthesized", feature=feature, index=i,
                                     requested=n, returned=len(result.value))
                if i:
                    event.prompt_tokens = event.completion_tokens = 0
                    event.cost_usd = 0.0
                    event.details["shared_call"] = True
                child.lineage.append(event)
                children.append(child)
        if not children:
            raise RecordFailure("no instruction was synthesized: " + "; ".join(failures or ["no feature text"]), kind="synthesis_failed")
        inherit_once(children, record)
        return children


# ----------------------------------------------------------------------------- refed.respond


class RespondConfig(StageConfig):
    type: Literal["refed.respond"] = "refed.respond"
    role: str = Field("teacher", description="The teacher model.")
    template: str = Field("refed/respond.j2", description="Answers with the reference pair as the one worked example.")
    temperature: float | None = Field(1.0, description="Sampling temperature (the paper's code: 1.0).")
    max_tokens: int | None = None
    keep_truncated: bool = Field(False, description="Keep a draft cut off by max_tokens (default: the pair fails as `truncated`).")


@register("refed.respond")
class Respond(MapStage[RespondConfig]):
    """Response generation (Mehri et al., arXiv 2502.04511): one call per new instruction, with the reference pair
    as the single worked example. The answer is the draft (`refed.draft`), and the record's response until improved."""

    Config = RespondConfig
    method = "refed"
    needs = ("instruction", "refed.reference")
    provides = ("response", "refed.draft", "metadata.refed.draft")
    templates = {"template": RECORD_VARIABLES}

    async def process(self, record: Record) -> list[Record]:
        data = RefedData.of(record)
        assert data is not None
        gen = await self.answer(
            self.config.role, record, template_field="template", seed_key=(self.name, record.id),
            keep_truncated=self.config.keep_truncated, temperature=self.config.temperature, max_tokens=self.config.max_tokens,
        )
        draft = gen.text.strip()
        return [record.with_event(gen.event(self.name, decision="drafted"), response=draft, metadata=data.update(draft=draft).stored(record))]


# ----------------------------------------------------------------------------- refed.improve


class ImproveConfig(StageConfig):
    type: Literal["refed.improve"] = "refed.improve"
    role: str = Field("teacher", description="The teacher model.")
    template: str = "refed/improve.j2"
    feedback: Literal["reference", "sample"] = Field(
        "reference", description="reference: the reference's response feedback (REFED); sample: the pair's own (the ablation)."
    )
    temperature: float | None = Field(1.0, description="Sampling temperature (the paper's code: 1.0).")
    max_tokens: int | None = None


@register("refed.improve")
class Improve(MapStage[ImproveConfig]):
    """Response improvement (Mehri et al., arXiv 2502.04511): one call per pair applies the relevant parts of the
    feedback and returns an analysis, a strategy and the improved response. The improved response becomes the
    training target; the draft, analysis and strategy stay in `metadata.refed`. A reply that does not parse, is
    empty or is cut off costs this pair only."""

    Config = ImproveConfig
    method = "refed"
    needs = ("refed.draft", "refed.response_feedback")
    provides = ("response",)
    templates = {"template": ("instruction", "response", "feedback")}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        feedback = "refed.sample_feedback" if config is not None and config.feedback == "sample" else "refed.response_feedback"
        return Contract.of(["refed.draft", feedback], cls.provides)

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        data = RefedData.of(record)
        assert data is not None and data.draft is not None
        feedback = data.sample_feedback if cfg.feedback == "sample" else data.response_feedback
        if not feedback:  # the contract checks the order; this keeps a pair from being "improved" by nothing
            raise RecordFailure(f"the pair has no {cfg.feedback}-level response feedback to apply", kind="missing_feedback")
        gen = await ask_json(
            self, cfg.role, "template",
            {"instruction": json.dumps(record.prompt, ensure_ascii=False), "response": json.dumps(data.draft, ensure_ascii=False),
             "feedback": json.dumps(feedback, ensure_ascii=False)},
            Improvement, seed_key=(self.name, record.id), what="improvement",
            temperature=cfg.temperature, max_tokens=cfg.max_tokens,
        )
        improvement: Improvement = gen.value
        improved = improvement.improved_response.strip()
        if not improved:
            raise RecordFailure("the improved response is empty", kind="empty_response")
        updated = data.update(
            analysis=improvement.analysis.model_dump(), strategy=improvement.implementation_strategy.model_dump(),
            feedback_applied=cfg.feedback,
        )
        event = gen.event(self.name, decision="improved", feedback=cfg.feedback)
        return [record.with_event(event, response=improved, metadata=updated.stored(record))]
