"""`datatailor compare`: one self-contained HTML page that puts several runs side by side.

Per run it shows the method (from the recipe's stage types), the size, model calls and $ spent
(usage.json), calls and $ per kept pair, the quality histogram (when the pairs were rated), diversity,
contamination against the shipped test sets, and CRR/WR1/WR2/QS with W/T/L where evaluations exist.

Where things are found, for a run directory RUN:

* data, usage, recipe: RUN/data.jsonl, RUN/usage.json, RUN/recipe.json, RUN/manifest.json;
* quality: the scores of the recipe's last `quality.rate` stage (`metadata.quality`, or its `key`, e.g. CoachLM's
  `quality_after`) in RUN/data.jsonl, else RUN/quality.json or RUN/*/quality.json (what `datatailor rate RUN`
  writes) when it rated as many pairs as data.jsonl holds (one of an earlier data.jsonl is named, not shown);
* evaluations: RUN/eval.json, RUN/*/eval.json (e.g. `datatailor eval --out RUN/eval-vicuna80`), and
  eval folders beside the run named RUN-eval* or RUN_eval*.

A plain dataset file is accepted too (no usage or evaluations then). Every chart is inline SVG inside
a `<figure id="fig-…">`; the ids are listed in FIGURE_IDS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from datatailor import __version__
from datatailor.errors import UserError
from datatailor.evaluate.decontam import TestItem, contamination_summary, find_contamination, testset_items
from datatailor.evaluate.diversity import DiversityReport, Embedder, diversity_report
from datatailor.evaluate.metrics import percent
from datatailor.evaluate.modelspec import model_label
from datatailor.scoring.quality import BUCKETS, QualitySummary, stored_scores, summarize_quality
from datatailor.evaluate.testsets import shipped_testsets
from datatailor.io import read_records
from datatailor.stages.contract import method_title
from datatailor.report.page import WARNING_CSS, figure, html_table, warning_banner
from datatailor.report.svg import OUTCOME_COLORS, bar_chart, empty_chart, stacked_shares

FIGURE_IDS = (
    "fig-size",
    "fig-calls-per-pair",
    "fig-cost-per-pair",
    "fig-quality",
    "fig-diversity",
    "fig-lengths",
    "fig-contamination",
    "fig-eval-metrics",
    "fig-eval-wtl",
)

@dataclass
class RunSummary:
    label: str
    path: Path
    method: str
    recipe_name: str | None
    status: str
    size: int | None
    stage_types: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    quality: QualitySummary | None = None
    quality_source: str | None = None
    diversity: DiversityReport | None = None
    contamination: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def requests(self) -> int | None:
        return self.usage.get("requests")

    @property
    def cost(self) -> float | None:
        return self.usage.get("cost_usd")

    def per_pair(self, value: float | int | None) -> float | None:
        if value is None or not self.size:
            return None
        return value / self.size


def method_of(stages: list[dict[str, Any]], recipe_name: str | None) -> str:
    """The methods of a run, as the manifest records them for each stage (generic stages have none)."""
    found = list(dict.fromkeys(t for s in stages if (t := method_title(s.get("method")))))
    if found:
        return " + ".join(found)
    types = [s.get("type", "?") for s in stages]
    if types:
        return "custom (" + ", ".join(dict.fromkeys(types)) + ")"
    return recipe_name or "dataset"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None


def _find_evals(run: Path) -> list[dict[str, Any]]:
    candidates = [run / "eval.json", *sorted(run.glob("*/eval.json"))]
    for pattern in (f"{run.name}-eval*", f"{run.name}_eval*"):
        candidates += sorted(run.parent.glob(f"{pattern}/eval.json"))
    evals: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for path in candidates:
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            data = _read_json(path)
            if isinstance(data, dict) and data.get("kind") == "datatailor-eval":
                data["_path"] = str(path)
                evals.append(data)
    return evals


def final_rating(stages: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Which rating describes the pairs as delivered: the metadata key of the recipe's last `quality.rate` stage (a
    CoachLM run rates before revision as `quality`, after it as `quality_after`), and the first later stage that
    rewrote the pairs, if any (the rating then describes them as they were before it)."""
    from datatailor.stages import load_all

    registry = load_all()
    last = max((i for i, s in enumerate(stages) if s.get("type") == "quality.rate"), default=None)
    if last is None:
        return "quality", None
    key = stages[last].get("key") or "quality"
    for s in stages[last + 1:]:
        cls = registry.get(str(s.get("type")))
        if cls is not None and {"instruction", "input", "response"} & set(cls.contract(cls.Config.model_validate(s)).provides):
            return key, s.get("name") or s["type"]
    return key, None


