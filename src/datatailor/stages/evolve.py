"""Evol-Instruct (WizardLM): the six evolution operations, WizardLM's elimination checks, and `evol.evolve`.

The operations are a small registry so that other methods (TeaMs-RL's policy picks one per step) can call
`evolve(model, instruction, op)` by name. Each operation is one prompt template under `prompts/evol/`.

Elimination (WizardLM's four checks; a failed evolution is dropped):

1. no information gain: a model says the evolved instruction equals the previous one ("Equal"/"Not Equal",
   parsed tolerantly);
2. the response contains "sorry" and is short (< 80 words): the evolved instruction is hard to answer;
3. the response is only punctuation and stop words;
4. the evolved instruction copies words of the evolving prompt ("rewritten prompt", "given prompt", …).

They run cheapest first: 4 (no call), 1 (one short call), then the answer is generated and 2 and 3 are checked.

What a failed evolution does, following WizardLM: it is dropped, and the instruction it started from goes back
into the pool, i.e. the next round evolves the last good version again. `evol.evolve` outputs every successful
evolution as a pair (instruction, strong answer); a seed none of whose rounds survives is rejected with kind
`eliminated` and each round's reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from datatailor.errors import ParseFailure, RecordFailure, Rejected
from datatailor.llm.models import Generation, RoleModel
from datatailor.prompts import Prompt, load_prompt
from datatailor.records import LineageEvent, Record
from datatailor.stages.base import RECORD_VARIABLES, MapStage, StageConfig, register
from datatailor.stages.namespace import Namespace


@dataclass(frozen=True)
class EvolOperation:
    name: str
    kind: Literal["depth", "breadth"]
    template: str
    # The label that ends the template; a reply that starts by repeating it is cleaned, not eliminated.
    answer_label: str


OPERATIONS: dict[str, EvolOperation] = {
    op.name: op
    for op in (
        EvolOperation("add_constraints", "depth", "evol/add_constraints.j2", "Rewritten prompt"),
        EvolOperation("deepening", "depth", "evol/deepening.j2", "Rewritten prompt"),
        EvolOperation("concretizing", "depth", "evol/concretizing.j2", "Rewritten prompt"),
        EvolOperation("increase_reasoning", "depth", "evol/increase_reasoning.j2", "Rewritten prompt"),
        EvolOperation("complicate_input", "depth", "evol/complicate_input.j2", "Rewritten prompt"),
        EvolOperation("breadth", "breadth", "evol/breadth.j2", "Created prompt"),
    )
}
EQUAL_TEMPLATE = "evol/equal.j2"

# Words of the evolving prompts (ours and WizardLM's) that must not leak into an evolved instruction.
LEAK_PHRASES = (
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "prompt to rewrite",
    "inspiring prompt",
    "how to make it harder",
)
SORRY_MAX_WORDS = 80

# A compact English stop-word list (the usual NLTK set), for elimination check 3.
STOP_WORDS = frozenset(
    """a about above after again against ain all am an and any are aren aren't as at be because been before being
    below between both but by can couldn couldn't d did didn didn't do does doesn doesn't doing don don't down during
    each few for from further had hadn hadn't has hasn hasn't have haven haven't having he her here hers herself him
    himself his how i if in into is isn isn't it it's its itself just ll m ma me mightn mightn't more most mustn
    mustn't my myself needn needn't no nor not now o of off on once only or other our ours ourselves out over own re
    s same shan shan't she she's should should've shouldn shouldn't so some such t than that that'll the their theirs
    them themselves then there these they this those through to too under until up ve very was wasn wasn't we were
    weren weren't what when where which while who whom why will with won won't wouldn wouldn't y you you'd you'll
    you're you've your yours yourself yourselves""".split()
)


def operation_names() -> list[str]:
    return list(OPERATIONS)


def operation(name: str) -> EvolOperation:
    try:
        return OPERATIONS[name]
    except KeyError:
        raise ValueError(f"unknown Evol-Instruct operation {name!r} (known: {', '.join(OPERATIONS)})") from None


def operation_prompt(name: str, base_dir: Path | None = None) -> Prompt:
    return load_prompt(operation(name).template, base_dir)


def clean_evolved(text: str, op: str) -> str:
    """The evolved instruction: a repeated answer label at the very start is removed; empty → ValueError."""
    label = re.escape(operation(op).answer_label)
    cleaned = re.sub(rf"^\s*[#*]*\s*{label}\s*[#*]*\s*:?\s*[#*]*\s*", "", text.strip(), flags=re.IGNORECASE).strip()
    if not cleaned:
        raise ValueError("the reply holds no instruction")
    return cleaned


async def evolve(
    model: RoleModel, instruction: str, op: str, *, seed_key: Any = None, base_dir: Path | None = None, **sampling: Any
) -> Generation[str]:
    """Apply one Evol-Instruct operation to `instruction` with `model`; `.value` is the evolved instruction."""
    return await model.generate(
        operation_prompt(op, base_dir),
        {"instruction": instruction},
        parse=lambda text: clean_evolved(text, op),
        seed_key=seed_key,
        **sampling,
    )


# ----------------------------------------------------------------------------- elimination checks


_NAMES_A_DIFFERENCE = re.compile(
    r"\b(but|however|although|though|except|whereas|yet|differ\w*|adds|added|additional|another|more|less|extra|"
    r"narrower|broader|deeper)\b"
)


def parse_equal(text: str) -> bool:
    """True for "Equal", False for "Not Equal"; tolerant of case, punctuation and a few synonyms.

    A reply that says "Equal" and then names a difference ("Equal, but the second adds a word limit") is read
    as Not Equal: the difference it names is the information gain the check is about.
    """
    t = re.sub(r"[^a-z ]+", " ", text.lower())
    t = " ".join(t.split())
    if re.search(r"\b(not equal|unequal|not the same|different|differ|differs)\b", t):
        return False
    m = re.search(r"\b(equal|the same|identical|same)\b", t)
    if m:
        return not _NAMES_A_DIFFERENCE.search(t[m.end():])
    raise ValueError('expected "Equal" or "Not Equal"')


def leaked_phrase(instruction: str, phrases: tuple[str, ...] | list[str] = LEAK_PHRASES) -> str | None:
    """Check 4: the first template phrase the evolved instruction copies, if any."""
    low = instruction.lower()
    return next((p for p in phrases if p.lower() in low), None)


def is_sorry_and_short(response: str, max_words: int = SORRY_MAX_WORDS) -> bool:
    """Check 2: a refusal-like answer ("sorry") shorter than `max_words` words."""
    return "sorry" in response.lower() and len(response.split()) < max_words


def is_only_punctuation_and_stop_words(response: str) -> bool:
    """Check 3: nothing in the answer but punctuation and stop words (an empty answer counts too)."""
    words = re.findall(r"[a-z0-9']+", response.lower())
    return all(w in STOP_WORDS for w in words)


async def is_equal(
    model: RoleModel, previous: str, evolved: str, *, seed_key: Any = None, base_dir: Path | None = None, **sampling: Any
) -> Generation[bool]:
    """Check 1: does `model` judge the two instructions equal (no information gain)?"""
    return await model.generate(
        load_prompt(EQUAL_TEMPLATE, base_dir),
        {"first": previous, "second": evolved},
        parse=parse_equal,
        seed_key=seed_key,
        **sampling,
    )


# ----------------------------------------------------------------------------- evol.evolve


class EvolRound(BaseModel):
    """One evolution round of a seed's chain, and why it was eliminated (None: it survived)."""

    model_config = ConfigDict(extra="forbid")

    chain: int
    round: int
    op: str
    eliminated: str | None = None


