"""The CoachLM run report: how much the coach changed, why it kept originals, and whether the data got better.

Written at the end of a run that used `coach.revise`, into `reports/coachlm_report.{json,md,html}`:

* pairs revised (share), why originals were kept, the edit distance of the revisions, which fields changed, what
  the cleanup removed, how many pairs went unrated (the judge's rating did not parse) before and after;
* the 0–5 quality rating before (`metadata.quality`) and after (`metadata.quality_after`) revision when the recipe
  rates them: histogram over [0,3.5) [3.5,4) [4,4.5) [4.5,5] and the high-quality share (≥ 4.5; the paper: 17.7 % →
  78.9 % on Alpaca 52K with ChatGPT as rater);
* when the pairs carry an expert revision (CoachLM's layout: `revised_instruction/input/response`, e.g. the held-out
  split of `datatailor coach prepare`): how close the result is to the expert's revision (ROUGE-L of the response,
  edit similarity of the whole pair), beside the same for the unrevised original.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.journal import read_journal
from datatailor.report.page import figure, summary_page, write_report_files
from datatailor.report.svg import bar_chart, empty_chart
from datatailor.scoring.quality import BUCKETS, HIGH_QUALITY, summarize_quality
from datatailor.scoring.text import rouge_l_text

FIGURE_IDS = ("fig-edit-distance", "fig-kept-reasons", "fig-quality")
DISTANCE_BINS = (0, 50, 100, 200, 400, 800)


def _ns(record: dict[str, Any]) -> dict[str, Any]:
    ns = (record.get("metadata") or {}).get("coach")
    return ns if isinstance(ns, dict) else {}


def _score(value: Any) -> float | None:
    value = value.get("score") if isinstance(value, dict) else value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def distance_histogram(distances: list[int]) -> dict[str, int]:
    labels = [f"[{a},{b})" for a, b in zip(DISTANCE_BINS, DISTANCE_BINS[1:])] + [f"≥{DISTANCE_BINS[-1]}"]
    counts = dict.fromkeys(labels, 0)
    for d in distances:
        i = sum(1 for edge in DISTANCE_BINS[1:] if d >= edge)
        counts[labels[i]] += 1
    return counts


def closeness(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How close each pair is to its expert revision, and how close it was before the coach."""
    from rapidfuzz.distance import Levenshtein

    rows = []
    for r in records:
        md = r.get("metadata") or {}
        if not md.get("revised_response"):
            continue
        expert = "\n".join(str(md.get(k) or "") for k in ("revised_instruction", "revised_input", "revised_response"))
        final = "\n".join([r["instruction"], r.get("input") or "", r.get("response") or ""])
        original = _ns(r).get("original") or {}
        before = "\n".join(original.get(k, "") for k in ("instruction", "input", "response"))
        rows.append({
            "rouge_l": rouge_l_text(r.get("response") or "", md["revised_response"]),
            "rouge_l_original": rouge_l_text(original.get("response", ""), md["revised_response"]),
            "edit_similarity": Levenshtein.normalized_similarity(final, expert),
            "edit_similarity_original": Levenshtein.normalized_similarity(before, expert),
        })
    if not rows:
        return None
    mean = {k: round(statistics.fmean(row[k] for row in rows), 4) for k in rows[0]}
    return {"pairs": len(rows), **mean}


