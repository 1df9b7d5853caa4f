"""What a bake-off will cost, before anything is spent: model calls counted from its shape, tokens and $
estimated from typical sizes. Shown by `datatailor bakeoff --plan` and at the start of every bake-off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datatailor.bakeoff.run import Plan

# Model calls per kept pair, measured with scripted models at the papers' settings (benchmarks/RESULTS.md):
# CodecLM 7.42, Self-Instruct 1.17, Evol-Instruct 3.93, REFED 2.20; TeaMs-RL's generation 14.1 (plus its policy
# training: 4 calls per step); CoachLM one revision per pair.
CALLS_PER_PAIR = {"codec": 7.42, "self_instruct": 1.17, "evol": 3.93, "refed": 2.20, "teams_rl": 14.1, "coachlm": 1.0}
PROMPT_TOKENS, COMPLETION_TOKENS = 400, 300  # a typical call (an assumption, shown with the figures)


RATING_STAGES = {"quality.rate": 1.0}  # a rating inside a recipe: one judge call per pair


def _calls_per_pair(recipe: Any) -> float | None:
    """Calls per kept pair of a recipe: the sum over the methods it chains (Self-Instruct then CoachLM is both) and
    its rating stages; None when one of its methods has no measured rate."""
    from datatailor.stages import STAGES

    keys = list(dict.fromkeys(STAGES[cfg.type].method for cfg in recipe.stages if STAGES[cfg.type].method is not None))
    if not keys or any(k not in CALLS_PER_PAIR for k in keys):
        return None
    return sum(CALLS_PER_PAIR[k] for k in keys) + sum(RATING_STAGES.get(cfg.type, 0.0) for cfg in recipe.stages)


def _price(model: Any) -> float:
    """$ of one typical call of `model`."""
    if model is None:
        return 0.0
    return (PROMPT_TOKENS * model.price_per_mtok_in + COMPLETION_TOKENS * model.price_per_mtok_out) / 1e6


def project(plan: Plan) -> dict[str, Any]:
    from datatailor.bakeoff.run import eval_testset

    config = plan.config
    judge, reference = plan.models[config.eval.judge], plan.models[config.eval.reference]
    items = sum(len(eval_testset(plan, s).records) for s in plan.splits)
    rows = []
    for m in plan.methods:
        row: dict[str, Any] = {"method": m.name}
        if m.recipe is not None:
            per_pair = _calls_per_pair(m.recipe)
            strong = m.recipe.models.get("strong") or next(iter(m.recipe.models.values()), None)
            row["generation_calls"] = None if per_pair is None else round(per_pair * config.budget_pairs)
            row["generation_usd"] = None if per_pair is None else row["generation_calls"] * _price(strong)
            row["rating_calls"] = config.budget_pairs if config.eval.rate else 0
        row["eval_calls"] = items * 3  # the tuned target's answer, and the judge in both orders
        row["eval_usd"] = items * 2 * _price(judge)
        rows.append(row)
    shared = {"reference_calls": items, "reference_usd": items * _price(reference)}  # answered once, then cached
    known = [r for r in rows if r.get("generation_calls") is not None or "generation_calls" not in r]
    total_calls = shared["reference_calls"] + sum((r.get("generation_calls") or 0) + r.get("rating_calls", 0) + r["eval_calls"] for r in rows)
    total_usd = shared["reference_usd"] + sum((r.get("generation_usd") or 0) + r.get("rating_calls", 0) * _price(judge) + r["eval_usd"] for r in rows)
    return {"rows": rows, "shared": shared, "items": items, "calls": total_calls, "usd": total_usd,
            "complete": len(known) == len(rows),
            "assumptions": f"{PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} completion tokens per call; calls per pair "
                           "measured with scripted models; training runs locally and is not priced"}


def render(p: dict[str, Any]) -> str:
    lines = [f"projected cost (before anything is spent): about {p['calls']:,} model calls, ${p['usd']:.2f}"
             + ("" if p["complete"] else " plus the methods marked ?"),
             f"  reference answers: {p['shared']['reference_calls']} calls (${p['shared']['reference_usd']:.2f}), once for all methods"]
    for r in p["rows"]:
        gen = "" if "generation_calls" not in r else (
            f"data ~{r['generation_calls']} calls (${r['generation_usd']:.2f}), rating {r['rating_calls']}, "
            if r["generation_calls"] is not None else "data ? calls (no measured rate for this method), ")
        lines.append(f"  {r['method']}: {gen}evaluation {r['eval_calls']} calls (${r['eval_usd']:.2f})")
    lines.append(f"  ({p['assumptions']})")
    return "\n".join(lines)
