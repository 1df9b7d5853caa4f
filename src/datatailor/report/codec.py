"""CodecLM run report: why pairs were kept or dropped, per iteration, and what the data covers.

Written by `codec.contrastive` when it finishes, into the run directory:

* `codec_report.json`  the numbers;
* `codec_report.md`    the same as short tables;
* `codec_report.html`  a self-contained page (inline CSS bars, no scripts).

Inputs: the records the stage kept in its last pass and its failure rows, as `finalize` gets them once every input
is accounted for (never its journal, which after a top-up round may hold pairs an earlier stage has since dropped);
their `metadata.codec` summary says what was tried; and `metadata.jsonl` (the pool, with the seeds behind each
entry). "Kept" is what Contrastive Filtering kept: a later `codec.select` trims it to the budget, and data.jsonl
holds what was delivered.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.report.page import WARNING_CSS, figure, markdown_html, warning_banner, write_report_files
from datatailor.records import Record

REPORT_STEM = "codec_report"

# G lies in [-9, 9] on a 1–10 scale; one bin per point.
GAP_EDGES = list(range(-9, 10))


def run_file_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file the run itself wrote; missing → empty. Only a torn last line (a killed write) is skipped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def gap_histogram(gaps: list[float]) -> list[dict[str, Any]]:
    """Counts of G per unit bin [a, a+1); the last bin also holds G = 9."""
    counts = [0] * (len(GAP_EDGES) - 1)
    for g in gaps:
        i = min(max(int((g - GAP_EDGES[0]) // 1), 0), len(counts) - 1)
        counts[i] += 1
    return [{"from": GAP_EDGES[i], "to": GAP_EDGES[i + 1], "count": c} for i, c in enumerate(counts)]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _coverage(entries: list[dict[str, Any]], pairs: list[Record]) -> dict[str, Any]:
    seed_uc: Counter[str] = Counter()
    seed_sk: Counter[str] = Counter()
    pool_uc: Counter[str] = Counter()
    pool_sk: Counter[str] = Counter()
    for e in entries:
        pool_uc[e["use_case"]] += 1
        pool_sk.update(e["skills"])
        if e.get("origin") in ("seed", "given"):
            weight = max(1, len(e.get("seeds") or []))
            seed_uc[e["use_case"]] += weight
            for s in e["skills"]:
                seed_sk[s] += weight
    gen_uc: Counter[str] = Counter()
    gen_sk: Counter[str] = Counter()
    for r in pairs:
        ns = _namespace(r.metadata)
        if ns.get("use_case"):
            gen_uc[ns["use_case"]] += 1
        gen_sk.update(ns.get("skills") or [])

    def covered(seed: Counter[str], gen: Counter[str]) -> dict[str, Any]:
        hit = sorted(k for k in seed if gen[k])
        return {
            "seed": len(seed),
            "covered": len(hit),
            "share": _share(len(hit), len(seed)),
            "missing": sorted(k for k in seed if not gen[k]),
            "only_generated": sorted(k for k in gen if k not in seed),
        }

    return {
        "seed_use_cases": dict(seed_uc.most_common()),
        "seed_skills": dict(seed_sk.most_common()),
        "pool_use_cases": dict(pool_uc.most_common()),
        "pool_skills": dict(pool_sk.most_common()),
        "generated_use_cases": dict(gen_uc.most_common()),
        "generated_skills": dict(gen_sk.most_common()),
        "use_cases": covered(seed_uc, gen_uc),
        "skills": covered(seed_sk, gen_sk),
    }


def _namespace(metadata: dict[str, Any]) -> dict[str, Any]:
    """The record's `codec` namespace (see stages/codec/data.py)."""
    ns = metadata.get("codec")
    return ns if isinstance(ns, dict) else {}


def _result(metadata: dict[str, Any]) -> dict[str, Any]:
    """What Contrastive Filtering decided for a record (`codec.contrastive`)."""
    return _namespace(metadata).get("contrastive") or {}


CONSISTENCY_WARNING = (
    "The judge gave the same verdict in both answer orders for only {share} of the comparisons (below {threshold}): "
    "its scores are dominated by which answer it sees first, so G, and which pairs were kept, are not meaningful."
)