class EvolData(Namespace):
    """What Evol-Instruct records about an evolved pair (`metadata["evol"]`)."""

    key = "evol"

    seed_id: str
    chain: int | None = None
    round: int = 0
    ops: list[str] = Field(default_factory=list)
    seed_instruction: str | None = None
    rounds: list[EvolRound] = Field(default_factory=list)  # every round of the seed's chains, eliminated ones too


class EvolveConfig(StageConfig):
    type: Literal["evol.evolve"] = "evol.evolve"
    role: str = Field("strong", description="Model that evolves instructions.")
    responder_role: str = Field("strong", description="Model that answers the evolved instructions.")
    equal_role: str = Field("strong", description="Model that checks for information gain (Equal / Not Equal).")
    rounds: int = Field(4, ge=1, description="Evolution rounds per chain (WizardLM: 4).")
    chains_per_seed: int = Field(1, ge=1, description="Independent evolution chains per seed (size it to the data budget).")
    operations: list[str] = Field(default_factory=operation_names, description="Operations drawn from, uniformly.")
    keep: Literal["all", "last"] = Field(
        "all", description="all: every successful evolution is a pair (WizardLM); last: only each chain's last one."
    )
    include_seed: bool = Field(False, description="Also output the seed itself, answered by the responder.")
    information_gain_check: bool = Field(
        True, description="Ask `equal_role` whether each evolution adds information and eliminate it if not (WizardLM's "
        "first rule). Turn it off only for a judge too weak to tell, one that answers Equal to every pair; the other "
        "rules still apply.",
    )
    leak_phrases: list[str] = Field(default_factory=lambda: list(LEAK_PHRASES))
    sorry_max_words: int = Field(SORRY_MAX_WORDS, ge=1)
    temperature: float | None = Field(None, description="Evolution temperature (default: the model's).")
    response_max_tokens: int | None = None
    respond_template: str = "respond.j2"

    @field_validator("operations")
    @classmethod
    def _known_operations(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError("give at least one operation")
        for op in ops:
            operation(op)
        return ops


@register("evol.evolve")
class Evolve(MapStage[EvolveConfig]):
    """WizardLM Evol-Instruct: per seed, `rounds` rounds of a random operation, each checked for elimination."""

    Config = EvolveConfig
    method = "evol"
    needs = ("instruction",)
    provides = ("instruction", "response")
    templates = {"respond_template": RECORD_VARIABLES}

    async def _answer(self, record: Record, instruction: str, seed_key: Any) -> Generation[str]:
        asked = record.model_copy(update={"instruction": instruction, "input": "", "response": None})
        return await self.answer(
            self.config.responder_role, asked, seed_key=seed_key, max_tokens=self.config.response_max_tokens
        )

    async def _round(self, record: Record, current: str, op: str, key: tuple[Any, ...], events: list[LineageEvent]) -> tuple[str, str] | str:
        """One evolution: (evolved, response) when it survives, else the elimination reason."""
        cfg = self.config
        try:
            gen = await evolve(self.ctx.model(cfg.role), current, op, seed_key=key, base_dir=self.ctx.base_dir, stage=self.name,
                               temperature=cfg.temperature)
        except ParseFailure as exc:
            return f"no instruction in the reply ({exc})"
        events.append(gen.event(self.name, decision="evolved", op=op, round=key[-1]))
        evolved = gen.value
        if phrase := leaked_phrase(evolved, cfg.leak_phrases):
            return f"copies the template phrase {phrase!r}"
        if not cfg.information_gain_check:
            return await self._answered(record, evolved, key, events)
        try:
            equal = await is_equal(self.ctx.model(cfg.equal_role), current, evolved, seed_key=key, base_dir=self.ctx.base_dir,
                                   stage=self.name)
        except ParseFailure as exc:
            return f"the information-gain check did not parse ({exc})"
        events.append(equal.event(self.name, decision="equal" if equal.value else "not_equal", round=key[-1]))
        if equal.value:
            return "no information gain: judged equal to the previous instruction"
        return await self._answered(record, evolved, key, events)

    async def _answered(self, record: Record, evolved: str, key: tuple[Any, ...], events: list[LineageEvent]) -> tuple[str, str] | str:
        """Answer a surviving evolution; the answer's own elimination rules apply."""
        cfg = self.config
        try:
            answer = await self._answer(record, evolved, (*key, "response"))
        except RecordFailure as exc:
            if exc.kind not in ("empty_response", "truncated"):
                raise
            return f"the answer is unusable ({exc.kind}: {exc})"
        events.append(answer.event(self.name, decision="answered", round=key[-1]))
        response = answer.text.strip()
        if is_sorry_and_short(response, cfg.sorry_max_words):
            return f'the answer says "sorry" in under {cfg.sorry_max_words} words'
        if is_only_punctuation_and_stop_words(response):
            return "the answer is only punctuation and stop words"
        return evolved, response

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        outputs: list[Record] = []
        rounds_log: list[EvolRound] = []
        all_events: list[LineageEvent] = []
        if cfg.include_seed:
            answer = await self._answer(record, record.prompt, (self.name, record.id, "seed"))
            seed_pair = record.child(("evol.seed",), instruction=record.prompt, input="", response=answer.text.strip())
            seed_pair.lineage.append(answer.event(self.name, decision="seed_answered"))
            seed_pair.metadata = EvolData(seed_id=record.id, seed_instruction=record.prompt).stored(seed_pair)
            outputs.append(seed_pair)
        n_evolved = 0
        for chain in range(cfg.chains_per_seed):
            current, ops_applied, last_pair = record.prompt, [], None
            events: list[LineageEvent] = []
            for round_ in range(1, cfg.rounds + 1):
                op = self.ctx.rng(record.id, chain, round_).choice(cfg.operations)
                result = await self._round(record, current, op, (self.name, record.id, chain, round_), events)
                if isinstance(result, str):
                    # Dropped; the last good instruction goes back into the pool for the next round.
                    rounds_log.append(EvolRound(chain=chain, round=round_, op=op, eliminated=result))
                    events.append(LineageEvent(stage=self.name, decision="eliminated", reason=result,
                                               details={"chain": chain, "round": round_, "op": op}))
                    continue
                current, response = result
                ops_applied = [*ops_applied, op]
                rounds_log.append(EvolRound(chain=chain, round=round_, op=op))
                pair = record.child(("evol.evolve", chain, round_), instruction=current, input="", response=response)
                pair.lineage.extend(events)
                pair.metadata = EvolData(
                    seed_id=record.id, chain=chain, round=round_, ops=ops_applied, seed_instruction=record.prompt
                ).stored(pair)
                n_evolved += 1
                if cfg.keep == "all":
                    outputs.append(pair)
                last_pair = pair
            if cfg.keep == "last" and last_pair is not None:
                outputs.append(last_pair)
            all_events.extend(events)
        if n_evolved == 0 and not cfg.include_seed:
            reasons = "; ".join(f"chain {r.chain} round {r.round} ({r.op}): {r.eliminated}" for r in rounds_log)
            traced = record.model_copy(deep=True)
            traced.lineage.extend(all_events)
            traced.metadata = EvolData(seed_id=record.id, seed_instruction=record.prompt, rounds=rounds_log).stored(traced)
            raise Rejected(f"every evolution was eliminated: {reasons}", kind="eliminated", record=traced)
        for o in outputs:
            o.metadata = EvolData.get(o).update(rounds=rounds_log).stored(o)
        return outputs
