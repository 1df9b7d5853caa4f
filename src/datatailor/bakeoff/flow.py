"""What a recipe will do, stage by stage, before it runs: how many records each stage makes and how many model calls
it makes. Counted from the recipe where the recipe fixes them (an answer per record, 6 rewrites per TeaMs-RL episode,
a rewrite and a review per TRPO step), and estimated from outcome rates where the models decide (how many Evol-Instruct
rewrites survive, how many CodecLM iterations an instruction needs). Every figure says which it is:

* `exact`    what will happen, unless a call fails;
* `at most`  the most it can be, reached when nothing is eliminated or cut off;
* `estimate` from the outcome rates in RATES (measured with scripted models, benchmarks/bench_calls_per_pair.py):
             real models can differ a lot (on the embedded 0.5B models CodecLM needed about 3 times the calls).

Records also carry the most a stage can make (None when this plan cannot tell), so a plan can say when a method cannot
reach its budget whatever the models answer. Used by the bake-off's plan (`datatailor bakeoff --plan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXACT, AT_MOST, ESTIMATE = "exact", "at most", "estimate"
_ORDER = (EXACT, AT_MOST, ESTIMATE)

# Outcome rates of the scripted worlds in benchmarks/bench_calls_per_pair.py (the papers' settings).
RATES = {
    "codec_pass": 0.7,  # an instruction passes Contrastive Filtering (|G| > threshold) at a given iteration
    "self_instruct_kept": 0.7,  # a Self-Instruct candidate is not a near copy (ROUGE-L < 0.7)
    "evolution_survives": 0.8,  # an Evol-Instruct / TeaMs-RL rewrite is not judged Equal to its source
}


def _worst(*kinds: str) -> str:
    return max(kinds, key=_ORDER.index)


@dataclass(frozen=True)
class Count:
    """A number of records or calls: what to expect (`value`), the most it can be (`most`; None: unknown) and how
    the value was obtained (`kind`)."""

    value: float
    most: float | None
    kind: str = EXACT

    def times(self, factor: float, kind: str | None = None) -> Count:
        most = None if self.most is None else self.most * factor
        return Count(self.value * factor, most, _worst(self.kind, kind or EXACT))

    def capped(self, kind: str) -> Count:
        """The same number, now only an upper bound (a stage may drop some)."""
        return Count(self.value, self.most, _worst(self.kind, kind))

    def __add__(self, other: Count) -> Count:
        most = None if self.most is None or other.most is None else self.most + other.most
        return Count(self.value + other.value, most, _worst(self.kind, other.kind))


NONE = Count(0, 0)


@dataclass
class StageFlow:
    name: str
    type: str
    records: Count  # what the stage outputs
    calls: Count | None  # None: this plan does not know the stage
    how: str


@dataclass
class Context:
    budget: int | None
    topper: bool = False  # set by a stage the runner can ask for more (top-up rounds)
    top_up_rounds: int = 0


Rule = Callable[[Any, Count, Context], tuple[Count, Count, str]]


def _per_record(calls: float, what: str, drops: bool = True) -> Rule:
    def rule(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
        return (n.capped(AT_MOST) if drops else n), n.times(calls), what

    return rule


def _filter(what: str) -> Rule:
    return lambda cfg, n, ctx: (n.capped(AT_MOST), NONE, what)


def _select(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    budget = cfg.budget_pairs or ctx.budget
    if budget is None:
        return n, NONE, "no budget: keeps everything"
    most = budget if n.most is None else min(n.most, budget)
    return Count(min(n.value, budget), most, n.kind), NONE, f"trims to {budget}"


def _judge(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    return (n if cfg.keep == "all" else n.capped(AT_MOST)), n.times(2), "2 judge calls per pair (both orders)"


def _rate(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    return (n if cfg.min_score is None else n.capped(AT_MOST)), n.times(1), "1 rating per pair"


def _references(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    ctx.topper, ctx.top_up_rounds = cfg.top_up_rounds > 0, cfg.top_up_rounds
    count = cfg.count or math.ceil((ctx.budget or 0) / cfg.pairs_per_reference)
    return Count(count, count), NONE, f"draws {count} references (passes over the input when needed)"


def _synthesize(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    per = len(cfg.features) * cfg.per_feature
    return n.times(per).capped(AT_MOST), n.times(len(cfg.features)), f"{len(cfg.features)} calls per reference, {cfg.per_feature} instructions each"


def _feedback(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    return n, n.times(len(cfg.collect)), f"{len(cfg.collect)} feedback call(s) per reference"


def _metadata(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    if cfg.file:
        return Count(len(cfg.entries), None, ESTIMATE), NONE, "entries written by hand (plus a file this plan does not read)"
    return Count(len(cfg.entries), len(cfg.entries)), NONE, "entries written by hand"


def _augment(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    size = max(n.value, cfg.pool_size)
    return Count(size, None if n.most is None else max(n.most, cfg.pool_size), _worst(n.kind, AT_MOST)), NONE, \
        f"mix-and-match up to a pool of {cfg.pool_size} (no model call)"


def _decode(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    ctx.topper, ctx.top_up_rounds = cfg.top_up_rounds > 0, cfg.top_up_rounds
    k = cfg.instructions_per_entry or max(1, math.ceil((ctx.budget or 0) / max(1.0, n.value)))
    return n.times(k).capped(AT_MOST), n.times(1), f"1 call per entry writing {k} instructions"


def _contrastive(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    fail = 1 - RATES["codec_pass"]
    iterations = cfg.max_iterations
    # 2 answers and 2 judge calls per iteration, and a rewrite before each iteration after the first
    expected = 4 + sum(5 * fail**i for i in range(1, iterations))
    calls = Count(n.value * expected, None if n.most is None else n.most * (4 + 5 * (iterations - 1)), ESTIMATE)
    kept = 1.0 if cfg.keep_below_threshold else 1 - fail**iterations
    out = Count(n.value * kept, n.most, ESTIMATE)
    return out, calls, f"4 calls per iteration (+1 rewrite from the second), up to {iterations}; pass rate {RATES['codec_pass']} assumed"


def _self_instruct(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    target = cfg.target or ctx.budget or 0
    least = math.ceil(target / cfg.per_call)
    most = cfg.max_calls or 5 * least + 5
    expected = min(most, math.ceil(least / RATES["self_instruct_kept"]))
    return Count(target, target, AT_MOST), Count(expected, most, ESTIMATE), \
        f"{target} instructions, {cfg.per_call} per call ({least} to {most} calls); {RATES['self_instruct_kept']} of candidates kept assumed"


def _evolve(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    survive = RATES["evolution_survives"] if cfg.information_gain_check else 1.0
    rewrites = n.times(cfg.chains_per_seed * cfg.rounds)
    checks = rewrites if cfg.information_gain_check else NONE
    answers = Count(rewrites.value * survive, rewrites.most, ESTIMATE if cfg.information_gain_check else AT_MOST)
    seeds = n if cfg.include_seed else NONE
    if cfg.keep == "all":
        out = answers + seeds
    else:
        out = Count(n.value * cfg.chains_per_seed * (1 - (1 - survive) ** cfg.rounds), None if n.most is None else n.most * cfg.chains_per_seed,
                    answers.kind) + seeds
    how = f"{cfg.chains_per_seed} chain(s) × {cfg.rounds} rounds per seed: a rewrite" + (", a check" if cfg.information_gain_check else "") + \
        " and an answer per surviving rewrite" + (f"; {survive} survive assumed" if cfg.information_gain_check else "")
    return out, rewrites + checks + answers + seeds, how


def _teams_train(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    from datatailor.stages.teams.env import EPISODE_LENGTH

    calls = cfg.updates * cfg.n_envs * EPISODE_LENGTH * 2
    return n, Count(calls, calls, AT_MOST), \
        f"{cfg.updates} updates × {cfg.n_envs} episodes × {EPISODE_LENGTH} steps × (a rewrite + a review)"


def _teams_generate(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    survive = RATES["evolution_survives"] if cfg.elimination else 1.0
    episodes = n.times(cfg.episodes_per_seed)
    rewrites = episodes.times(cfg.steps)
    reviews = rewrites if cfg.elimination else NONE
    kind = ESTIMATE if cfg.elimination else AT_MOST
    if cfg.keep == "all":
        out = Count(rewrites.value * survive, rewrites.most, kind)
        answers = out
    else:
        out = Count(episodes.value, episodes.most, kind)
        answers = Count(episodes.value, rewrites.most, kind)  # one per episode, more when a last answer is unusable
    how = f"{cfg.episodes_per_seed} episode(s) × {cfg.steps} steps per seed: a rewrite" + (", a review" if cfg.elimination else "") + \
        (" and an answer per kept step" if cfg.keep == "all" else ", and one answer per episode") + \
        (f"; {survive} survive assumed" if cfg.elimination else "")
    return out, rewrites + reviews + answers, how


def _coach(cfg: Any, n: Count, ctx: Context) -> tuple[Count, Count, str]:
    gate = "" if cfg.revise_below is None else f" rated below {cfg.revise_below}"
    return n, n.times(1, AT_MOST), f"1 revision per pair{gate}"


RULES: dict[str, Rule] = {
    "respond": _per_record(1, "1 answer per record"),
    "generate": _per_record(1, "1 call per record"),
    "quality.rate": _rate,
    "judge.pairwise": _judge,
    "select": _select,
    "codec.select": _select,
    "dedup": _filter("drops duplicates (no model call)"),
    "filter.rouge": _filter("drops near copies (no model call)"),
    "decontam": _filter("drops pairs overlapping the test sets (no model call)"),
    "filter.flags": _filter("drops the records flagged in a review (no model call)"),
    "self_instruct": _self_instruct,
    "evol.evolve": _evolve,
    "teams.train": _teams_train,
    "teams.generate": _teams_generate,
    "coach.revise": _coach,
    "codec.encode": _per_record(1, "1 encoding per seed"),
    "codec.metadata": _metadata,
    "codec.augment": _augment,
    "codec.rubrics": _per_record(1, "1 call per entry (rubrics and actions)", drops=True),
    "codec.decode": _decode,
    "codec.contrastive": _contrastive,
    "codec.improve": _per_record(1, "1 rewrite per instruction"),
    "refed.references": _references,
    "refed.feedback": _feedback,
    "refed.sample_feedback": _per_record(1, "1 feedback call per pair", drops=False),
    "refed.synthesize": _synthesize,
    "refed.respond": _per_record(1, "1 draft answer per instruction"),
    "refed.improve": _per_record(1, "1 improvement per pair"),
}


@dataclass
class RecipeFlow:
    stages: list[StageFlow]
    output: Count  # the recipe's pairs
    calls: Count | None  # None: a stage this plan does not know
    top_up: StageFlow | None  # the runner's extra rounds, when the run is expected to fall short and can ask for more


def recipe_flow(recipe: Any, inputs: int) -> RecipeFlow:
    """Walk `recipe`'s stages from `inputs` records."""
    ctx = Context(budget=recipe.budget_pairs)
    n = Count(inputs, inputs)
    flows: list[StageFlow] = []
    topper_at: int | None = None
    for cfg in recipe.stages:
        rule = RULES.get(cfg.type)
        if rule is None:
            n = Count(n.value, None, ESTIMATE)
            flows.append(StageFlow(cfg.name or cfg.type, cfg.type, n, None, "not known to the plan: counted as passing its input on"))
            continue
        was_topper = ctx.topper
        n, calls, how = rule(cfg, n, ctx)
        if ctx.topper and not was_topper:
            topper_at = len(flows)
        flows.append(StageFlow(cfg.name or cfg.type, cfg.type, n, calls, how))
    known = [f.calls for f in flows]
    total = None if any(c is None for c in known) else sum((c for c in known if c is not None), NONE)
    top_up = None
    if topper_at is not None:
        n = Count(n.value, None, n.kind)  # the runner can ask that stage for more, round after round
        top_up = _top_up(flows, topper_at, n, ctx)
        if top_up is not None and total is not None and top_up.calls is not None:
            total = total + top_up.calls
            n = Count(min(ctx.budget or n.value, n.value + top_up.records.value), None, ESTIMATE)
    return RecipeFlow(flows, n, total, top_up)


def _top_up(flows: list[StageFlow], at: int, out: Count, ctx: Context) -> StageFlow | None:
    """The extra rounds when the expected output is below the budget: the stages from the one that can write more on,
    again, in proportion to the deficit (an estimate; at most `top_up_rounds` rounds)."""
    if ctx.budget is None or out.value >= ctx.budget or ctx.top_up_rounds <= 0:
        return None
    later = [f.calls for f in flows[at:] if f.calls is not None]
    per_pair = sum(c.value for c in later) / out.value if out.value else 0.0
    deficit = ctx.budget - out.value
    calls = Count(per_pair * deficit, None, ESTIMATE)
    return StageFlow("top-up", "runner", Count(deficit, None, ESTIMATE), calls,
                     f"about {deficit:.0f} pairs short: {flows[at].name} writes more (up to {ctx.top_up_rounds} extra rounds)")
