"""REFED's per-record data: the `refed` namespace and the capabilities its stages declare.

A reference is an input pair drawn by `refed.references`: its namespace holds the pair, when it was drawn, and
(after `refed.feedback`) its instruction feedback (two features) and response feedback. Every pair synthesized from
it inherits that namespace and adds the feature it was written from, the draft response, and after
`refed.improve` the analysis and strategy; the improved response is the record's `response`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from datatailor.stages.contract import register_capability
from datatailor.stages.namespace import Namespace

Feature = Literal["subject_areas", "relevant_skills"]
FEATURES: tuple[Feature, ...] = ("subject_areas", "relevant_skills")


class RefedData(Namespace):
    key = "refed"

    reference_id: str
    reference_instruction: str
    reference_response: str
    draw: int = Field(description="Position of the reference in the draw order (0-based).")
    draw_pass: int = Field(1, description="1 on the first pass over the references; 2 once all had been used; …")
    quota: int | None = Field(
        None, description="Pairs asked of this reference: pairs_per_reference, less for the last one the budget needs "
        "(None: no budget, the synthesis stage's full count)."
    )
    subject_areas: str | None = None
    relevant_skills: str | None = None
    response_feedback: str | None = None
    feature: Feature | None = None  # the instruction feature a synthesized instruction was written from
    feature_text: str | None = None
    draft: str | None = None  # the response before improvement
    sample_feedback: str | None = None  # feedback on this pair itself (the sample-level ablation)
    feedback_applied: Literal["reference", "sample"] | None = None
    analysis: dict[str, Any] | None = None
    strategy: dict[str, Any] | None = None


# Structured outputs of the teacher (the paper's JSON replies).


class InstructionFeedback(BaseModel):
    model_config = ConfigDict(extra="ignore")

    subject_areas: str = Field(min_length=1)
    relevant_skills: str = Field(min_length=1)


class ResponseFeedback(BaseModel):
    model_config = ConfigDict(extra="ignore")

    response_feedback: str = Field(min_length=1)


class Instructions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instructions: list[Any]  # strings are kept; anything else a model puts in the list is dropped when cleaning


class Analysis(BaseModel):
    model_config = ConfigDict(extra="ignore")

    original_strengths: list[str] = Field(default_factory=list)
    improvement_opportunities: list[str] = Field(default_factory=list)
    relevant_feedback: list[str] = Field(default_factory=list)


class Strategy(BaseModel):
    model_config = ConfigDict(extra="ignore")

    planned_changes: list[str] = Field(default_factory=list)
    rationale: str = ""


class Improvement(BaseModel):
    model_config = ConfigDict(extra="ignore")

    analysis: Analysis
    implementation_strategy: Strategy
    improved_response: str = Field(min_length=1)


def _data(record: Any) -> RefedData | None:
    return RefedData.of(record)


register_capability("refed.reference", "a REFED reference (refed.references)", lambda r: _data(r) is not None)
register_capability(
    "refed.instruction_feedback", "REFED instruction feedback (refed.feedback)",
    lambda r: bool((d := _data(r)) is not None and (d.subject_areas or d.relevant_skills)),
)
register_capability(
    "refed.response_feedback", "REFED reference-level response feedback (refed.feedback)",
    lambda r: bool((d := _data(r)) is not None and d.response_feedback),
)
register_capability(
    "refed.sample_feedback", "sample-level response feedback (refed.sample_feedback)",
    lambda r: bool((d := _data(r)) is not None and d.sample_feedback),
)
register_capability("refed.draft", "a REFED draft response (refed.respond)", lambda r: bool((d := _data(r)) is not None and d.draft))
