"""What a bake-off will do and cost, before anything is spent. Each method's recipe is walked stage by stage from the
records it will read (bakeoff/flow.py): the pairs it makes before the trim to budget_pairs, the model calls of every
stage (TeaMs-RL's policy training included) and the runner's top-up rounds. A figure counted from the recipe is
marked exact or "at most"; one that depends on what the models answer is marked as an estimate. Tokens and $ are
estimates from a typical call's size. Shown by `datatailor bakeoff --plan` and at the start of every bake-off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datatailor.bakeoff.flow import AT_MOST, ESTIMATE, EXACT, Count, recipe_flow

if TYPE_CHECKING:
    from datatailor.bakeoff.run import MethodPlan, Plan

PROMPT_TOKENS, COMPLETION_TOKENS = 400, 300  # a typical call (an assumption, shown with the figures)
SELECTIONS = ("select", "codec.select")


def _price(model: Any) -> float:
    """$ of one typical call of `model`."""
    if model is None:
        return 0.0
    return (PROMPT_TOKENS * model.price_per_mtok_in + COMPLETION_TOKENS * model.price_per_mtok_out) / 1e6


def _count(c: Count | None) -> dict[str, Any] | None:
    return None if c is None else {"value": round(c.value), "most": None if c.most is None else round(c.most), "kind": c.kind}


def _inputs(plan: Plan, m: MethodPlan) -> int:
    from datatailor.runner import recipe_input

    if m.spec.input == "seeds":
        return sum(len(s.seeds) for s in plan.splits)
    assert m.recipe is not None
    return len(recipe_input(m.recipe))


def method_projection(plan: Plan, m: MethodPlan) -> dict[str, Any]:
    """A method's data: its input, each stage's pairs and calls, the total and whether it can reach the budget."""
    assert m.recipe is not None
    recipe, budget = m.recipe, plan.config.budget_pairs
    inputs = _inputs(plan, m)
    flow = recipe_flow(recipe, inputs)
    stages, usd = [], 0.0
    for f in [*flow.stages, *([flow.top_up] if flow.top_up else [])]:
        cfg = next((c for c in recipe.stages if (c.name or c.type) == f.name), None)
        roles = list(cfg.role_fields().values()) if cfg is not None else []
        prices = [_price(recipe.models.get(r)) for r in roles] or [_price(recipe.models.get("strong"))]
        if f.type == "runner":  # the top-up repeats the later stages: their mean price per call
            prices = [usd / max(1.0, sum(s["calls"]["value"] for s in stages if s["calls"]))]
        stage_usd = 0.0 if f.calls is None else f.calls.value * sum(prices) / len(prices)
        usd += stage_usd
        stages.append({"stage": f.name, "type": f.type, "pairs": _count(f.records), "calls": _count(f.calls), "how": f.how,
                       "usd": stage_usd})
    # what the recipe makes before a selection (its own, or the bake-off's trim at the end) keeps budget_pairs of it
    first = next(i for i, f in enumerate(flow.stages) if f.type in SELECTIONS or i == len(flow.stages) - 1)
    made = _count(flow.stages[first - 1].records) if first else None
    warning = None
    if flow.output.most is not None and flow.output.most < budget:
        warning = (f"{m.name} can make at most {flow.output.most:,.0f} pairs from its {inputs} input records, below "
                   f"budget_pairs={budget}: give it more input or ask for more per record (see its stages)")
    return {
        "inputs": inputs, "input": m.spec.input, "stages": stages, "made": made, "pairs": _count(flow.output),
        "calls": _count(flow.calls), "usd": usd, "warning": warning,
    }


def project(plan: Plan) -> dict[str, Any]:
    from datatailor.bakeoff.run import eval_testset

    config = plan.config
    judge, reference = plan.models[config.eval.judge], plan.models[config.eval.reference]
    items = sum(len(eval_testset(plan, s).records) for s in plan.splits)
    rows = []
    for m in plan.methods:
        row: dict[str, Any] = {"method": m.name}
        if m.recipe is not None:
            row["data"] = method_projection(plan, m)
            row["rating_calls"] = config.budget_pairs if config.eval.rate else 0  # at most: one per kept pair
        row["eval_calls"] = items * 3  # the tuned target's answer, and the judge in both orders
        row["eval_usd"] = items * 2 * _price(judge)
        rows.append(row)
    shared = {"reference_calls": items, "reference_usd": items * _price(reference)}  # answered once, then cached
    data = [r["data"] for r in rows if "data" in r]
    counted = [d["calls"] for d in data if d["calls"] is not None]
    fixed = shared["reference_calls"] + sum(r["eval_calls"] + r.get("rating_calls", 0) for r in rows)
    exact = fixed + sum(s["calls"]["value"] for d in data for s in d["stages"] if s["calls"] and s["calls"]["kind"] != ESTIMATE)
    total_calls = fixed + sum(c["value"] for c in counted)
    total_usd = shared["reference_usd"] + sum(d["usd"] for d in data) + sum(
        r["eval_usd"] + r.get("rating_calls", 0) * _price(judge) for r in rows)
    return {"rows": rows, "shared": shared, "items": items, "calls": total_calls, "counted_calls": exact, "usd": total_usd,
            "complete": len(counted) == len(data), "warnings": [d["warning"] for d in data if d["warning"]],
            "assumptions": f"$ and tokens: {PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} completion tokens per call; "
                           "estimated calls use outcome rates measured with scripted models (bakeoff/flow.py), real models "
                           "can differ several-fold; training runs locally and is not priced"}


def _figure(c: dict[str, Any] | None) -> str:
    if c is None:
        return "? (a stage the plan does not know)"
    label = {EXACT: "", AT_MOST: " (at most)", ESTIMATE: " (estimate)"}[c["kind"]]
    return f"{'~' if c['kind'] == ESTIMATE else ''}{c['value']:,}{label}"


def render(p: dict[str, Any]) -> str:
    lines = [f"projected cost (before anything is spent): about {p['calls']:,} model calls, of which {p['counted_calls']:,} "
             f"counted from the recipes and the test sets, the rest estimated; about ${p['usd']:.2f}"
             + ("" if p["complete"] else " plus the stages marked ?"),
             f"  reference answers: {p['shared']['reference_calls']:,} calls (${p['shared']['reference_usd']:.2f}), once for all methods"]
    for r in p["rows"]:
        lines.append(f"  {r['method']}: evaluation {r['eval_calls']:,} calls (${r['eval_usd']:.2f})"
                     + (f", rating at most {r['rating_calls']:,}" if r.get("rating_calls") else ""))
        d = r.get("data")
        if d is None:
            continue
        made = d["made"]
        reach = "" if made is None else f"; {_figure(made)} pairs before the trim" + (
            f", at most {made['most']:,}" if made["most"] is not None and made["kind"] != AT_MOST else "")
        lines.append(f"    data: {d['inputs']:,} input records ({'the seeds' if d['input'] == 'seeds' else 'its own input'}){reach}; "
                     f"{_figure(d['calls'])} calls (${d['usd']:.2f})")
        for s in d["stages"]:
            if s["calls"] is None or s["calls"]["value"] or s["type"] == "runner":
                lines.append(f"      {s['stage']}: {_figure(s['calls'])} calls, {_figure(s['pairs'])} records out — {s['how']}")
    for w in p["warnings"]:
        lines.append(f"warning: {w}")
    lines.append(f"  ({p['assumptions']})")
    return "\n".join(lines)
