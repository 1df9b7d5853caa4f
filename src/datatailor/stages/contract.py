"""The method contract: what a stage needs from earlier stages, what it provides, and which method it
belongs to — checked before anything is spent.

A **capability** is something a record carries that a later stage relies on:

* a field: `instruction`, `input`, `response`, or `metadata.<key>`;
* a method's data, registered here with a description and a probe, e.g. `codec.metadata` (a CodecLM use
  case and skills) or `codec.actions` (Self-Rubrics actions).

A stage declares `needs`, `provides` and `clears` (what its outputs no longer carry; `"*"` when it
writes brand-new records that carry only what it provides). `check_stage_order` walks a recipe's stages
from what the input records carry and reports every stage that needs something nothing before it
provides — naming the later stage that provides it, or the stage types that could. `check_templates`
checks each template a stage renders against the variables that stage passes.

Methods are registered once (`METHODS`) with the paper they implement; a stage names its method by key,
and the manifest records it for each stage, so reports never guess a method from a stage's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.meta

from datatailor.errors import UserError
from datatailor.records import Record, read_field

if TYPE_CHECKING:
    from datatailor.stages.base import Stage, StageConfig

ALL = "*"


@dataclass(frozen=True)
class Method:
    """A published method (or the engine's own generic stages, key None)."""

    key: str
    title: str
    paper: str
    # "module:function" taking the run directory: the method's run report, written when a run that used the
    # method's stages finishes (None: the method reports from a stage, or not at all).
    report: str | None = None


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("codec", "CodecLM", "Wang et al., CodecLM: Aligning Language Models with Tailored Synthetic Data, NAACL 2024 (arXiv 2404.05875)"),
        Method("self_instruct", "Self-Instruct", "Wang et al., Self-Instruct, ACL 2023 (arXiv 2212.10560); Alpaca's variant (Taori et al., 2023)"),
        Method("evol", "Evol-Instruct", "Xu et al., WizardLM: Empowering Large Language Models to Follow Complex Instructions (arXiv 2304.12244)"),
        Method("refed", "REFED", "Mehri et al., Reference-Level Feedback, EACL 2026 (arXiv 2502.04511)",
               report="datatailor.report.refed:write_refed_report"),
        Method("coachlm", "CoachLM", "Liu et al., CoachLM: Automatic Instruction Revisions Improve the Data Quality in LLM Instruction Tuning, ICDE 2024 (arXiv 2311.13246)",
               report="datatailor.report.coach:write_coach_report"),
        Method("teams_rl", "TeaMs-RL", "Gu et al., TeaMs-RL: Teaching LLMs to Generate Better Instruction Datasets via Reinforcement Learning (arXiv 2403.08694)",
               report="datatailor.report.teams:write_teams_report"),
    )
}


def method_title(key: str | None) -> str | None:
    return METHODS[key].title if key in METHODS else None


@dataclass(frozen=True)
class Capability:
    description: str
    present: Callable[[Record], bool]


CAPABILITIES: dict[str, Capability] = {}


def register_capability(name: str, description: str, present: Callable[[Record], bool]) -> None:
    """Declare a method's capability (e.g. `codec.metadata`) with a probe telling whether a record has it."""
    CAPABILITIES[name] = Capability(description, present)


_FIELD_NAMES = {"instruction": "an instruction", "input": "an input", "response": "a response", "prompt": "an instruction"}


def describe(capability: str) -> str:
    if capability in CAPABILITIES:
        return CAPABILITIES[capability].description
    if capability in _FIELD_NAMES:
        return f"{_FIELD_NAMES[capability]} (`{capability}`)"
    return f"`{capability}`"


def _normalise(capability: str) -> str:
    return "instruction" if capability == "prompt" else capability


def record_has(record: Record, capability: str) -> bool:
    capability = _normalise(capability)
    if capability in CAPABILITIES:
        return CAPABILITIES[capability].present(record)
    if capability in ("instruction", "input", "response") or capability.startswith("metadata."):
        value = read_field(record, capability)
        return value is not None and value != "" and value != [] and value != {}
    raise ValueError(f"unknown capability {capability!r}")


@dataclass(frozen=True)
class Contract:
    needs: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    clears: frozenset[str] = frozenset()

    @staticmethod
    def of(needs: Iterable[str] = (), provides: Iterable[str] = (), clears: Iterable[str] = ()) -> "Contract":
        return Contract(
            frozenset(_normalise(n) for n in needs),
            frozenset(_normalise(p) for p in provides),
            frozenset(_normalise(c) for c in clears),
        )


