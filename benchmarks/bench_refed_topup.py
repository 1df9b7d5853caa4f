"""REFED's top-up and budget: pairs delivered and model calls with the paper's filters before or after `select`, and
for budgets that are not a multiple of 20 pairs per reference.

A deterministic scripted teacher on LIMA's references, at the paper's shape (2 features × 10 instructions per
reference, 20 pairs), with an LLM-judge filter that prefers the improved response for about half of the
instructions (a seeded hash of the instruction) and a ROUGE-L novelty filter. No request cache: every call counted
is a call made. Prints one row per run, and for runs with a judge the report's judge figures beside those
recomputed from the final files (the judge stage's records.jsonl and its rows in failures.jsonl).

    python benchmarks/bench_refed_topup.py                # budget 40 both orders, budgets 24/25/40 without filters
    python benchmarks/bench_refed_topup.py --budget 100   # the filter runs at another budget
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIMA = REPO.parent / "shared" / "data" / "lima" / "train.jsonl"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu apple river stone cloud music paper garden "
         "window silver orange planet market").split()


def _hash(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


def teacher(request: Any) -> str:
    """Teacher and judge, routed by template name."""
    t, v = request.template, request.variables or {}
    if t == "refed/instruction_feedback.j2":
        ref = json.loads(v["pair"])["instruction"][:30]
        return json.dumps({"subject_areas": f"areas of {ref}", "relevant_skills": f"skills of {ref}"})
    if t == "refed/response_feedback.j2":
        return json.dumps({"response_feedback": f"feedback on {json.loads(v['pair'])['instruction'][:40]}"})
    if t == "refed/synthesize.j2":
        items = []
        for i in range(v["n"]):
            h = _hash(request.sampling.seed, i, v["feature_name"])
            items.append(" ".join(WORDS[(h >> (6 * k)) % len(WORDS)] for k in range(8)) + f" {h % 100000}?")
        return json.dumps({"instructions": items})
    if t == "refed/respond.j2":
        return f"Draft answer to: {v['instruction']}"
    if t == "refed/improve.j2":
        return json.dumps({"analysis": {"original_strengths": ["x"], "improvement_opportunities": ["y"], "relevant_feedback": ["z"]},
                           "implementation_strategy": {"planned_changes": ["a"], "rationale": "b"},
                           "improved_response": f"Improved: {json.loads(v['response'])}"})
    if t.startswith("judge/"):
        good = _hash(v["question"]) % 2 == 0

        def score(answer: str) -> int:
            return (8 if good else 4) if answer.startswith("Improved") else 6
        return f"{score(v['answer_1'])} {score(v['answer_2'])}"
    raise ValueError(f"unexpected template {t}")


MAKE = [{"type": "refed.references", "pairs_per_reference": 20}, {"type": "refed.feedback"},
        {"type": "refed.synthesize", "per_feature": 10}, {"type": "refed.respond"}, {"type": "refed.improve"}]
JUDGE = {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft", "rule": "strict", "keep": "a"}
ROUGE = {"type": "filter.rouge", "threshold": 0.7}
ORDERS = {"filters, then select": [*MAKE, JUDGE, ROUGE, {"type": "select"}],
          "select, then filters": [*MAKE, {"type": "select"}, JUDGE, ROUGE],
          "select only": [*MAKE, {"type": "select"}]}


def judge_from_final_files(out: Path) -> tuple[int, int] | None:
    """(judged, preferring the improved response) from the judge stage's final records and its failure rows."""
    folder = next(out.glob("stages/*-judge.pairwise"), None)
    if folder is None:
        return None
    kept = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    dropped = [row["record"] for line in (out / "failures.jsonl").read_text().splitlines()
               if (row := json.loads(line))["stage"] == "judge.pairwise" and row["kind"] == "judge_filter"]
    judged = kept + dropped
    return len(judged), sum(1 for r in judged if r["metadata"]["judge"]["verdict"] == "a")


def run(order: str, budget: int, tmp: Path) -> dict[str, Any]:
    from datatailor.recipe import parse_recipe
    from datatailor.runner import run_recipe_sync

    model = {"backend": "scripted", "model": "teacher", "handler": "bench_refed_topup:teacher"}
    recipe = parse_recipe({"models": {"teacher": model, "judge": model}, "input": str(LIMA), "budget_pairs": budget,
                           "stages": ORDERS[order], "cache": False}, "bench-refed-topup", tmp)
    out = tmp / f"{order.replace(' ', '_').replace(',', '')}-{budget}"
    start = time.perf_counter()
    result = run_recipe_sync(recipe, out, show_progress=False)
    seconds = time.perf_counter() - start
    calls = json.loads((out / "usage.json").read_text())["total"]["all"]["requests"]
    report = json.loads((out / "reports" / "refed_report.json").read_text())
    return {"order": order, "budget": budget, "status": result.status, "pairs": result.records, "calls": calls,
            "calls/pair": round(calls / result.records, 2) if result.records else None,
            "references": report["references"]["drawn"], "rounds": json.loads((out / "manifest.json").read_text())["rounds"],
            "report judge": (report["judge"]["judged"], report["judge"]["prefers_improved"]) if report.get("judge") else None,
            "final files judge": judge_from_final_files(out), "message": result.message, "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=40, help="budget_pairs of the runs with filters (default 40)")
    args = parser.parse_args()
    if not LIMA.is_file():
        print(f"LIMA's references are not at {LIMA}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    runs = [(order, args.budget) for order in ("filters, then select", "select, then filters")]
    runs += [("select only", b) for b in (24, 25, 40)]
    with tempfile.TemporaryDirectory(prefix="bench-refed-topup-") as tmp:
        for order, budget in runs:
            row = run(order, budget, Path(tmp))
            print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
