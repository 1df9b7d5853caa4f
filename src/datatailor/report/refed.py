"""The REFED run report: what the references yielded, what it cost, what the improvement and the judge did.

Written at the end of a run that used REFED stages, into `reports/refed_report.{json,md,html}` of the run
directory, from the run's final files: data.jsonl, failures.jsonl, the manifest, usage.json (what was spent, earlier
rounds included), and each stage's final records (records.jsonl) — never a stage's journal, which still holds the
records of earlier rounds:

* the reference pool: input rows, rejected ones by kind, available, drawn (distinct, passes), not drawn;
  pairs per reference;
* calls, tokens and $ per kept pair for the whole run, and the feedback calls (REFED's point: one collection per
  reference instead of one per sample; the paper's pipeline makes 2 + 42 calls per reference for up to 20 pairs);
* improvement: pairs improved, length (words) of the draft and of the improved response;
* the LLM judge, when the recipe has one comparing the improved response with the draft: how often it prefers the
  improved one (strict rule, both orders), and its position consistency;
* instruction diversity against the references: ROUGE-L of each new instruction with its reference, distinct-2.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.journal import read_journal
from datatailor.report.page import figure, summary_page, write_report_files
from datatailor.report.svg import bar_chart, empty_chart
from datatailor.scoring.text import ngrams, rouge_l_text, tokenize

REPORT_DIR = "reports"
FIGURE_IDS = ("fig-pairs-per-reference", "fig-calls-per-stage", "fig-lengths")
PAPER_CALLS_PER_PAIR = (2 + 42) / 20  # feedback 2 + synthesis 2 + 20 drafts + 20 improvements, for 20 pairs


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _stage_final(run_dir: Path, manifest: dict[str, Any], failures: list[dict[str, Any]], stage_type: str
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """(output records, failure rows, summary) of the first stage of `stage_type`, as the run ended: its outputs
    from its records.jsonl (what its last pass passed on), its failures from the run's failures.jsonl. Never its
    journal (outputs.jsonl), which still holds what earlier rounds made."""
    for index, summary in enumerate(manifest.get("stages", [])):
        if summary.get("type") == stage_type:
            folder = run_dir / "stages" / f"{index:02d}-{_safe(summary['name'])}"
            return (read_journal(folder / "records.jsonl"), [f for f in failures if f.get("stage") == summary["name"]], summary)
    return [], [], None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _ns(record: dict[str, Any]) -> dict[str, Any]:
    ns = (record.get("metadata") or {}).get("refed")
    return ns if isinstance(ns, dict) else {}


def _per(value: float, n: int) -> float | None:
    return round(value / n, 6) if n else None


def _distinct2(texts: list[str]) -> float | None:
    grams = [g for t in texts for g in ngrams(tokenize(t), 2)]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def build_refed_report(run_dir: Path) -> dict[str, Any]:
    manifest = _json(run_dir / "manifest.json")
    usage = _json(run_dir / "usage.json").get("total", {})
    data = read_journal(run_dir / "data.jsonl")
    failures = read_journal(run_dir / "failures.jsonl")
    kept = [r for r in data if _ns(r)]
    types = {s["name"]: s["type"] for s in manifest.get("stages", [])}
    stage_usage = {name: u for name, u in (usage.get("stages") or {}).items()}
    all_usage = usage.get("all", {})
    references, ref_failures, ref_summary = _stage_final(run_dir, manifest, failures, "refed.references")

    per_reference = Counter(_ns(r).get("reference_id") for r in kept)
    synthesized = [r for r in kept if _ns(r).get("feature")]
    improved = [r for r in kept if _ns(r).get("analysis") is not None]
    feedback_stages = [n for n, t in types.items() if t in ("refed.feedback", "refed.sample_feedback")]
    feedback_calls = sum(stage_usage.get(n, {}).get("requests", 0) for n in feedback_stages)
    n = len(kept)
    tokens = all_usage.get("prompt_tokens", 0) + all_usage.get("completion_tokens", 0)

    judge = None
    judged, judge_failures, judge_summary = _stage_final(run_dir, manifest, failures, "judge.pairwise")
    if judge_summary is not None:
        summaries = [s for r in judged + [f["record"] for f in judge_failures if f.get("kind") == "judge_filter"]
                     for s in [(r.get("metadata") or {}).get("judge")] if isinstance(s, dict)]
        verdicts = Counter(s["verdict"] for s in summaries)
        judge = {
            "stage": judge_summary["name"],
            "judged": len(summaries),
            "prefers_improved": verdicts.get("a", 0),
            "prefers_draft": verdicts.get("b", 0),
            "ties": verdicts.get("tie", 0),
            "prefers_improved_share": _per(verdicts.get("a", 0), len(summaries)),
            "position_consistency": _per(sum(1 for s in summaries if s.get("position_consistent")), len(summaries)),
        }

    similarity = [rouge_l_text(r["instruction"], _ns(r)["reference_instruction"]) for r in synthesized]
    reference_texts = list(dict.fromkeys(_ns(r).get("reference_instruction", "") for r in references))
    draft_words = [len(_ns(r)["draft"].split()) for r in improved if _ns(r).get("draft")]
    improved_words = [len((r.get("response") or "").split()) for r in improved]
    return {
        "kind": "datatailor-refed-report",
        "status": manifest.get("status"),
        "budget_pairs": manifest.get("budget_pairs"),
        "kept_pairs": n,
        "shortfall": manifest.get("shortfall"),
        "references": reference_pool(references, ref_failures, ref_summary, per_reference),
        "pairs_per_reference": {
            "mean": round(statistics.fmean(per_reference.values()), 3) if per_reference else None,
            "min": min(per_reference.values(), default=None),
            "max": max(per_reference.values(), default=None),
            "histogram": dict(sorted(Counter(per_reference.values()).items())),
        },
        "cost": {
            "requests": all_usage.get("requests", 0),
            "cache_hits": all_usage.get("cache_hits", 0),
            "tokens": tokens,
            "cost_usd": all_usage.get("cost_usd", 0.0),
            "requests_per_kept_pair": _per(all_usage.get("requests", 0), n),
            "tokens_per_kept_pair": _per(tokens, n),
            "usd_per_kept_pair": _per(all_usage.get("cost_usd", 0.0), n),
            "paper_calls_per_pair": PAPER_CALLS_PER_PAIR,
            "feedback_calls": feedback_calls,
            "feedback_stages": feedback_stages,
            "per_stage": {name: {"type": types.get(name), **u} for name, u in stage_usage.items()},
        },
        "improvement": {
            "improved_pairs": len(improved),
            "draft_words_mean": round(statistics.fmean(draft_words), 1) if draft_words else None,
            "improved_words_mean": round(statistics.fmean(improved_words), 1) if improved_words else None,
        },
        "judge": judge,
        "diversity": {
            "instructions": len(synthesized),
            "rouge_l_to_reference_mean": round(statistics.fmean(similarity), 4) if similarity else None,
            "rouge_l_to_reference_at_least_0.7": sum(1 for s in similarity if s >= 0.7),
            "distinct_2_instructions": _distinct2([r["instruction"] for r in kept]),
            "distinct_2_references": _distinct2(reference_texts),
        },
    }


def reference_pool(references: list[dict[str, Any]], rejected: list[dict[str, Any]], summary: dict[str, Any] | None,
                   per_reference: Counter[Any]) -> dict[str, Any]:
    """What became of the reference stage's input rows. It is a pool to draw from, not a list to process: each row
    is rejected (a failure row), or available; of the available ones some were drawn, the others were not needed
    and stay in the input file only (in neither data.jsonl nor failures.jsonl)."""
    inputs = (summary or {}).get("inputs", 0)
    available = inputs - len(rejected)
    distinct = len({_ns(r).get("reference_id") for r in references})
    return {
        "input_rows": inputs,
        "rejected": dict(sorted(Counter(f.get("kind") for f in rejected).items())),
        "available": available,
        "drawn": len(references),
        "drawn_distinct": distinct,
        "not_drawn": available - distinct,
        "passes": max((_ns(r).get("draw_pass", 1) for r in references), default=0),
        "yielding_kept_pairs": len(per_reference),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def render_markdown(r: dict[str, Any]) -> str:
    c, refs, ppr, imp, div = r["cost"], r["references"], r["pairs_per_reference"], r["improvement"], r["diversity"]
    lines = ["# REFED report", ""]
    if r.get("shortfall"):
        lines += [f"> **Shortfall:** {r['shortfall']['message']}", ""]
    lines += [
        f"- Kept pairs: **{r['kept_pairs']}**" + (f" of budget_pairs {r['budget_pairs']}" if r.get("budget_pairs") else ""),
        f"- References: {refs['available']} available of {refs['input_rows']} input rows (rejected: "
        + (", ".join(f"{k} {v}" for k, v in refs["rejected"].items()) or "none")
        + f"); drawn {refs['drawn']} ({refs['drawn_distinct']} distinct, {refs['passes']} pass(es) over the pool); "
        f"not drawn {refs['not_drawn']} (not needed for the budget: they stay in the input file only)",
        f"- Pairs per reference: mean {ppr['mean']}, min {ppr['min']}, max {ppr['max']}",
        f"- Model calls: {c['requests']} ({c['cache_hits']} more answered by the cache), {c['tokens']} tokens, ${c['cost_usd']:.4f}",
        f"- Per kept pair: {c['requests_per_kept_pair']} calls, {c['tokens_per_kept_pair']} tokens, ${c['usd_per_kept_pair'] or 0:.6f} "
        f"(the paper's pipeline: {c['paper_calls_per_pair']} calls per pair at 20 pairs per reference)",
        f"- Feedback calls: {c['feedback_calls']} ({', '.join(c['feedback_stages']) or 'no feedback stage'})",
        f"- Improved pairs: {imp['improved_pairs']}; words: draft {imp['draft_words_mean']} → improved {imp['improved_words_mean']}",
    ]
    j = r.get("judge")
    if j:
        lines.append(
            f"- Judge ({j['stage']}, both orders, strict rule): prefers the improved response in {j['prefers_improved']} of "
            f"{j['judged']} ({_pct(j['prefers_improved_share'])}), the draft in {j['prefers_draft']}, ties {j['ties']}; "
            f"position consistency {_pct(j['position_consistency'])}"
        )
    lines += [
        f"- Diversity: mean ROUGE-L of a new instruction with its reference {div['rouge_l_to_reference_mean']} "
        f"({div['rouge_l_to_reference_at_least_0.7']} of {div['instructions']} at 0.7 or more); distinct-2 "
        f"{div['distinct_2_instructions']} (references: {div['distinct_2_references']})",
        "",
        "| stage | type | requests | cache hits | tokens | $ |",
        "|---|---|---|---|---|---|",
    ]
    for name, u in c["per_stage"].items():
        lines.append(f"| {name} | {u.get('type')} | {u.get('requests', 0)} | {u.get('cache_hits', 0)} | "
                     f"{u.get('prompt_tokens', 0) + u.get('completion_tokens', 0)} | {u.get('cost_usd', 0.0):.4f} |")
    return "\n".join(lines) + "\n"


def render_html(r: dict[str, Any], markdown: str) -> str:
    hist = r["pairs_per_reference"]["histogram"]
    pairs = (bar_chart("Pairs per reference", [str(k) for k in hist], [("references", list(hist.values()))], fmt=lambda v: f"{v:.0f}")
             if hist else empty_chart("Pairs per reference", "no kept pair came from a reference"))
    stages = r["cost"]["per_stage"]
    calls = (bar_chart("Model calls per stage", list(stages), [("requests", [u.get("requests", 0) for u in stages.values()])],
                       fmt=lambda v: f"{v:.0f}") if stages else empty_chart("Model calls per stage", "no model call"))
    imp = r["improvement"]
    lengths = (bar_chart("Mean words: draft vs improved", ["draft", "improved"],
                         [("words", [imp["draft_words_mean"], imp["improved_words_mean"]])], fmt=lambda v: f"{v:.0f}")
               if imp["improved_pairs"] else empty_chart("Mean words: draft vs improved", "no improved pair"))
    summary = markdown.split("| stage |")[0].replace("# REFED report", "").strip()
    return summary_page("REFED report", summary, [
        figure("fig-pairs-per-reference", pairs, "How many kept pairs each drawn reference yielded (at most 2 features × 10 instructions in the paper)."),
        figure("fig-calls-per-stage", calls, "Model requests made by each stage over the whole run (cache hits not counted)."),
        figure("fig-lengths", lengths, "Mean length in words of the draft and of the improved response, over the improved pairs."),
    ])


def write_refed_report(run_dir: Path) -> dict[str, Any]:
    """Build the report from a finished run directory and write it to run_dir/reports/; returns the numbers."""
    report = build_refed_report(run_dir)
    markdown = render_markdown(report)
    folder = run_dir / REPORT_DIR
    write_report_files(folder, "refed_report", report, markdown, render_html(report, markdown))
    return report
