"""`refed.feedback` (once per reference) and `refed.sample_feedback` (once per generated pair, the ablation)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from datatailor.errors import RecordFailure
from datatailor.llm.models import Generation
from datatailor.records import Record
from datatailor.stages.base import MapStage, Stage, StageConfig, register
from datatailor.stages.contract import Contract
from datatailor.stages.refed.data import InstructionFeedback, RefedData, ResponseFeedback


def pair_json(instruction: str, response: str) -> str:
    """A pair as a JSON object, so quotes, braces and newlines in the texts cannot break the prompt's layout."""
    return json.dumps({"instruction": instruction, "response": response}, ensure_ascii=False)


async def ask_json(
    stage: Stage[Any], role: str, template_field: str, variables: dict[str, Any], schema: type[BaseModel], *,
    seed_key: Any, what: str, **sampling: Any,
) -> Generation[Any]:
    """One structured call; a reply cut off by max_tokens is a `truncated` failure (JSON repair could otherwise
    close it and pass half a text on)."""
    gen = await stage.call(role, template_field, variables, schema=schema, seed_key=seed_key, **sampling)
    if gen.truncated:
        raise RecordFailure(f"the {what} reply was cut off by max_tokens ({gen.model}); raise max_tokens", kind="truncated")
    return gen


class FeedbackConfig(StageConfig):
    type: Literal["refed.feedback"] = "refed.feedback"
    role: str = Field("teacher", description="The teacher model (the paper: gpt-4o-mini).")
    collect: list[Literal["instruction", "response"]] = Field(
        default_factory=lambda: ["instruction", "response"],
        description=(
            "instruction: the two instruction features (subject areas, skills); response: what makes the response "
            "effective and what would improve it. The ablation without response feedback collects instruction only."
        ),
    )
    instruction_template: str = "refed/instruction_feedback.j2"
    response_template: str = "refed/response_feedback.j2"
    temperature: float | None = Field(1.0, description="Sampling temperature (the paper's code: 1.0).")
    max_tokens: int | None = None


@register("refed.feedback")
class Feedback(MapStage[FeedbackConfig]):
    """Reference-level feedback (Mehri et al., arXiv 2502.04511), collected once per drawn reference: instruction
    feedback (the subject areas and the skills a good answer needs) and response feedback (what makes the response
    effective, what would improve it). Structured output; the pair is JSON-encoded into the prompt. A reference drawn
    again in a later pass reuses its feedback (one shared, checkpointed call; paid for once)."""

    Config = FeedbackConfig
    distributed = False  # its records share calls: one owner each, in one process
    method = "refed"
    needs = ("refed.reference",)
    provides = ("refed.instruction_feedback", "refed.response_feedback")
    templates = {"instruction_template": ("pair",), "response_template": ("pair",)}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        collect = config.collect if config is not None else ["instruction", "response"]
        provides = [c for kind, c in (("instruction", "refed.instruction_feedback"), ("response", "refed.response_feedback")) if kind in collect]
        return Contract.of(cls.needs, provides)

    async def _collect(self, data: RefedData, kind: str, owner: str) -> tuple[Generation[Any], bool]:
        cfg = self.config
        field, schema = (("instruction_template", InstructionFeedback) if kind == "instruction" else ("response_template", ResponseFeedback))

        async def make() -> Generation[Any]:
            return await ask_json(
                self, cfg.role, field, {"pair": pair_json(data.reference_instruction, data.reference_response)}, schema,
                seed_key=(self.name, data.reference_id, kind), what=f"{kind} feedback",
                temperature=cfg.temperature, max_tokens=cfg.max_tokens,
            )

        # The reply text is what is checkpointed; parse_feedback reads it, fresh or read back.
        return await self.shared_call(f"{data.reference_id}:{kind}", owner, make)

    async def process(self, record: Record) -> list[Record]:
        data = RefedData.of(record)
        assert data is not None  # the contract: refed.references came first
        kinds = [k for k in ("instruction", "response") if k in self.config.collect]
        results = await asyncio.gather(*(self._collect(data, k, record.id) for k in kinds))
        updates: dict[str, Any] = {}
        out = record.model_copy(deep=True)
        for kind, (gen, owner) in zip(kinds, results):
            value = parse_feedback(gen.text, kind)
            updates.update(value)
            event = gen.event(self.name, decision=f"{kind}_feedback", **value)
            if not owner:
                event.details["shared_call"] = f"{data.reference_id}:{kind}"
            out.lineage.append(event)
        out.metadata = data.update(**updates).stored(out)
        return [out]


def parse_feedback(text: str, kind: str) -> dict[str, str]:
    """The feedback fields of a reply that already parsed once (read back from the shared-call checkpoint too)."""
    from datatailor.llm.structured import parse_model

    if kind == "instruction":
        fb = parse_model(text, InstructionFeedback)
        return {"subject_areas": fb.subject_areas, "relevant_skills": fb.relevant_skills}
    return {"response_feedback": parse_model(text, ResponseFeedback).response_feedback}


class SampleFeedbackConfig(StageConfig):
    type: Literal["refed.sample_feedback"] = "refed.sample_feedback"
    role: str = Field("teacher", description="The teacher model.")
    template: str = "refed/response_feedback.j2"
    temperature: float | None = Field(1.0, description="Sampling temperature (as for reference-level feedback).")
    max_tokens: int | None = None


@register("refed.sample_feedback")
class SampleFeedback(MapStage[SampleFeedbackConfig]):
    """Sample-level response feedback, the paper's ablation: feedback on each generated pair itself (one call per
    pair, instead of one per reference), for `refed.improve` with `feedback: sample`."""

    Config = SampleFeedbackConfig
    method = "refed"
    needs = ("refed.draft",)
    provides = ("refed.sample_feedback",)
    templates = {"template": ("pair",)}

    async def process(self, record: Record) -> list[Record]:
        data = RefedData.of(record)
        assert data is not None and data.draft is not None
        gen = await ask_json(
            self, self.config.role, "template", {"pair": pair_json(record.prompt, data.draft)}, ResponseFeedback,
            seed_key=(self.name, record.id), what="sample feedback",
            temperature=self.config.temperature, max_tokens=self.config.max_tokens,
        )
        feedback = gen.value.response_feedback
        event = gen.event(self.name, decision="sample_feedback", response_feedback=feedback)
        return [record.with_event(event, metadata=data.update(sample_feedback=feedback).stored(record))]