def input_capabilities(records: Iterable[Record], candidates: Iterable[str]) -> set[str]:
    """The capabilities that at least one input record carries (a stage fails per record, not wholesale).
    Reads `records` once, as a stream, to the end (so a bad line in an input file is found here)."""
    missing = set(candidates)
    found: set[str] = set()
    for r in records:
        if missing:
            hits = {c for c in missing if record_has(r, c)}
            found |= hits
            missing -= hits
    return found


@dataclass
class StagePlan:
    index: int
    name: str
    type: str
    contract: Contract


@dataclass
class OrderProblem:
    stage: StagePlan
    need: str
    provider: StagePlan | None = None
    candidates: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = self.stage
        head = f"stage {s.index} ({s.name}) needs {describe(self.need)}"
        if self.provider is not None:
            p = self.provider
            return f"{head}, which stage {p.index} ({p.name}) provides only later: move {p.name} before {s.name}"
        hint = f"; add one of {', '.join(self.candidates)} before it" if self.candidates else ""
        return f"{head}, but neither the input nor an earlier stage provides it{hint}"


def plan(stages: Sequence["StageConfig"], registry: dict[str, type["Stage"]]) -> list[StagePlan]:
    return [
        StagePlan(i, cfg.name or cfg.type, cfg.type, registry[cfg.type].contract(cfg)) for i, cfg in enumerate(stages)
    ]


def providers_of(capability: str, registry: dict[str, type["Stage"]]) -> list[str]:
    """Stage types whose default configuration provides `capability` (for hints)."""
    return [name for name, cls in sorted(registry.items()) if capability in {_normalise(c) for c in cls.provides}]


def check_stage_order(plans: Sequence[StagePlan], available: set[str], registry: dict[str, type["Stage"]]) -> list[OrderProblem]:
    """Every need that nothing before the stage provides, given what the input carries (`available`)."""
    problems: list[OrderProblem] = []
    have = set(available)
    for i, p in enumerate(plans):
        for need in sorted(p.contract.needs):
            if need in have:
                continue
            later = next((q for q in plans[i + 1 :] if need in q.contract.provides), None)
            problems.append(OrderProblem(p, need, later, [] if later else providers_of(need, registry)))
        if ALL in p.contract.clears:
            have = set()
        else:
            have -= p.contract.clears
        have |= p.contract.provides
    return problems


def all_capabilities(plans: Sequence[StagePlan]) -> set[str]:
    out: set[str] = set()
    for p in plans:
        out |= p.contract.needs
    return out


def check_recipe_order(stages: Sequence["StageConfig"], records: Iterable[Record] | None, registry: dict[str, type["Stage"]]) -> list[str]:
    """Problems with the order of a recipe's stages, as messages. `records` are the input (None: no input)."""
    plans = plan(stages, registry)
    available = input_capabilities([] if records is None else records, all_capabilities(plans))
    return [str(p) for p in check_stage_order(plans, available, registry)]


# ----------------------------------------------------------------------------- templates


_ENV = jinja2.Environment()


def template_variables(source: str, name: str) -> set[str]:
    """The variables a template reads from its caller (undeclared names, jinja2's own analysis)."""
    try:
        return set(jinja2.meta.find_undeclared_variables(_ENV.parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{name}:{exc.lineno}: template syntax error: {exc.message}") from None


def check_templates(stages: Sequence["StageConfig"], registry: dict[str, type["Stage"]], base_dir: Any) -> list[str]:
    """Each template a stage will render, against the variables that stage passes to it."""
    from datatailor.prompts import load_prompt

    problems: list[str] = []
    for i, cfg in enumerate(stages):
        cls = registry[cfg.type]
        for fld, passed in cls.template_variables(cfg).items():
            name = getattr(cfg, fld, None)
            if not isinstance(name, str):
                continue
            try:
                prompt = load_prompt(name, base_dir)
                used = template_variables(prompt.source, prompt.path)
            except UserError as exc:
                problems.append(f"stages[{i}].{fld}: {exc}")
                continue
            for var in sorted(used - set(passed)):
                problems.append(
                    f"stage {i} ({cfg.name or cfg.type}): template {name} ({fld}) uses the variable {var!r}, "
                    f"which this stage does not pass (it passes: {', '.join(sorted(passed))})"
                )
    return problems


def method_report(key: str | None):
    """The report function of a method, if it has one."""
    import importlib

    method = METHODS.get(key or "")
    if method is None or method.report is None:
        return None
    module, _, func = method.report.partition(":")
    return getattr(importlib.import_module(module), func)