def _find_quality(run: Path, records: list[Any], stages: list[dict[str, Any]]) -> tuple[QualitySummary | None, str | None]:
    """The ratings of the delivered pairs, and where they come from (or, with no summary, why none is shown)."""
    key, rewritten_by = final_rating(stages)
    scores = stored_scores(records, key)
    if scores:
        later = f" (rated before {rewritten_by} rewrote pairs: these scores are of the earlier versions)" if rewritten_by else ""
        return summarize_quality(scores), f"metadata.{key} in data.jsonl{later}"
    for path in [run / "quality.json", *sorted(run.glob("*/quality.json"))]:
        if path.is_file():
            data = _read_json(path)
            if isinstance(data, dict) and data.get("kind") == "datatailor-quality":
                rated = data["n"] + data.get("unrated", 0) + sum((data.get("failures") or {}).values())
                if rated != len(records):  # `datatailor rate` ran on an earlier data.jsonl (before a resume or top-up)
                    return None, (f"{path.relative_to(run)} rated {rated} pairs but data.jsonl holds {len(records)}: it is "
                                  "of an earlier data.jsonl, so it is not shown; rate the run again")
                fields = {k: data[k] for k in QualitySummary.model_fields}
                return QualitySummary.model_validate(fields), str(path.relative_to(run))
    return None, None


def collect_run(path: Path, label: str, embedder: Embedder | None, test_items: list[TestItem]) -> RunSummary:
    """Everything the report shows about one run directory (or dataset file)."""
    if not path.exists():
        raise UserError(f"compare: {path} does not exist")
    if path.is_file():
        records = read_records(path)
        summary = RunSummary(label=label, path=path, method="dataset", recipe_name=None, status="file", size=len(records))
    else:
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"compare: {path} is not a datatailor run directory (no manifest.json)")
        manifest = _read_json(manifest_path)
        recipe = _read_json(path / "recipe.json") if (path / "recipe.json").is_file() else {}
        stage_types = [s.get("type", "?") for s in manifest.get("stages", [])] or [s.get("type", "?") for s in recipe.get("stages", [])]
        usage = _read_json(path / "usage.json").get("total", {}).get("all", {}) if (path / "usage.json").is_file() else {}
        budget = {k: v for k, v in (recipe.get("budget") or {}).items() if v is not None}
        if recipe.get("budget_pairs"):
            budget["pairs"] = recipe["budget_pairs"]
        data_path = path / "data.jsonl"
        records = read_records(data_path) if data_path.is_file() else []
        summary = RunSummary(
            label=label,
            path=path,
            method=method_of(manifest.get("stages", []), manifest.get("recipe_name")),
            recipe_name=manifest.get("recipe_name"),
            status=manifest.get("status", "?"),
            size=len(records) if data_path.is_file() else None,
            stage_types=stage_types,
            usage=usage,
            budget=budget,
            evals=_find_evals(path),
        )
        summary.quality, summary.quality_source = _find_quality(path, records, recipe.get("stages") or [])
    if records:
        summary.diversity = diversity_report(records, embedder)
        summary.contamination = contamination_summary(len(records), find_contamination(records, test_items))
    return summary


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def collect_runs(paths: list[Path], embedder: Embedder | None = None, testsets: list[str] | None = None) -> list[RunSummary]:
    if not paths:
        raise UserError("compare: give at least one run directory")
    items = testset_items(testsets if testsets is not None else shipped_testsets())
    return [collect_run(p, label, embedder, items) for p, label in zip(paths, _labels(paths))]


