"""`datatailor eval` and `datatailor rate` as engine runs.

An evaluation is a recipe built in code and run by the ordinary runner, so it gets the request
cache, checkpoints/resume, progress, usage and budget like any other run:

    answer-reference  generate (respond.j2) → metadata.reference   (skipped with stored references)
    answer-candidate  respond (respond.j2)  → response
    judge             judge.pairwise: response (A) vs metadata.reference (B), both orders, temperature 0

The evaluation folder (`--out`) holds::

    testset.jsonl  the items evaluated (the recipe's input)
    run/           the engine's run directory (manifest, usage, checkpoints, data.jsonl, failures.jsonl)
    eval.json      W/T/L and CRR/WR1/WR2/QS under every rule, judge consistency, usage
    eval.md        the same as a table

The candidate is side A, so a verdict "a" is a candidate win. The headline rule is `strict`
(CodecLM's CRR); WR1/WR2/QS are reported under the same rule, and every rule's table is kept.

N is always the whole test set. An item the candidate did not answer (an error, an empty answer) is a
loss; so is an item that could not be judged (the reference failed, or the judge's reply did not parse
in one of the orders) — the headline is a lower bound that failures can only lower, never raise. A
candidate answer cut off by max_tokens is judged as written: a base model that rambles to the limit is
what an untuned row measures, not a failure. `eval.json` counts `judged`, `unanswered`, `unjudgeable`
and `truncated_answers` (with the W/T/L of those cut-off answers), and gives the judged-only figures
beside the headline, labelled as such. When the judge's position
consistency is below `consistency_threshold` (default 0.6), the report says plainly that its verdicts
are dominated by answer order and the figures are not meaningful.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatailor.errors import UserError
from datatailor.scoring.judge import SCORES_ONLY, Rule
from datatailor.evaluate.metrics import WTL, evaluate_scores, metric_table, percent, scores_from_summary, wtl_from_scores
from datatailor.evaluate.modelspec import describe_model, model_label
from datatailor.scoring.quality import QUALITY_TEMPLATE, stored_scores, summarize_quality
from datatailor.evaluate.testsets import TestSet, describe
from datatailor.io import atomic_open, read_jsonl_rows, read_records, write_json
from datatailor.llm.usage import Budget
from datatailor.recipe import Recipe, parse_recipe
from datatailor.records import Record
from datatailor.runner import RunResult, run_recipe_sync

RESPOND_TEMPLATE = "respond.j2"
JUDGE_OUTPUT = "metadata.judge"
CANDIDATE_STAGE = "answer-candidate"


@dataclass
class EvalPlan:
    """Everything `datatailor eval` needs; the CLI only fills this in."""

    testset: TestSet
    candidate: Any
    judge: Any
    reference: Any | None = None  # None: use the test set's stored reference answers
    rule: Rule = "strict"
    respond_template: str = RESPOND_TEMPLATE
    judge_template: str = SCORES_ONLY
    limit: int | None = None
    answer_max_tokens: int | None = None  # None: each answering model's own max_tokens
    reference_max_tokens: int | None = None  # the reference's own limit, when it differs (None: answer_max_tokens)
    seed: int = 0
    budget: Budget | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    cache: bool = True
    consistency_threshold: float = 0.6
    scoring: str = "sampled"  # or "logprob": expected scores from the judge's token probabilities

    @property
    def stored_reference(self) -> bool:
        return self.reference is None

    def items(self) -> list[Record]:
        records = self.testset.with_references() if self.stored_reference else list(self.testset.records)
        if self.stored_reference and not records:
            raise UserError(
                f"test set {self.testset.name} has no stored reference answers; pass --reference MODEL instead of 'stored'"
            )
        return records[: self.limit] if self.limit else records


def build_eval_recipe(plan: EvalPlan, input_path: Path) -> Recipe:
    models = {"candidate": plan.candidate, "judge": plan.judge}
    stages: list[dict[str, Any]] = []
    if not plan.stored_reference:
        models["reference"] = plan.reference
        stages.append(
            {"type": "generate", "name": "answer-reference", "role": "reference", "template": plan.respond_template,
             "output": "metadata.reference",
             "max_tokens": plan.reference_max_tokens if plan.reference_max_tokens is not None else plan.answer_max_tokens}
        )
    # keep_truncated: a cut-off answer is the candidate's answer, judged as written and counted (never a failure
    # that would stop the run or drop the item).
    stages.append({"type": "respond", "name": CANDIDATE_STAGE, "role": "candidate", "template": plan.respond_template,
                   "max_tokens": plan.answer_max_tokens, "keep_truncated": True})
    stages.append(
        {"type": "judge.pairwise", "name": "judge", "role": "judge", "a": "response", "b": "metadata.reference",
         "rule": plan.rule, "template": plan.judge_template, "output": JUDGE_OUTPUT, "temperature": 0.0,
         "scoring": plan.scoring}
    )
    data = {
        "name": f"eval-{plan.testset.name}",
        "models": {role: cfg.model_dump(mode="json") for role, cfg in models.items()},
        "input": str(input_path),
        "stages": stages,
        "seed": plan.seed,
        "budget": plan.budget.model_dump() if plan.budget else None,
        "cache": plan.cache,
    }
    return parse_recipe(data, source=f"eval recipe ({plan.testset.name})", base_dir=plan.base_dir)


def run_eval(plan: EvalPlan, out: Path, *, force: bool = False, show_progress: bool | None = None) -> tuple[RunResult, dict[str, Any] | None]:
    """Run (or resume) an evaluation in `out`; write eval.json/eval.md when it completes."""
    records = plan.items()
    input_path = out / "testset.jsonl"
    new_items = "".join(r.to_json() + "\n" for r in records)
    if (out / "run" / "manifest.json").exists() and input_path.is_file() and not force:
        if input_path.read_text(encoding="utf-8") != new_items:
            raise UserError(
                f"{out} holds an evaluation of other test items (test set, --limit or references differ); "
                "use another --out, or --force to discard it"
            )
    with atomic_open(input_path) as fh:
        fh.write(new_items)
    recipe = build_eval_recipe(plan, input_path)
    result = run_recipe_sync(recipe, out / "run", force=force, show_progress=show_progress)
    if result.status != "complete":
        return result, None
    summary = summarize_eval(out / "run", plan, records)
    write_json(out / "eval.json", summary)
    (out / "eval.md").write_text(render_eval_md(summary), encoding="utf-8")
    return result, summary


def _failure_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "failures.jsonl"
    return [row for _, row in read_jsonl_rows(path)] if path.is_file() else []


def truncated_answers(run_dir: Path) -> set[str]:
    """Ids of the items whose candidate answer was cut off by max_tokens (and kept), judged or not."""
    rows = [r.model_dump(mode="json") for r in read_records(run_dir / "data.jsonl")] if (run_dir / "data.jsonl").is_file() else []
    rows += [row["record"] for row in _failure_rows(run_dir) if isinstance(row.get("record"), dict)]
    return {r["id"] for r in rows
            if any(e.get("stage") == CANDIDATE_STAGE and (e.get("details") or {}).get("truncated") for e in r.get("lineage") or [])}


def _failure_kinds(run_dir: Path) -> dict[str, int]:
    return dict(Counter(f"{row['stage']}:{row['kind']}" for row in _failure_rows(run_dir)))


def _usage(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "usage.json"
    return json.loads(path.read_text(encoding="utf-8")).get("total", {}) if path.is_file() else {}


CONSISTENCY_WARNING = (
    "the judge gave the same verdict in both answer orders for only {share} of the judged items (below {threshold}): "
    "its verdicts are dominated by which answer it sees first, so these figures are not meaningful; use a stronger "
    "judge, or the logprob scoring mode"
)


def _with_losses(table: WTL, losses: int) -> WTL:
    return WTL(wins=table.wins, ties=table.ties, losses=table.losses + losses)


def summarize_eval(run_dir: Path, plan: EvalPlan, items: list[Record]) -> dict[str, Any]:
    """eval.json: every metric over all N items of a finished evaluation run (see the module docstring)."""
    judged = {r.id: r for r in read_records(run_dir / "data.jsonl") if isinstance(r.metadata.get("judge"), dict)}
    failed = {row["id"]: row for row in _failure_rows(run_dir)}
    unanswered = {i.id for i in items if i.id in failed and failed[i.id]["stage"] == CANDIDATE_STAGE}
    unjudgeable = {i.id for i in items if i.id not in judged and i.id not in unanswered}
    scores = {rid: scores_from_summary(r.metadata["judge"]) for rid, r in judged.items()}
    cut = {i.id for i in items} & truncated_answers(run_dir)
    judged_only = evaluate_scores(list(scores.values()))
    by_rule = {
        rule: metric_table(_with_losses(wtl_from_scores(scores.values(), rule), len(unanswered) + len(unjudgeable)))
        for rule in ("strict", "lenient", "mean")
    }
    by_category: dict[str, Any] = {}
    for category in sorted({str(i.metadata["category"]) for i in items if i.metadata.get("category") is not None}):
        mine = [i for i in items if str(i.metadata.get("category")) == category]
        lost = sum(1 for i in mine if i.id not in scores)
        by_category[category] = metric_table(_with_losses(wtl_from_scores([scores[i.id] for i in mine if i.id in scores], plan.rule), lost))
    consistency = judged_only["position_consistency"]
    warning = None
    if consistency is not None and consistency < plan.consistency_threshold:
        warning = CONSISTENCY_WARNING.format(share=format_percent(consistency), threshold=format_percent(plan.consistency_threshold))
    return {
        "kind": "datatailor-eval",
        "testset": describe(plan.testset),
        "items": len(items),
        "judged": len(scores),
        "unanswered": len(unanswered),
        "unjudgeable": len(unjudgeable),
        "truncated_answers": len(cut),
        "truncated_answers_note": "candidate answers cut off by max_tokens, judged as written (counted in every figure)",
        "truncated_by_rule": {rule: metric_table(_with_losses(wtl_from_scores([scores[i] for i in sorted(cut) if i in scores], rule),
                                                              sum(1 for i in cut if i not in scores)))
                              for rule in ("strict", "lenient", "mean")} if cut else None,
        "failures": _failure_kinds(run_dir),
        "rule": plan.rule,
        "metrics": by_rule[plan.rule],
        "by_rule": by_rule,
        "judged_only": {
            "note": "over the judged items only, leaving out unanswered and unjudgeable ones: not the headline",
            "metrics": judged_only["by_rule"][plan.rule],
            "by_rule": judged_only["by_rule"],
        },
        "position_consistency": consistency,
        "flip_rate": judged_only["flip_rate"],
        "consistency_threshold": plan.consistency_threshold,
        "consistency_warning": warning,
        "by_category": by_category,
        "seed": plan.seed,
        "scoring": plan.scoring,
        "models": {
            "candidate": describe_model(plan.candidate),
            "reference": "stored" if plan.stored_reference else describe_model(plan.reference),
            "judge": describe_model(plan.judge),
        },
        "judge_template": plan.judge_template,
        "usage": _usage(run_dir),
        "run_dir": "run",
    }


def format_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{percent(value)} %"


def render_eval_md(s: dict[str, Any]) -> str:
    m = s["metrics"]
    lines = [
        f"# Evaluation on {s['testset']['name']}",
        "",
        f"Candidate `{model_label(s['models']['candidate'])}` against `{model_label(s['models']['reference'])}`; judge "
        f"`{model_label(s['models']['judge'])}`, both orders, temperature 0; seed {s.get('seed', 0)}.",
        "",
    ]
    if s.get("consistency_warning"):
        lines += [f"> **Warning:** {s['consistency_warning']}.", ""]
    lines += [
        f"N = {s['items']} (the whole test set): {s['judged']} judged, {s['unanswered']} unanswered by the candidate, "
        f"{s['unjudgeable']} unjudgeable; unanswered and unjudgeable items count as losses"
        + (f" (failures: {s['failures']})" if s["failures"] else "") + ".",
        "",
    ]
    if s.get("truncated_answers"):
        t = s["truncated_by_rule"][s["rule"]]
        lines += [f"{s['truncated_answers']} of the candidate's answers were cut off by max_tokens and judged as written "
                  f"(W/T/L {t['wins']}/{t['ties']}/{t['losses']} among them, {s['rule']} rule; flagged `truncated` in the "
                  "run's lineage).", ""]
    lines += [
        "| rule | W | T | L | N | CRR % | WR1 % | WR2 % | QS % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rule, t in s["by_rule"].items():
        mark = " (headline)" if rule == s["rule"] else ""
        lines.append(
            f"| {rule}{mark} | {t['wins']} | {t['ties']} | {t['losses']} | {t['n']} | {percent(t['crr'])} | "
            f"{percent(t['wr1'])} | {percent(t['wr2'])} | {percent(t['qs'])} |"
        )
    lines += [
        "",
        f"Judge position consistency: {format_percent(s['position_consistency'])} of comparisons gave the same verdict in "
        f"both orders; the winner flipped in {format_percent(s['flip_rate'])}.",
        "",
        f"Headline ({s['rule']} rule, over all N): CRR {format_percent(m['crr'])}, WR1 {format_percent(m['wr1'])}, "
        f"WR2 {format_percent(m['wr2'])}, QS {format_percent(m['qs'])} (W/T/L {m['wins']}/{m['ties']}/{m['losses']}).",
        f"Judged items only (not the headline): CRR {format_percent(s['judged_only']['metrics']['crr'])} over "
        f"{s['judged']} items.",
    ]
    if s["by_category"]:
        lines += ["", "| category | W | T | L | CRR % |", "|---|---|---|---|---|"]
        for cat, t in s["by_category"].items():
            lines.append(f"| {cat} | {t['wins']} | {t['ties']} | {t['losses']} | {percent(t['crr'])} |")
    usage = s.get("usage", {}).get("all", {})
    if usage:
        lines += ["", f"Model calls: {usage.get('requests', 0)} requests, {usage.get('cache_hits', 0)} cache hits, "
                  f"${usage.get('cost_usd', 0.0):.4f}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- quality rating


def build_rate_recipe(data_path: Path, judge: Any, *, template: str = QUALITY_TEMPLATE, seed: int = 0,
                      max_tokens: int | None = None, budget: Budget | None = None, base_dir: Path | None = None,
                      cache: bool = True, scoring: str = "sampled") -> Recipe:
    data = {
        "name": "quality-rating",
        "models": {"judge": judge.model_dump(mode="json")},
        "input": str(data_path),
        "stages": [{"type": "quality.rate", "name": "rate", "role": "judge", "template": template, "max_tokens": max_tokens,
                    "scoring": scoring}],
        "seed": seed,
        "budget": budget.model_dump() if budget else None,
        "cache": cache,
    }
    return parse_recipe(data, source="rating recipe", base_dir=base_dir or Path.cwd())


def data_file(source: Path) -> Path:
    """The dataset of a run directory (its data.jsonl), or the file itself."""
    if source.is_dir() and (source / "manifest.json").exists():
        data = source / "data.jsonl"
        if not data.exists():
            raise UserError(f"{source}: the run is not complete yet (no data.jsonl); re-run it first")
        return data
    return source


def run_rate(data_path: Path, judge: Any, out: Path, *, force: bool = False, show_progress: bool | None = None,
             **recipe_options: Any) -> tuple[RunResult, dict[str, Any] | None]:
    """Rate every pair of a dataset 0–5; write quality.json into `out` (the run itself goes to out/run)."""
    recipe = build_rate_recipe(data_path.resolve(), judge, **recipe_options)
    result = run_recipe_sync(recipe, out / "run", force=force, show_progress=show_progress)
    if result.status != "complete":
        return result, None
    rated = read_records(out / "run" / "data.jsonl")
    summary = {
        "kind": "datatailor-quality",
        "data": str(data_path),
        "judge": describe_model(judge),
        **summarize_quality(stored_scores(rated)).model_dump(),
        # kept unrated: the judge's rating did not parse (quality.rate's `unparsable: keep`); not in the figures above
        "unrated": sum(1 for r in rated if "quality" in r.metadata and r.metadata["quality"] is None),
        "failures": _failure_kinds(out / "run"),
        "usage": _usage(out / "run"),
    }
    write_json(out / "quality.json", summary)
    return result, summary
