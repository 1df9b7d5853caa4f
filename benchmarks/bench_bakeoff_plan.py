"""The bake-off's plan against what the bake-off then did, on scripted models.

Runs a bake-off over Vicuna-80 and Self-Instruct's 252 tasks (66 seeds, as examples/bakeoff/openai.yaml) with CodecLM,
Self-Instruct, Evol-Instruct and TeaMs-RL at `--budget` pairs each, after printing its plan, and compares per method
the projected model calls and pairs made before the trim with the ones usage.json and the manifests record. The
scripted models are those of benchmarks/bench_calls_per_pair.py, whose outcome rates (CodecLM pass 0.7 per
iteration, Self-Instruct near copies 0.3, Evol-Instruct 'Equal' 0.2) are the rates the plan assumes: the estimates
should land close here; with real models they can be far off (they are labelled as estimates).

    python benchmarks/bench_bakeoff_plan.py [--budget 200] [--eval-limit 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from datatailor.bakeoff.config import load_bakeoff
from datatailor.bakeoff.projection import project, render
from datatailor.bakeoff.run import prepare, run_bakeoff
from datatailor.llm.base import CompletionRequest

STRONG = {"backend": "scripted", "model": "bench-strong", "handler": "bench_calls_per_pair:strong"}
TARGET = {"backend": "scripted", "model": "bench-target", "handler": "bench_calls_per_pair:target"}


def judge(request: CompletionRequest) -> str:
    """Pairwise: the tuned target a little below the reference; a rating: 4."""
    return "5 6" if "answer_1" in (request.variables or {}) else "4"


def recipes(budget: int, seeds: int, updates: int) -> dict[str, dict[str, Any]]:
    chains = math.ceil(budget / (seeds * 4 * 0.8))
    teams = {"rewriter": STRONG, "reviewer": STRONG, "expert": STRONG}
    return {
        "codeclm": {"models": {"target": TARGET}, "stages": [
            {"type": "codec.encode"}, {"type": "codec.augment", "pool_size": max(1, budget // 10)}, {"type": "codec.rubrics"},
            {"type": "codec.decode"}, {"type": "codec.contrastive"}, {"type": "codec.select"}]},
        "self-instruct": {"models": {}, "stages": [{"type": "self_instruct", "per_call": 8}, {"type": "respond"}]},
        "evol-instruct": {"models": {}, "stages": [{"type": "evol.evolve", "rounds": 4, "chains_per_seed": chains}, {"type": "select"}]},
        "teams-rl": {"models": teams, "stages": [
            {"type": "teams.train", "updates": updates, "n_envs": 2},
            {"type": "teams.generate", "schedule": "official", "keep": "all"}, {"type": "select"}]},
    }


def write_bakeoff(folder: Path, budget: int, eval_limit: int, updates: int) -> Path:
    for name, recipe in recipes(budget, 66, updates).items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    config = {
        "name": "plan-vs-made", "seed": 0, "budget_pairs": budget, "testsets": ["vicuna80", "selfinstruct252"],
        "eval_limit": eval_limit,
        "models": {"strong": STRONG, "judge": {"backend": "scripted", "model": "bench-judge", "handler": f"{__name__}:judge"}},
        "methods": [{"name": n, "recipe": f"{n}.yaml"} for n in recipes(budget, 66, updates)],
        "train": {"kind": "external", "target": {"backend": "scripted", "model": "tuned-{method}",
                                                 "rules": [{"match": ".*", "reply": "the {method} tuned answer"}]}},
        "eval": {"bootstrap": 200},
    }
    path = folder / "bakeoff.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def made_before_trim(run: Path) -> int:
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    first = next(i for i, s in enumerate(stages) if s["type"] in ("select", "codec.select") or i == len(stages) - 1)
    return stages[first - 1]["outputs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--eval-limit", type=int, default=10)
    parser.add_argument("--updates", type=int, default=5, help="TeaMs-RL's TRPO updates (2 episodes each)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = load_bakeoff(write_bakeoff(folder, args.budget, args.eval_limit, args.updates))
        plan = prepare(config, folder / "out")
        projected = project(plan)
        print(render(projected), file=sys.stderr)
        start = time.perf_counter()
        run_bakeoff(config, folder / "out", log_stream=None)
        seconds = time.perf_counter() - start
        methods = folder / "out" / "methods"
        print(f"budget_pairs {args.budget}, 66 seeds, {projected['items']} judged items per method; bake-off {seconds:.0f} s\n")
        print("| method | calls projected | calls made | made / projected | pairs before the trim: projected (at most) | made |")
        print("|---|---|---|---|---|---|")
        for row in projected["rows"]:
            data = row["data"]
            usage = json.loads((methods / row["method"] / "run" / "usage.json").read_text())["total"]["all"]["requests"]
            calls = data["calls"]
            pairs = data["made"]
            most = "" if pairs["most"] is None else f" ({pairs['most']:,})"
            print(f"| {row['method']} | {calls['value']:,} ({calls['kind']}) | {usage:,} | {usage / calls['value']:.2f} | "
                  f"{pairs['value']:,} {pairs['kind']}{most} | {made_before_trim(methods / row['method'] / 'run'):,} |")
        judged = sum(json.loads(p.read_text())["total"]["all"]["requests"] for p in methods.glob("*/eval/*/run/usage.json"))
        rated = sum(json.loads(p.read_text())["total"]["all"]["requests"] for p in methods.glob("*/rate/run/usage.json"))
        fixed = projected["shared"]["reference_calls"] + sum(r["eval_calls"] for r in projected["rows"])
        print(f"| judging and reference answers | {fixed:,} (exact) | {judged:,} | {judged / fixed:.2f} | | |")
        rating = sum(r.get("rating_calls", 0) for r in projected["rows"])
        print(f"| rating | {rating:,} (at most) | {rated:,} | {rated / rating:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