# ----------------------------------------------------------------------------- HTML


def _num(value: float | int | None, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def _overview(runs: list[RunSummary]) -> str:
    rows = []
    for r in runs:
        tokens = (r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0)) if r.usage else None
        budget = ", ".join(f"{k} {v}" for k, v in r.budget.items()) or "none"
        rows.append([
            r.label, r.method, r.status, _num(r.size), _num(r.requests), _num(r.usage.get("cache_hits")), _num(tokens),
            _num(r.cost, ".4f"), _num(r.per_pair(r.requests), ".2f"), _num(r.per_pair(r.cost), ".6f"), budget,
        ])
    return html_table(["run", "method", "status", "kept pairs", "model calls", "cache hits", "tokens", "$ spent",
                   "calls / pair", "$ / pair", "budget"], rows)


def _size_cost_figures(runs: list[RunSummary]) -> str:
    labels = [r.label for r in runs]
    size = bar_chart("Kept pairs per run", labels, [("kept pairs", [r.size for r in runs])], fmt=lambda v: f"{v:g}")
    calls = [r.per_pair(r.requests) for r in runs]
    cost = [r.per_pair(r.cost) for r in runs]
    calls_svg = (bar_chart("Model calls per kept pair", labels, [("calls / pair", calls)])
                 if any(v is not None for v in calls) else empty_chart("Model calls per kept pair", "no usage.json found"))
    cost_svg = (bar_chart("Dollars per kept pair", labels, [("$ / pair", cost)], fmt=lambda v: f"{v:.2g}")
                if any(v is not None for v in cost) else empty_chart("Dollars per kept pair", "no usage.json found"))
    return (
        figure("fig-size", size, "Pairs in each run's final data.jsonl.")
        + figure("fig-calls-per-pair", calls_svg, "Model requests (cache hits excluded) divided by kept pairs.")
        + figure("fig-cost-per-pair", cost_svg, "Dollars spent (usage.json, all invocations) divided by kept pairs.")
    )


def _quality_section(runs: list[RunSummary]) -> str:
    rated = [r for r in runs if r.quality is not None and r.quality.n]
    if rated:
        series = [(r.label, [r.quality.shares[b] for b, _, _ in BUCKETS]) for r in rated]  # type: ignore[union-attr]
        svg = bar_chart("Quality score histogram (share of pairs per bucket)", [b for b, _, _ in BUCKETS], series,
                        y_max=1.0, fmt=lambda v: f"{100 * v:.0f}%", legend=True)
    else:
        svg = empty_chart("Quality score histogram", "no ratings: run `datatailor rate RUN_DIR --judge MODEL`")
    rows = [[r.label, _num(r.quality.n), _num(r.quality.mean), percent(r.quality.high_quality_share, 1),
             *[str(r.quality.histogram[b]) for b, _, _ in BUCKETS], r.quality_source or ""]
            for r in rated]  # type: ignore[union-attr]
    table = html_table(["run", "rated", "mean (0-5)", "high quality ≥ 4.5 (%)", *[b for b, _, _ in BUCKETS], "source"], rows) if rows else ""
    return figure("fig-quality", svg, "AlpaGasus-style 0-5 ratings, bucketed as in CoachLM.") + table