def build_codec_report(
    kept: list[Record],
    dropped: list[dict[str, Any]],
    pool: list[dict[str, Any]],
    *,
    threshold: float,
    max_iterations: int,
    budget_pairs: int | None,
    pool_requested: int | None = None,
    consistency_threshold: float = 0.6,
) -> dict[str, Any]:
    """The report's numbers. `dropped` are the contrastive stage's failure rows."""
    results = {r.id: _result(r.metadata) for r in kept}
    passed = [r for r in kept if not results[r.id].get("below_threshold")]
    kept_below = [r for r in kept if results[r.id].get("below_threshold")]
    histories: list[list[dict[str, Any]]] = [results[r.id].get("history", []) for r in kept]
    failure_kinds: Counter[str] = Counter()
    for row in dropped:
        failure_kinds[row.get("kind", "error")] += 1
        histories.append(_result((row.get("record") or {}).get("metadata") or {}).get("history", []))
    n_instructions = len(kept) + len(dropped)
    judged = [step["scores"]["position_consistent"] for h in histories for step in h if isinstance(step.get("scores"), dict)]
    consistency = _share(sum(judged), len(judged))
    warning = None
    if consistency is not None and consistency < consistency_threshold:
        warning = CONSISTENCY_WARNING.format(share=_pct(consistency), threshold=_pct(consistency_threshold))

    iterations: list[dict[str, Any]] = []
    for i in range(1, max_iterations + 1):
        entered = sum(1 for h in histories if len(h) >= i)
        scored = sum(1 for h in histories if len(h) >= i and h[i - 1].get("G") is not None)
        kept_i = [r for r in passed if results[r.id]["iteration"] == i]
        iterations.append({
            "iteration": i,
            "entered": entered,
            "scored": scored,
            "kept": len(kept_i),
            "kept_strong": sum(1 for r in kept_i if results[r.id]["kept"] == "strong"),
            "kept_target": sum(1 for r in kept_i if results[r.id]["kept"] == "target"),
            "kept_share": _share(len(kept_i), scored),
            "data_share": _share(len(kept_i), len(passed)),
        })
    all_gaps = [step["G"] for h in histories for step in h if step.get("G") is not None]
    final_gaps = [h[-1]["G"] for h in histories if h and h[-1].get("G") is not None]
    return {
        "budget_pairs": budget_pairs,
        "instructions": n_instructions,
        "kept": len(kept),
        "kept_above_threshold": len(passed),
        "kept_strong": sum(1 for r in passed if results[r.id]["kept"] == "strong"),
        "kept_target": sum(1 for r in passed if results[r.id]["kept"] == "target"),
        "kept_below_threshold": len(kept_below),
        "budget_met": (len(kept) >= budget_pairs) if budget_pairs else None,
        "dropped": dict(sorted(failure_kinds.items())),
        "threshold": threshold,
        "max_iterations": max_iterations,
        "pool_size": len(pool),
        "pool_requested": pool_requested,
        "pool_origins": dict(Counter(e.get("origin", "seed") for e in pool)),
        "iterations": iterations,
        "gap_histogram": {"all_scored": gap_histogram(all_gaps), "final": gap_histogram(final_gaps)},
        "gap_count": {"all_scored": len(all_gaps), "final": len(final_gaps)},
        "coverage": _coverage(pool, kept),
        "position_consistency": consistency,
        "consistency_threshold": consistency_threshold,
        "consistency_warning": warning,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def render_markdown(report: dict[str, Any]) -> str:
    budget = report["budget_pairs"]
    lines = ["# CodecLM report", ""]
    if report.get("consistency_warning"):
        lines += [f"> **Warning:** {report['consistency_warning']}", ""]
    lines += [
        f"- Judge position consistency: {_pct(report.get('position_consistency'))} of the scored comparisons gave the "
        "same verdict in both answer orders",
        f"- Instructions filtered: **{report['instructions']}**; kept **{report['kept']}**"
        + (f" for a data budget of {budget}" + (" (the final selection trims them to the budget: data.jsonl holds the pairs delivered)"
                                                if report["budget_met"] else " (budget not met: filtering dropped the rest)") if budget else ""),
        f"- Kept with the strong answer (G > {report['threshold']}): {report['kept_strong']}; with the target answer "
        f"(G < -{report['threshold']}): {report['kept_target']}; kept below the threshold (flag): {report['kept_below_threshold']}",
        "- Dropped: " + (", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"),
        f"- Metadata pool: {report['pool_size']} entries"
        + (f" (requested {report['pool_requested']})" if report.get("pool_requested") is not None else "")
        + (", " + ", ".join(f"{k} {v}" for k, v in report["pool_origins"].items()) if report["pool_origins"] else ""),
        "",
        "## Per iteration",
        "",
        "| iteration | entered | scored | kept | strong | target | kept share | data share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for it in report["iterations"]:
        lines.append(
            f"| {it['iteration']} | {it['entered']} | {it['scored']} | {it['kept']} | {it['kept_strong']} | "
            f"{it['kept_target']} | {_pct(it['kept_share'])} | {_pct(it['data_share'])} |"
        )
    lines += ["", "kept share = kept at this iteration / scored at it; data share = kept at it / all kept above θ "
              "(before the final selection).", ""]
    lines += ["## Gap G = S(strong) − S(target)", "", "| G from | to | all scored | final |", "|---|---|---|---|"]
    for a, b in zip(report["gap_histogram"]["all_scored"], report["gap_histogram"]["final"]):
        if a["count"] or b["count"]:
            lines.append(f"| {a['from']} | {a['to']} | {a['count']} | {b['count']} |")
    cov = report["coverage"]
    lines += ["", "## Coverage of the seeds' metadata by the pairs Contrastive Filtering kept (before the final selection)", ""]
    for label, key in (("Use cases", "use_cases"), ("Skills", "skills")):
        c = cov[key]
        lines.append(
            f"- {label}: {c['covered']} of {c['seed']} covered ({_pct(c['share'])}); "
            f"missing: {', '.join(c['missing']) or 'none'}; only in generated data: {len(c['only_generated'])}"
        )
    lines += ["", "| use case | seeds | pool entries | kept pairs |", "|---|---|---|---|"]
    names = list(dict.fromkeys([*cov["seed_use_cases"], *cov["pool_use_cases"], *cov["generated_use_cases"]]))
    for n in names:
        lines.append(
            f"| {n} | {cov['seed_use_cases'].get(n, 0)} | {cov['pool_use_cases'].get(n, 0)} | {cov['generated_use_cases'].get(n, 0)} |"
        )
    return "\n".join(lines) + "\n"


# Every chart of the HTML page sits in a `<figure id="fig-…">` with a caption (as in the compare report).
FIGURE_IDS = ("fig-gap", "fig-use-cases-seeds", "fig-use-cases-kept", "fig-skills-seeds", "fig-skills-kept")


def _bars(rows: list[tuple[str, int]]) -> str:
    if not rows:
        return "<table class=bars><tr><td class=none>none</td></tr></table>"
    top = max((c for _, c in rows), default=0) or 1
    out = []
    for label, count in rows:
        width = round(100 * count / top)
        out.append(
            f"<tr><td>{html.escape(label)}</td><td class=n>{count}</td>"
            f"<td class=bar><div style='width:{width}%'></div></td></tr>"
        )
    return "<table class=bars>" + "".join(out) + "</table>"


def _figure(fig_id: str, rows: list[tuple[str, int]], caption: str) -> str:
    return figure(fig_id, _bars(rows), caption)


def render_html(report: dict[str, Any], markdown: str) -> str:
    it_rows = "".join(
        f"<tr><td>{it['iteration']}</td><td>{it['entered']}</td><td>{it['scored']}</td><td>{it['kept']}</td>"
        f"<td>{_pct(it['kept_share'])}</td><td>{_pct(it['data_share'])}</td></tr>"
        for it in report["iterations"]
    )
    gaps = [(f"[{b['from']}, {b['to']})", b["count"]) for b in report["gap_histogram"]["all_scored"]]
    cov = report["coverage"]
    head = markdown.split("## Per iteration")[0].replace("# CodecLM report", "")
    summary = markdown_html("\n".join(line for line in head.splitlines() if not line.startswith("> **Warning:**")))
    warning = (
        warning_banner(report["consistency_warning"]) + "\n"
        if report.get("consistency_warning") else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>CodecLM report</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}}
table{{border-collapse:collapse;margin:.5rem 0 1.5rem}} td,th{{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}}
.bars td.bar{{width:24rem}} .bars td.bar div{{background:#4a7bd0;height:.8rem}} td.n{{text-align:right}} td.none{{color:#666}}
figure{{margin:1rem 0}} figure table{{margin:.5rem 0 .3rem}} figcaption{{font-size:.8rem;color:#555}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:.8rem}}
{WARNING_CSS}</style></head><body>
<h1>CodecLM report</h1>
{warning}{summary}
<h2>Per iteration</h2>
<table><tr><th>iteration</th><th>entered</th><th>scored</th><th>kept</th><th>kept share</th><th>data share</th></tr>{it_rows}</table>
<h2>Gap G = S(strong) − S(target), every scored iteration (threshold ±{report['threshold']})</h2>
{_figure("fig-gap", gaps, "Scored (strong, target) answer pairs per unit bin of G, over every iteration.")}
<h2>Use cases: seeds vs kept pairs</h2>
<h3>seeds</h3>{_figure("fig-use-cases-seeds", list(cov['seed_use_cases'].items()), "Use cases of the seed instructions (weighted by seeds per pool entry).")}
<h3>kept pairs</h3>{_figure("fig-use-cases-kept", list(cov['generated_use_cases'].items()), "Use cases of the kept pairs.")}
<h2>Skills: seeds vs kept pairs</h2>
<h3>seeds</h3>{_figure("fig-skills-seeds", list(cov['seed_skills'].items()), "Skills of the seed instructions (weighted by seeds per pool entry).")}
<h3>kept pairs</h3>{_figure("fig-skills-kept", list(cov['generated_skills'].items()), "Skills of the kept pairs.")}
</body></html>
"""


def write_codec_report(out_dir: Path, **inputs: Any) -> dict[str, Any]:
    """Build the report and write its three files into `out_dir`; returns the numbers."""
    report = build_codec_report(**inputs)
    markdown = render_markdown(report)
    write_report_files(out_dir, REPORT_STEM, report, markdown, render_html(report, markdown))
    return report
