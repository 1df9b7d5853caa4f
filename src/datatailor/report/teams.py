"""The TeaMs-RL run report: how the policy learned, which operations it chooses, and what the data cost in queries.

Written at the end of a run that used TeaMs-RL stages, into `reports/teams_rl_report.{json,md,html}`:

* the training curve (mean episode reward per TRPO update, from the `teams.train` stage's training_log.csv) and
  the last update's KL and operation shares;
* the operations chosen per step of the generated episodes, beside the uniform random choice (1/6 each) — and
  which schedule produced them (the trained policy alone, or the official schedule's bias and forced breadth);
* query accounting: expert queries (rewrites and answers), reviewer and rewriter calls and tokens, per kept pair;
  the paper reports 5.73 % of WizardLM's expert queries for 6.75 % of its data — compare with an Evol-Instruct run
  on the same seeds at the same size (`datatailor compare`, or benchmarks/bench_teams.py).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.journal import read_journal
from datatailor.report.page import figure, summary_page, write_report_files
from datatailor.report.svg import bar_chart, empty_chart

FIGURE_IDS = ("fig-training-curve", "fig-operations")
OPERATIONS = ("breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning", "complicate_input")


def _ns(record: dict[str, Any]) -> dict[str, Any]:
    ns = (record.get("metadata") or {}).get("teams_rl")
    return ns if isinstance(ns, dict) else {}


def _training_log(run_dir: Path, manifest: dict[str, Any]) -> list[dict[str, str]]:
    for index, stage in enumerate(manifest.get("stages", [])):
        if stage.get("type") == "teams.train":
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stage["name"])
            path = run_dir / "stages" / f"{index:02d}-{name}" / "policy" / "training_log.csv"
            if path.is_file():
                with path.open(encoding="utf-8") as fh:
                    return list(csv.DictReader(fh))
    return []


def build_teams_report(run_dir: Path) -> dict[str, Any]:
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    usage = json.loads((run_dir / "usage.json").read_text(encoding="utf-8")).get("total", {}) if (run_dir / "usage.json").is_file() else {}
    data = [r for r in read_journal(run_dir / "data.jsonl") if _ns(r)]
    log = _training_log(run_dir, manifest)
    per_step: dict[int, Counter[str]] = {}
    episodes = {(_ns(r)["seed_id"], _ns(r).get("episode", 0)): _ns(r)["ops"] for r in data}  # every pair carries its episode's ops
    for ops in episodes.values():  # so each episode is counted once, however many of its steps were kept
        for t, op in enumerate(ops):
            per_step.setdefault(t + 1, Counter())[op] += 1
    seeds = {_ns(r)["seed_id"] for r in data}
    overall: Counter[str] = Counter()
    for counts in per_step.values():
        overall.update(counts)
    total = sum(overall.values()) or 1
    stage_types = {s["name"]: s["type"] for s in manifest.get("stages", [])}
    stages = usage.get("stages") or {}
    generate_usage = [u for n, u in stages.items() if stage_types.get(n) == "teams.generate"]
    train_usage = [u for n, u in stages.items() if stage_types.get(n) == "teams.train"]
    n = len(data)

    def per_pair(value: float) -> float | None:
        return round(value / n, 4) if n else None

    roles = usage.get("roles") or {}
    return {
        "kind": "datatailor-teams-rl-report",
        "pairs": n,
        "seeds": len(seeds),
        "schedule": sorted({_ns(r)["schedule"] for r in data}),
        "training": {
            "updates": len(log),
            "curve": [{"update": int(r["update"]), "mean_episode_reward": float(r["mean_episode_reward"])}
                      for r in log if r.get("mean_episode_reward")],
            "last": log[-1] if log else None,
        },
        "operations": {
            "overall": {op: round(overall.get(op, 0) / total, 4) for op in OPERATIONS},
            "per_step": {str(t): {op: c.get(op, 0) for op in OPERATIONS} for t, c in sorted(per_step.items())},
            "uniform_random": round(1 / len(OPERATIONS), 4),
        },
        "queries": {
            "generation_requests": sum(u.get("requests", 0) for u in generate_usage),
            "training_requests": sum(u.get("requests", 0) for u in train_usage),
            "by_role": {role: {"requests": u.get("requests", 0), "tokens": u.get("prompt_tokens", 0) + u.get("completion_tokens", 0),
                               "cost_usd": u.get("cost_usd", 0.0)} for role, u in roles.items()},
            "generation_requests_per_pair": per_pair(sum(u.get("requests", 0) for u in generate_usage)),
            "expert_requests_per_pair": per_pair(roles.get("expert", {}).get("requests", 0)),
            "all_requests_per_pair": per_pair(usage.get("all", {}).get("requests", 0)),
        },
    }


def render_markdown(r: dict[str, Any]) -> str:
    t, q, ops = r["training"], r["queries"], r["operations"]
    lines = ["# TeaMs-RL report", "",
             f"- Pairs: **{r['pairs']}** from {r['seeds']} seeds; schedule: {', '.join(r['schedule']) or 'n/a'}",
             f"- Policy training: {t['updates']} TRPO updates"
             + (f"; mean episode reward {t['curve'][0]['mean_episode_reward']} → {t['curve'][-1]['mean_episode_reward']}" if t["curve"] else ""),
             f"- Queries: {q['generation_requests']} while generating ({q['generation_requests_per_pair']} per pair; expert "
             f"{q['expert_requests_per_pair']} per pair), {q['training_requests']} while training the policy",
             "", "| operation | share of the generated steps | uniform random |", "|---|---|---|"]
    for op, share in ops["overall"].items():
        lines.append(f"| {op} | {100 * share:.1f} % | {100 * ops['uniform_random']:.1f} % |")
    lines += ["", "| role | requests | tokens | $ |", "|---|---|---|---|"]
    for role, u in q["by_role"].items():
        lines.append(f"| {role} | {u['requests']} | {u['tokens']} | {u['cost_usd']:.4f} |")
    return "\n".join(lines) + "\n"


def render_html(r: dict[str, Any], markdown: str) -> str:
    curve = r["training"]["curve"]
    training = (bar_chart("Mean episode reward per update", [str(p["update"]) for p in curve],
                          [("reward", [p["mean_episode_reward"] for p in curve])], fmt=lambda v: f"{v:.1f}")
                if curve else empty_chart("Mean episode reward per update", "no teams.train stage in this run"))
    ops = r["operations"]["overall"]
    operations = bar_chart("Operations chosen", list(ops), [("this run", list(ops.values())),
                                                             ("uniform random", [r["operations"]["uniform_random"]] * len(ops))],
                           y_max=1.0, fmt=lambda v: f"{100 * v:.0f}%", legend=True)
    summary = markdown.replace("# TeaMs-RL report", "").strip()
    return summary_page("TeaMs-RL report", summary, [
        figure("fig-training-curve", training, "The TRPO training curve: mean reward of the episodes of each update (at most 6 per episode)."),
        figure("fig-operations", operations, "Share of each Evol-Instruct operation over the generated episodes' steps, beside a uniform random choice."),
    ])


def write_teams_report(run_dir: Path) -> dict[str, Any]:
    report = build_teams_report(run_dir)
    markdown = render_markdown(report)
    folder = run_dir / "reports"
    write_report_files(folder, "teams_rl_report", report, markdown, render_html(report, markdown))
    return report