def build_coach_report(run_dir: Path) -> dict[str, Any]:
    data = read_journal(run_dir / "data.jsonl")
    revised = [r for r in data if _ns(r)]
    changed = [r for r in revised if _ns(r).get("revised")]
    before = [s for r in revised if (s := _score((r.get("metadata") or {}).get("quality"))) is not None]
    after = [s for r in revised if (s := _score((r.get("metadata") or {}).get("quality_after"))) is not None]
    # A pair that went through a rating whose reply did not parse carries the key with no score (quality.rate keeps it).
    unrated = {key: sum(1 for r in revised if key in (md := r.get("metadata") or {}) and _score(md[key]) is None)
               for key in ("quality", "quality_after")}
    return {
        "kind": "datatailor-coachlm-report",
        "pairs": len(revised),
        "revised": len(changed),
        "revised_share": round(len(changed) / len(revised), 4) if revised else None,
        "modes": dict(Counter(_ns(r).get("mode") for r in revised)),
        "kept_original": dict(Counter(_ns(r)["kept_original"] for r in revised if _ns(r).get("kept_original"))),
        "fields_changed": dict(Counter(f for r in changed for f in _ns(r).get("changed", []))),
        "non_english_removed": {"pairs": sum(1 for r in revised if _ns(r).get("non_english_removed")),
                                "characters": sum(_ns(r).get("non_english_removed", 0) for r in revised)},
        "edit_distance": {
            "mean": round(statistics.fmean(_ns(r)["edit_distance"] for r in changed), 1) if changed else None,
            "median": statistics.median(_ns(r)["edit_distance"] for r in changed) if changed else None,
            "histogram": distance_histogram([_ns(r)["edit_distance"] for r in changed]),
        },
        "unrated": {"before": unrated["quality"], "after": unrated["quality_after"],
                    "revised_without_rating": sum(1 for r in revised if _ns(r).get("unrated"))},
        "quality_before": summarize_quality(before).model_dump() if before else None,
        "quality_after": summarize_quality(after).model_dump() if after else None,
        "high_quality_threshold": HIGH_QUALITY,
        "closeness_to_expert": closeness(revised),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        "# CoachLM report", "",
        f"- Pairs: {r['pairs']}; revised: **{r['revised']}** ({_pct(r['revised_share'])}); coach: "
        + ", ".join(f"{k} {v}" for k, v in r["modes"].items()),
        "- Originals kept: " + (", ".join(f"{k} {v}" for k, v in r["kept_original"].items()) or "none"),
        "- Fields changed: " + (", ".join(f"{k} {v}" for k, v in r["fields_changed"].items()) or "none"),
        f"- Edit distance of the revisions (characters): mean {r['edit_distance']['mean']}, median {r['edit_distance']['median']}",
    ]
    cleaned = r["non_english_removed"]
    if cleaned["pairs"]:
        lines.append(f"- Cleanup removed {cleaned['characters']} non-English characters from {cleaned['pairs']} revision(s) "
                     "of English pairs (CoachLM's rule-based cleanup)")
    u = r["unrated"]
    if u["before"] or u["after"]:
        lines.append(f"- Unrated (the judge's rating did not parse; kept, not dropped): {u['before']} before revision "
                     f"({u['revised_without_rating']} of them sent to the coach for want of a rating), {u['after']} after; "
                     "the quality figures below cover the rated pairs only")
    qb, qa = r["quality_before"], r["quality_after"]
    if qb or qa:
        lines += ["", "| rating | " + " | ".join(label for label, _, _ in BUCKETS) + " | mean | high quality (≥ 4.5) |",
                  "|---|" + "---|" * (len(BUCKETS) + 2)]
        for name, q in (("before", qb), ("after", qa)):
            if q:
                lines.append(f"| {name} | " + " | ".join(str(q["histogram"][label]) for label, _, _ in BUCKETS)
                             + f" | {q['mean']:.2f} | {_pct(q['high_quality_share'])} |")
        lines.append("")
        lines.append("(The paper: 17.7 % → 78.9 % high quality on Alpaca 52K, rated by ChatGPT.)")
    c = r["closeness_to_expert"]
    if c:
        lines += ["", f"Closeness to the experts' revisions ({c['pairs']} pairs): ROUGE-L of the response {c['rouge_l']} "
                  f"(unrevised: {c['rouge_l_original']}); edit similarity of the pair {c['edit_similarity']} "
                  f"(unrevised: {c['edit_similarity_original']})."]
    return "\n".join(lines) + "\n"


def render_html(r: dict[str, Any], markdown: str) -> str:
    hist = r["edit_distance"]["histogram"]
    distance = (bar_chart("Edit distance of the revisions", list(hist), [("pairs", list(hist.values()))], fmt=lambda v: f"{v:.0f}")
                if r["revised"] else empty_chart("Edit distance of the revisions", "no pair was revised"))
    kept = r["kept_original"]
    reasons = (bar_chart("Why originals were kept", list(kept), [("pairs", list(kept.values()))], fmt=lambda v: f"{v:.0f}")
               if kept else empty_chart("Why originals were kept", "every pair was revised"))
    series = [(name, [q["shares"][label] for label, _, _ in BUCKETS]) for name, q in
              (("before", r["quality_before"]), ("after", r["quality_after"])) if q]
    quality = (bar_chart("Quality rating (0-5) before and after", [label for label, _, _ in BUCKETS], series, y_max=1.0,
                         fmt=lambda v: f"{100 * v:.0f}%", legend=True)
               if series else empty_chart("Quality rating", "not rated: add quality.rate stages before and after coach.revise"))
    summary = markdown.replace("# CoachLM report", "").strip()
    return summary_page("CoachLM report", summary, [
        figure("fig-edit-distance", distance, "Characters changed from the original pair to the revised one, over the revised pairs."),
        figure("fig-kept-reasons", reasons, "Pairs whose original was kept, by the reason the revision was not used."),
        figure("fig-quality", quality, "Share of pairs per 0-5 rating bucket, before and after revision (high quality is 4.5 or more)."),
    ])


def write_coach_report(run_dir: Path) -> dict[str, Any]:
    report = build_coach_report(run_dir)
    markdown = render_markdown(report)
    folder = run_dir / "reports"
    write_report_files(folder, "coachlm_report", report, markdown, render_html(report, markdown))
    return report

