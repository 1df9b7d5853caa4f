"""The bake-off's table: what CodecLM's Table 1 gives (CRR with W/T/L per method and test set), WR1/WR2/QS,
the judge's consistency, each method's cost, quality, diversity and contamination, and a ranking with how
confident it is. Every win/tie/loss is read back from the evaluation runs, so the table's numbers are theirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datatailor.bakeoff.stats import bootstrap
from datatailor.evaluate.diversity import diversity_report
from datatailor.evaluate.metrics import outcome, scores_from_summary
from datatailor.io import read_records
from datatailor.journal import iter_journal
from datatailor.report.page import figure, markdown_html, page, warning_banner, write_report_files
from datatailor.report.svg import bar_chart, empty_chart

if TYPE_CHECKING:
    from datatailor.bakeoff.run import Plan

REPORT = "bakeoff_report"


def item_outcomes(eval_dir: Path, rule: str) -> list[str]:
    """The candidate's outcome on every evaluated item, in test-set order; an item left unanswered or unjudged
    is a loss (as in eval.json)."""
    items = [json.loads(line)["id"] for line in (eval_dir / "testset.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    judged = {r.id: r for r in read_records(eval_dir / "run" / "data.jsonl") if isinstance(r.metadata.get("judge"), dict)}
    return [outcome(scores_from_summary(judged[i].metadata["judge"]).verdict(rule)) if i in judged else "loss" for i in items]


def _usage(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "usage.json"
    return json.loads(path.read_text(encoding="utf-8"))["total"]["all"] if path.exists() else {}


def _dropped(run_dir: Path, stage: str) -> int:
    return sum(1 for row in iter_journal(run_dir / "failures.jsonl") if row.get("stage") == stage)


def collect(plan: Plan, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from datatailor.bakeoff.run import DECONTAM, TRIM, eval_testset

    config = plan.config
    rule = config.eval.rule
    methods: dict[str, Any] = {}
    pooled: dict[str, list[str]] = {}
    for name, row in rows.items():
        folder = plan.folder(name)
        entry: dict[str, Any] = {"untuned": row["untuned"], "recipe": row["recipe"], "testsets": {}}
        if row["eval"] is None:  # no pairs: nothing to train or judge
            entry["data"] = {"pairs": 0, "short": True, "status": row["data"]["status"], "message": row["data"]["message"]}
            methods[name] = entry
            continue
        pooled[name] = []
        for split in plan.splits:
            summary = row["eval"][split.name]
            outcomes = item_outcomes(folder / "eval" / split.name, rule)
            pooled[name] += outcomes
            entry["testsets"][split.name] = {
                **summary["metrics"],
                "position_consistency": summary["position_consistency"],
                "consistency_warning": summary["consistency_warning"],
                "truncated_answers": summary.get("truncated_answers", 0),  # cut off by max_tokens, judged as written
            }
        if not row["untuned"]:
            run_dir = folder / "run"
            data = read_records(run_dir / "data.jsonl")
            usage = _usage(run_dir)
            pairs = len(data)
            tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            entry["data"] = {
                "pairs": pairs,
                "short": pairs < config.budget_pairs,
                "status": row["data"]["status"],
                "contamination_dropped": _dropped(run_dir, DECONTAM),
                "trimmed": _dropped(run_dir, TRIM),
                "requests": usage.get("requests", 0),
                "tokens": tokens,
                "cost_usd": usage.get("cost_usd", 0.0),
                "requests_per_pair": usage.get("requests", 0) / pairs if pairs else None,
                "tokens_per_pair": tokens / pairs if pairs else None,
                "cost_per_pair": usage.get("cost_usd", 0.0) / pairs if pairs else None,
            }
            q = row.get("quality")
            entry["quality"] = None if q is None else {
                "histogram": q.get("histogram"), "mean": q.get("mean"), "high_quality_share": q.get("high_quality_share"),
            }
            d = diversity_report(data, seed=config.seed)
            entry["diversity"] = {"distinct_1": d.distinct_1, "distinct_2": d.distinct_2,
                                  "rouge_l_self_similarity": d.rouge_l_self_similarity.get("mean")}
        if row.get("train"):
            t = row["train"]
            entry["train"] = {"steps": t.get("steps"), "first_loss": t.get("first_loss"), "final_loss": t.get("final_loss"),
                              "wall_time_s": t.get("wall_time_s")}
        methods[name] = entry
    judged = [(n, s, t) for n, m in methods.items() for s, t in m["testsets"].items()]
    low = [(n, s, t) for n, s, t in judged if t["consistency_warning"]]
    warnings = [f"{n} on {s}: {t['consistency_warning']}" for n, s, t in low]
    if len(low) > 1 and len(low) == len(judged):  # the judge, not a method: say it once
        consistency = [t["position_consistency"] or 0.0 for _, _, t in low]
        lowest, highest = min(consistency), max(consistency)
        span = f"{100 * lowest:.1f} %" if lowest == highest else f"{100 * lowest:.1f}–{100 * highest:.1f} %"
        warnings = [f"for every method and test set, the judge gave the same verdict in both answer orders for only {span} "
                    f"of the judged items (below {100 * config.eval.consistency_threshold:.0f} %): its verdicts are dominated "
                    "by which answer it sees first, so no win rate here is meaningful; use a stronger judge, or the logprob "
                    "scoring mode"]
    confidence = bootstrap(pooled, config.eval.bootstrap, config.seed)
    short = [n for n, m in methods.items() if m.get("data", {}).get("short")]
    notes = []
    if short:
        notes.append(f"fewer pairs than budget_pairs={config.budget_pairs} (their rows say how many; compare them knowing "
                     f"that): {', '.join(short)}")
    cut = [f"{n} on {s} {t['truncated_answers']}" for n, m in methods.items() for s, t in m["testsets"].items() if t["truncated_answers"]]
    if cut:
        notes.append(f"answers cut off by max_tokens, judged as written (counted in every figure): {', '.join(cut)}")
    if config.eval_limit:
        notes.append(f"eval_limit={config.eval_limit}: only the first {config.eval_limit} items of each evaluation part were judged")
    return {
        "kind": "datatailor-bakeoff",
        "name": config.name,
        "budget_pairs": config.budget_pairs,
        "seed": config.seed,
        "rule": rule,
        "testsets": [{"name": s.name, "items": len(s.testset.records), "seeds": len(s.seeds),
                      "evaluation": len(s.evaluation), "judged": len(eval_testset(plan, s).records)} for s in plan.splits],
        "methods": methods,
        "ranking": confidence,
        "warnings": warnings,
        "notes": notes,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def render_markdown(r: dict[str, Any]) -> str:
    sets = [t["name"] for t in r["testsets"]]
    lines = [f"# Bake-off: {r['name']}", "",
             f"Every method was asked for {r['budget_pairs']} pairs from the same seeds (seed {r['seed']}); the target was tuned on "
             f"each and judged against the reference in both orders ({r['rule']} rule).", ""]
    lines += ["Test sets: " + "; ".join(f"{t['name']}: {t['seeds']} seeds, {t['judged']} of {t['evaluation']} evaluation items judged"
                                         for t in r["testsets"]), ""]
    conf = r["ranking"]["methods"]
    lines += ["| method | " + " | ".join(f"{s} CRR % (W/T/L)" for s in sets) + " | all: CRR % [95 % interval] | WR1 | WR2 | QS |",
              "|---|" + "---|" * (len(sets) + 4)]
    for name in r["ranking"]["ranking"] or list(r["methods"]):
        m = r["methods"][name]
        if not m["testsets"]:
            continue
        cells = [f"{_pct(t['crr'])} ({t['wins']}/{t['ties']}/{t['losses']})" for t in (m["testsets"][s] for s in sets)]
        total = {k: sum(m["testsets"][s][k] for s in sets) for k in ("wins", "ties", "losses", "n")}
        c = conf.get(name, {})
        wr1 = (total["wins"] + total["ties"] / 2) / total["n"] if total["n"] else None
        wr2 = total["wins"] / (total["wins"] + total["losses"]) if total["wins"] + total["losses"] else None
        qs = (total["wins"] + total["ties"]) / total["n"] if total["n"] else None
        label = name + (" (untuned)" if m["untuned"] else "") + (" (short)" if m.get("data", {}).get("short") else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{_pct(c.get('crr'))}** [{_pct(c.get('low'))}, {_pct(c.get('high'))}] | "
                     f"{_pct(wr1)} | {_pct(wr2)} | {_pct(qs)} |")
    lines += ["", "Ranking (paired bootstrap over the test items, "
              f"{r['ranking']['resamples']} resamples):"]
    for d in r["ranking"]["differences"]:
        verdict = "ahead" if d["differs"] else "not distinguishable from"
        lines.append(f"- {d['higher']} {verdict} {d['lower']}: CRR difference {_pct(d['difference'])} points, "
                     f"95 % interval [{_pct(d['low'])}, {_pct(d['high'])}]")
    buckets = next((list(m["quality"]["histogram"]) for m in r["methods"].values() if (m.get("quality") or {}).get("histogram")), [])
    lines += ["", "| method | pairs | contamination dropped | calls / pair | tokens / pair | $ / pair | quality mean | "
              f"quality histogram {' / '.join(buckets) or 'n/a'} | high quality (≥ 4.5) | distinct-2 | judge consistency |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        if not m["testsets"]:
            lines.append(f"| {name} | 0 of {r['budget_pairs']}: {m['data']['message']} (not trained, not judged) |" + " — |" * 9)
            continue
        consistency = ", ".join(f"{s} {_pct(m['testsets'][s]['position_consistency'])} %" for s in sets)
        d = m.get("data")
        if d is None:
            lines.append(f"| {name} (untuned) |" + " — |" * 9 + f" {consistency} |")
            continue
        q = m.get("quality") or {}
        per = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        histogram = " / ".join(str(c) for c in q["histogram"].values()) if q.get("histogram") else "n/a"
        lines.append(f"| {name} | {d['pairs']} of {r['budget_pairs']} | {d['contamination_dropped']} | {per(d['requests_per_pair'], '.2f')} | "
                     f"{per(d['tokens_per_pair'], '.0f')} | {per(d['cost_per_pair'], '.5f')} | {per(q.get('mean'), '.2f')} | {histogram} | "
                     f"{_pct(q.get('high_quality_share'))} % | {per(m['diversity']['distinct_2'], '.3f')} | {consistency} |")
    for note in r["notes"]:
        lines += ["", f"Note: {note}"]
    for w in r["warnings"]:
        lines += ["", f"**Warning:** {w}"]
    return "\n".join(lines) + "\n"


def render_html(r: dict[str, Any], markdown: str) -> str:
    conf = r["ranking"]["methods"]
    names = r["ranking"]["ranking"]
    chart = (bar_chart("CRR over every test item, per method, with its 95 % interval", names, [("CRR", [conf[n]["crr"] for n in names])],
                       y_max=1.0, fmt=lambda v: f"{100 * v:.0f}%", intervals=[[(conf[n]["low"], conf[n]["high"]) for n in names]])
             if names else empty_chart("CRR per method", "nothing was judged"))
    warnings = "".join(warning_banner(w) for w in r["warnings"])
    rated = [n for n, m in r["methods"].items() if (m.get("quality") or {}).get("histogram")]
    quality = (bar_chart("Quality ratings of each method's pairs (0-5, the judge)", rated,
                         [(bucket, [r["methods"][n]["quality"]["histogram"][bucket] for n in rated])
                          for bucket in r["methods"][rated[0]]["quality"]["histogram"]],
                         fmt=lambda v: f"{v:g}", legend=True)
               if rated else empty_chart("Quality ratings", "no method's data was rated"))
    summary = "\n".join(line for line in markdown.split("\n", 1)[1].splitlines() if not line.startswith("**Warning:**"))
    body = (warnings + markdown_html(summary) + "\n"
            + figure("fig-crr", chart, "Capacity recovery ratio (W + T) / N of each tuned target against the reference over "
                     "every judged item of every test set; the error bar is its 95 % paired-bootstrap interval.")
            + figure("fig-quality", quality, "How many of each method's pairs the judge rated in each band; the last band "
                     "(4.5 and above) is the high-quality share."))
    return page(f"Bake-off: {r['name']}", body)


def write_report(out: Path, report: dict[str, Any]) -> None:
    markdown = render_markdown(report)
    write_report_files(out, REPORT, report, markdown, render_html(report, markdown))