def _diversity_section(runs: list[RunSummary]) -> str:
    have = [r for r in runs if r.diversity is not None]
    if have:
        groups = ["distinct-1", "distinct-2", "1 − ROUGE-L", "embedding dist."]
        series = []
        for r in have:
            d = r.diversity
            self_sim = d.rouge_l_self_similarity.get("mean_max")  # type: ignore[union-attr]
            series.append((r.label, [d.distinct_1, d.distinct_2, None if self_sim is None else 1 - self_sim, d.embedding_distance]))  # type: ignore[union-attr]
        svg = bar_chart("Diversity of instructions (higher = more diverse)", groups, series, y_max=1.0, legend=True)
        lengths = bar_chart(
            "Mean length in words",
            ["instruction", "response"],
            [(r.label, [r.diversity.instruction_length["mean"], r.diversity.response_length["mean"]]) for r in have],  # type: ignore[union-attr]
            fmt=lambda v: f"{v:g}",
            legend=True,
        )
    else:
        svg = empty_chart("Diversity of instructions", "no data.jsonl in any run")
        lengths = empty_chart("Mean length in words", "no data.jsonl in any run")
    rows = []
    for r in have:
        d = r.diversity
        rl = d.rouge_l_self_similarity  # type: ignore[union-attr]
        rows.append([
            r.label, _num(d.distinct_1, ".3f"), _num(d.distinct_2, ".3f"), _num(rl.get("mean_max"), ".3f"),  # type: ignore[union-attr]
            percent(rl.get("share_above_0_7"), 1), _num(d.embedding_distance, ".3f"),  # type: ignore[union-attr]
            _num(d.instruction_length["mean"], ".1f"), _num(d.response_length["mean"], ".1f"),  # type: ignore[union-attr]
        ])
    table = html_table(["run", "distinct-1", "distinct-2", "ROUGE-L self-sim. (mean max)", "max ROUGE-L > 0.7 (%)",
                    "embedding distance", "instruction words", "response words"], rows) if rows else ""
    return (
        figure("fig-diversity", svg, "Distinct-n over instructions; 1 - mean max ROUGE-L against the other instructions; "
                "mean pairwise cosine distance of all-MiniLM-L6-v2 embeddings (n/a when not computed).")
        + table
        + figure("fig-lengths", lengths, "Mean instruction (with input) and response length in words.")
    )


def _contamination_section(runs: list[RunSummary], testsets: list[str]) -> str:
    have = [r for r in runs if r.contamination is not None]
    if have:
        series = [(ts, [(r.contamination["by_testset"].get(ts, {}).get("pairs", 0) / r.contamination["records"])  # type: ignore[index]
                        for r in have]) for ts in testsets]
        svg = bar_chart("Share of pairs overlapping each test set", [r.label for r in have], series,
                        fmt=lambda v: f"{100 * v:g}%", legend=True)
    else:
        svg = empty_chart("Share of pairs overlapping each test set", "no data.jsonl in any run")
    rows = [[r.label, str(r.contamination["flagged_pairs"]), percent(r.contamination["flagged_share"], 2),  # type: ignore[index]
             *[str(r.contamination["by_testset"].get(ts, {}).get("pairs", 0)) for ts in testsets]] for r in have]  # type: ignore[index]
    table = html_table(["run", "flagged pairs", "flagged (%)", *testsets], rows) if rows else ""
    return figure("fig-contamination", svg, "13-gram overlap or ≥ 80 % trigram containment of a test item in a pair's prompt "
                   "(`datatailor export --decontaminate` drops them).") + table


def _eval_label(r: RunSummary, e: dict[str, Any]) -> str:
    return f"{r.label} · {e['testset']['name']}"


