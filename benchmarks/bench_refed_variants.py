"""REFED and its ablations at equal size: calls, tokens and $ per kept pair, and feedback calls.

Two modes:

* scripted (default): a deterministic teacher (this file's `teacher`) on LIMA's references, at the paper's shape
  (2 features × 10 instructions per reference) and a realistic size (--pairs, default 200). Token counts are word
  counts, priced at gpt-4o-mini's rates, so $ shows the cost's shape, not a real bill; the call counts are exact.
* --local: the four example recipes (examples/refed*.yaml) on the embedded Qwen 0.5B at their tiny size, plus the
  judge's verdict on improved vs draft for the full variant (both orders, strict rule) and its position consistency.

Every run uses a fresh request cache. Prints one row per variant.

    python benchmarks/bench_refed_variants.py                 # scripted, 200 pairs per variant, seconds
    python benchmarks/bench_refed_variants.py --local         # embedded model, ~15-25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LIMA = REPO.parent / "shared" / "data" / "lima" / "train.jsonl"
PRICES = {"price_per_mtok_in": 0.15, "price_per_mtok_out": 0.60}  # gpt-4o-mini, $ per million tokens


def teacher(request: Any) -> str:
    """A deterministic teacher for the scripted mode (routes by template name)."""
    t, v = request.template, request.variables or {}
    if t == "refed/instruction_feedback.j2":
        return json.dumps({"subject_areas": "the topics of the reference, in a few sentences " * 3,
                           "relevant_skills": "reasoning, domain knowledge and clear structure " * 3})
    if t == "refed/response_feedback.j2":
        return json.dumps({"response_feedback": "clear and accurate; could add an example and a short summary " * 4})
    if t == "refed/synthesize.j2":
        tag = request.sampling.seed % 100003
        return json.dumps({"instructions": [f"New instruction {i} ({tag}) about {v['feature_name']} in depth" for i in range(v["n"])]})
    if t == "refed/respond.j2":
        return "A helpful draft answer with reasoning and an example. " * 20
    if t == "refed/improve.j2":
        return json.dumps({"analysis": {"original_strengths": ["clear"], "improvement_opportunities": ["depth"], "relevant_feedback": ["example"]},
                           "implementation_strategy": {"planned_changes": ["add an example"], "rationale": "depth"},
                           "improved_response": "An improved answer with reasoning, an example and a summary. " * 24})
    raise ValueError(f"unexpected template {t}")


VARIANTS = {
    "no synthesis": ["refed.references:1", "select"],
    "instruction feedback only": ["refed.references:20", "refed.feedback:instruction", "refed.synthesize", "refed.respond", "select"],
    "+ sample-level response feedback": ["refed.references:20", "refed.feedback:instruction", "refed.synthesize", "refed.respond",
                                         "refed.sample_feedback", "refed.improve:sample", "select"],
    "REFED (reference-level both)": ["refed.references:20", "refed.feedback", "refed.synthesize", "refed.respond", "refed.improve", "select"],
}


def stages_of(spec: list[str]) -> list[dict[str, Any]]:
    out = []
    for item in spec:
        name, _, arg = item.partition(":")
        stage: dict[str, Any] = {"type": name, "concurrency": 64}
        if name == "refed.references":
            stage["pairs_per_reference"] = int(arg)
        elif name == "refed.feedback" and arg:
            stage["collect"] = [arg]
        elif name == "refed.improve" and arg:
            stage["feedback"] = arg
        elif name == "refed.synthesize":
            stage["per_feature"] = 10
        out.append(stage)
    return out


def row(name: str, out: Path, seconds: float) -> dict[str, Any]:
    report = json.loads((out / "reports" / "refed_report.json").read_text())
    c = report["cost"]
    return {"variant": name, "pairs": report["kept_pairs"], "requests": c["requests"], "calls/pair": c["requests_per_kept_pair"],
            "tokens/pair": c["tokens_per_kept_pair"], "$/pair": c["usd_per_kept_pair"], "feedback calls": c["feedback_calls"],
            "references": report["references"]["drawn"], "judge": report.get("judge"), "seconds": round(seconds, 1)}


def run_scripted(pairs: int, tmp: Path) -> list[dict[str, Any]]:
    from datatailor.recipe import parse_recipe
    from datatailor.runner import run_recipe_sync

    sys.path.insert(0, str(Path(__file__).parent))
    model = {"backend": "scripted", "model": "teacher", "handler": "bench_refed_variants:teacher", **PRICES}
    rows = []
    for name, spec in VARIANTS.items():
        recipe = parse_recipe({"models": {"teacher": model}, "input": str(LIMA), "budget_pairs": pairs, "cache": False,
                               "stages": stages_of(spec)}, name, tmp)
        start = time.perf_counter()
        out = tmp / name.replace(" ", "_")
        run_recipe_sync(recipe, out, show_progress=False)
        rows.append(row(name, out, time.perf_counter() - start))
    return rows


def run_local(tmp: Path) -> list[dict[str, Any]]:
    from datatailor.recipe import parse_recipe
    from datatailor.runner import run_recipe_sync

    rows = []
    recipes = {"no synthesis": "refed_no_synthesis.yaml", "instruction feedback only": "refed_instruction_feedback.yaml",
               "+ sample-level response feedback": "refed_sample_feedback.yaml", "REFED (reference-level both)": "refed.yaml"}
    for name, file in recipes.items():
        path = REPO / "examples" / file
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["input"] = str(LIMA)
        if file == "refed.yaml":  # also ask the judge whether the improved response beats the draft
            data["models"]["judge"] = {**data["models"]["teacher"], "temperature": 0.0, "max_tokens": 16}
            data["stages"].insert(-1, {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft",
                                       "rule": "strict", "output": "metadata.judge"})
        recipe = parse_recipe(data, str(path), path.parent)
        start = time.perf_counter()
        out = tmp / name.replace(" ", "_")
        run_recipe_sync(recipe, out, show_progress=False)
        rows.append(row(name, out, time.perf_counter() - start))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200, help="pairs per variant in the scripted mode")
    parser.add_argument("--local", action="store_true", help="the example recipes on the embedded model instead")
    args = parser.parse_args()
    if not LIMA.is_file():
        print(f"LIMA train not found at {LIMA}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-refed-") as tmp:
        os.environ["DATATAILOR_CACHE_DIR"] = str(Path(tmp) / "cache")  # a fresh request cache
        rows = run_local(Path(tmp)) if args.local else run_scripted(args.pairs, Path(tmp))
    print(f"mode: {'local (embedded Qwen 0.5B, example sizes)' if args.local else f'scripted teacher, {args.pairs} pairs, gpt-4o-mini prices on word counts'}")
    print(f"{'variant':36s} {'pairs':>5s} {'refs':>5s} {'calls':>6s} {'calls/pair':>10s} {'tokens/pair':>11s} {'$/pair':>10s} {'feedback':>8s} {'s':>7s}")
    for r in rows:
        print(f"{r['variant']:36s} {r['pairs']:5d} {r['references']:5d} {r['requests']:6d} {r['calls/pair'] or 0:10.3f} "
              f"{r['tokens/pair'] or 0:11.1f} {r['$/pair'] or 0:10.6f} {r['feedback calls']:8d} {r['seconds']:7.1f}")
        if r["judge"]:
            j = r["judge"]
            print(f"  judge (strict, both orders): improved preferred {j['prefers_improved']}/{j['judged']}, draft {j['prefers_draft']}, "
                  f"ties {j['ties']}; position consistency {j['position_consistency']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
