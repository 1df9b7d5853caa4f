"""TeaMs-RL: training cost, learning curves of both observation modes, and query accounting against Evol-Instruct.

Scripted (default, seconds): the world of tests/test_teams.py — seeds tagged [A]/[B], a reviewer that says "Not
Equal" only for the operation that suits the tag — so a good policy exists (6 per episode if it reads the text, 3 if
it only sees its last operation, 1 at random). For each observation mode: wall time and model calls per TRPO update,
the mean episode reward every 5 updates, and the trained policy's and a random policy's reward over 128 episodes.
Then query accounting on the same 20 seeds at equal size (20 pairs): TeaMs-RL generation (the trained faithful policy,
official schedule, all 6 steps kept, elimination checks) against Evol-Instruct (4 rounds, all survivors kept), both
trimmed to 20 pairs by `select`; every call made counts.

--local: the same training, 3 updates of 2 episodes, on the embedded Qwen 0.5B as rewriter and reviewer (faithful
observation), seeds from examples/data/self_instruct_seeds.jsonl: wall time and calls per update, rewards.

    python benchmarks/bench_teams.py [--updates 30] [--local]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_and_measure(tmp: Path, mode: str, updates: int, models: dict[str, Any], seeds: list[str], n_envs: int, embedder: str) -> dict[str, Any]:
    from datatailor.llm.config import ScriptedModel
    from datatailor.llm.models import ModelPool
    from datatailor.llm.usage import UsageLedger
    from datatailor.stages.teams import EvolCore
    from datatailor.train.rl import RLSettings, build_env, load_policy, mean_episode_reward, train_policy
    from pydantic import TypeAdapter

    from datatailor.llm.config import ModelConfig

    configs = {k: TypeAdapter(ModelConfig).validate_python(v) if not isinstance(v, ScriptedModel) else v for k, v in models.items()}
    ledger = UsageLedger()
    pool = ModelPool(configs, ledger)
    core = EvolCore(pool.role("rewriter"), pool.role("reviewer"), stage="train")
    loop = asyncio.new_event_loop()
    settings = RLSettings(updates=updates, n_envs=n_envs, observation=mode, embedder=embedder, breadth_bias=0.0, seed=0)
    start = time.perf_counter()
    train_policy(core, seeds, tmp / mode, settings, loop.run_until_complete)
    seconds = time.perf_counter() - start
    calls = ledger.as_json()["run"]["all"]["requests"]
    rows = list(csv.DictReader((tmp / mode / "training_log.csv").open()))
    model, normaliser = load_policy(tmp / mode)
    episodes = 128 if len(seeds) > 4 else 4
    env = build_env(core, seeds, settings.model_copy(update={"seed": 99}), loop.run_until_complete)
    if normaliser is not None:
        env.obs_rms = normaliser.obs_rms
    trained = mean_episode_reward(env, episodes, model, seed=1)
    rand = mean_episode_reward(build_env(core, seeds, settings.model_copy(update={"seed": 98}), loop.run_until_complete), episodes, None, seed=2)
    loop.run_until_complete(pool.aclose())
    return {"mode": mode, "updates": updates, "seconds": round(seconds, 1), "s_per_update": round(seconds / updates, 2),
            "calls_per_update": round(calls / updates, 1), "curve": [float(r["mean_episode_reward"]) for r in rows],
            "trained": round(trained, 3), "random": round(rand, 3)}


def accounting(tmp: Path, policy: Path, pairs: int = 20) -> list[dict[str, Any]]:
    """Both methods on the same 20 seeds, trimmed to the same number of pairs; every call made is counted."""
    from datatailor.recipe import parse_recipe
    from datatailor.runner import run_recipe_sync
    from tests.test_teams import SEEDS, WORLD

    seeds = tmp / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS), encoding="utf-8")
    runs = {
        "TeaMs-RL (trained policy, official schedule)": {"type": "teams.generate", "policy": str(policy), "schedule": "official", "keep": "all"},
        "Evol-Instruct (4 rounds, all survivors)": {"type": "evol.evolve", "role": "expert", "responder_role": "expert", "equal_role": "reviewer"},
    }
    out: list[dict[str, Any]] = []
    for name, stage in runs.items():
        recipe = parse_recipe({"models": WORLD, "input": str(seeds), "budget_pairs": pairs, "cache": False,
                               "stages": [stage, {"type": "select"}]}, name, tmp)
        folder = tmp / f"acc{len(out)}"
        result = run_recipe_sync(recipe, folder, show_progress=False)
        usage = json.loads((folder / "usage.json").read_text())["total"]["roles"]
        out.append({"method": name, "pairs": result.records, "expert": usage.get("expert", {}).get("requests", 0),
                    "reviewer": usage.get("reviewer", {}).get("requests", 0)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--local", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-teams-") as name:
        tmp = Path(name)
        os.environ["DATATAILOR_CACHE_DIR"] = str(tmp / "cache")
        if args.local:
            qwen = {"backend": "llamacpp", "model": "local:qwen2.5-coder-0.5b-instruct", "temperature": 0.0}
            models = {"rewriter": {**qwen, "max_tokens": 120}, "reviewer": {**qwen, "max_tokens": 8}}
            seeds = [json.loads(line)["instruction"] for line in (REPO / "examples/data/self_instruct_seeds.jsonl").read_text().splitlines()]
            r = train_and_measure(tmp, "faithful", 3, models, seeds, 2, "hashing")
            print(f"local (Qwen 0.5B rewriter and reviewer, faithful, 2 episodes per update): {r['seconds']} s, "
                  f"{r['s_per_update']} s and {r['calls_per_update']} calls per update; mean episode reward per update {r['curve']}; "
                  f"after training {r['trained']} vs random {r['random']} (4 episodes each)")
            return 0
        from tests.test_teams import SEEDS, WORLD

        for mode in ("faithful", "informative"):
            r = train_and_measure(tmp, mode, args.updates, WORLD, SEEDS, 8, "hashing")
            print(f"{mode:12s} {r['seconds']:6.1f} s ({r['s_per_update']} s/update, {r['calls_per_update']} calls/update); "
                  f"curve every 5 updates {r['curve'][::5]}; trained {r['trained']} vs random {r['random']} per episode")
        print()
        for row in accounting(tmp, tmp / "faithful"):
            print(f"{row['method']:45s} pairs {row['pairs']:4d}  expert calls {row['expert']:4d} ({row['expert'] / max(1, row['pairs']):.2f}/pair)  "
                  f"reviewer calls {row['reviewer']:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