def _eval_section(runs: list[RunSummary]) -> str:
    pairs = [(r, e) for r in runs for e in r.evals]
    if pairs:
        labels = [_eval_label(r, e) for r, e in pairs]
        metrics = bar_chart(
            "Evaluation metrics (headline rule)", ["CRR", "WR1", "WR2", "QS"],
            [(lab, [e["metrics"][k] for k in ("crr", "wr1", "wr2", "qs")]) for lab, (_, e) in zip(labels, pairs)],
            y_max=1.0, fmt=lambda v: f"{100 * v:.0f}%", legend=True,
        )
        wtl = stacked_shares("Wins, ties and losses against the reference", labels,
                             [(k, [e["metrics"][k] for _, e in pairs]) for k in ("wins", "ties", "losses")],
                             colors=list(OUTCOME_COLORS.values()))
    else:
        metrics = empty_chart("Evaluation metrics", "no eval.json found: run `datatailor eval --out RUN_DIR/eval-NAME`")
        wtl = empty_chart("Wins, ties and losses", "no eval.json found")
    rows = []
    for (r, e), lab in zip(pairs, [_eval_label(r, e) for r, e in pairs]):
        m = e["metrics"]
        rows.append([
            lab, model_label(e["models"]["candidate"]), model_label(e["models"]["reference"]), e["rule"],
            f"{m['wins']}/{m['ties']}/{m['losses']}", str(m["n"]), percent(m["crr"]), percent(m["wr1"]), percent(m["wr2"]),
            percent(m["qs"]), percent(e.get("position_consistency")),
        ])
    table = html_table(["run · test set", "candidate", "reference", "rule", "W/T/L", "N", "CRR %", "WR1 %", "WR2 %", "QS %",
                    "judge position consistency %"], rows) if rows else ""
    warnings = "".join(
        warning_banner(f'{e["consistency_warning"]}.', f"Warning ({lab})")
        for (r, e), lab in zip(pairs, [_eval_label(r, e) for r, e in pairs]) if e.get("consistency_warning")
    )
    return warnings + (
        figure("fig-eval-metrics", metrics, "CRR = (W+T)/N (CodecLM, strict rule); WR1 = (W+T/2)/N, WR2 = W/(W+L), "
                "QS = (W+T)/N (CoachLM).")
        + figure("fig-eval-wtl", wtl, "Verdicts of the candidate against the reference, judged in both orders.")
        + table
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.85rem}th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
th{background:#f4f4f4}figure{margin:1rem 0}figcaption{font-size:.8rem;color:#555;max-width:720px}
.note{font-size:.85rem;color:#555}
""" + WARNING_CSS


def render_html(runs: list[RunSummary], title: str = "datatailor: runs compared", notes: list[str] | None = None,
                testsets: list[str] | None = None) -> str:
    testsets = testsets if testsets is not None else shipped_testsets()
    notes = list(notes or [])
    notes += [f"Quality of {r.label}: {r.quality_source}" for r in runs if r.quality is None and r.quality_source]
    empty = [r.label for r in runs if not r.size]
    if empty:
        notes.append(f"No kept pairs in: {', '.join(empty)} — nothing to rate, measure or check there; "
                     "each run's failures.jsonl says why its rows were dropped.")
    note_html = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    run_list = "".join(f"<li><b>{escape(r.label)}</b>: {escape(str(r.path))} ({escape(r.method)})</li>" for r in runs)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{_CSS}</style></head><body>'
        f"<h1>{escape(title)}</h1><ul>{run_list}</ul>{note_html}"
        "<h2 id=\"overview\">Size and cost</h2>" + _overview(runs) + _size_cost_figures(runs)
        + "<h2 id=\"quality\">Data quality</h2>" + _quality_section(runs)
        + "<h2 id=\"diversity\">Diversity</h2>" + _diversity_section(runs)
        + "<h2 id=\"contamination\">Contamination</h2>" + _contamination_section(runs, testsets)
        + "<h2 id=\"evaluation\">Evaluation</h2>" + _eval_section(runs)
        + f'<p class="note">Generated by datatailor {escape(__version__)}.</p></body></html>\n'
    )


def build_compare_report(paths: list[Path], out: Path, *, embeddings: bool = True, title: str | None = None) -> list[RunSummary]:
    """Collect every run and write the HTML report to `out` (atomically)."""
    from datatailor.io import atomic_open

    notes: list[str] = []
    embedder: Embedder | None = None
    if embeddings:
        from datatailor.evaluate.diversity import minilm_embedder

        try:
            embedder = minilm_embedder()
        except UserError as exc:
            notes.append(f"Embedding distance not computed: {exc}")
    else:
        notes.append("Embedding distance not computed (--no-embeddings).")
    runs = collect_runs(paths, embedder)
    html = render_html(runs, title or "datatailor: runs compared", notes)
    with atomic_open(out) as fh:
        fh.write(html)
    return runs
