"""TeaMs-RL: a training killed with SIGKILL and run again, against one never interrupted.

The scripted world of tests/test_teams.py (seeds tagged [A]/[B], a reviewer that says "Not Equal" only for the
operation that suits the tag), with every call taking `--latency` seconds so the kill lands part-way. A `teams.train`
recipe of `--updates` updates is run through the CLI, killed once `--kill-after` checkpoints exist, and run again with
the same request cache (as a resumed bake-off does); a second folder runs the same recipe uninterrupted with its own
cache. Printed: the updates each part made, the requests each paid for (usage.json, all invocations), the largest
weight difference of the final policies, whether the training logs match (but their wall-clock column), and the
checkpoint's sizes and write time.

    python benchmarks/bench_teams_resume.py [--updates 20] [--kill-after 6] [--envs 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import kill_9_when, write_rows  # noqa: E402
from tests.test_teams import SEEDS, WORLD  # noqa: E402


def recipe(folder: Path, updates: int, envs: int, latency: float) -> Path:
    models = {name: {**cfg, "latency_s": latency} for name, cfg in WORLD.items()}
    data = {"models": models, "input": str(write_rows(folder / "seeds.jsonl", [{"instruction": s} for s in SEEDS])),
            "seed": 0, "stages": [{"type": "teams.train", "updates": updates, "n_envs": envs}]}
    path = folder / "teams.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def policy_dir(out: Path) -> Path:
    return out / "stages" / "00-teams.train" / "policy"


def weights(out: Path) -> dict[str, Any]:
    from datatailor.train.rl import load_policy

    model, _ = load_policy(policy_dir(out))
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


def log(out: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((policy_dir(out) / "training_log.csv").open())]


def requests(out: Path) -> int:
    return json.loads((out / "usage.json").read_text())["total"]["all"]["requests"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--kill-after", type=int, default=6)
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = recipe(folder, args.updates, args.envs, args.latency)
        cmd = lambda out: [sys.executable, "-m", "datatailor", "run", str(path), "--out", str(out), "--no-progress"]  # noqa: E731

        start = time.perf_counter()
        done = subprocess.run(cmd(folder / "straight"), env={**env, "DATATAILOR_CACHE_DIR": str(folder / "c-straight")},
                              capture_output=True, text=True, timeout=1800)
        straight_s = time.perf_counter() - start
        assert done.returncode == 0, done.stderr

        resumed = folder / "resumed"
        cache = {**env, "DATATAILOR_CACHE_DIR": str(folder / "c-resumed")}
        checkpoints = policy_dir(resumed) / "checkpoints"
        start = time.perf_counter()
        kill_9_when(cmd(resumed), cache, lambda: len(list(checkpoints.glob("update_*.zip"))) >= args.kill_after, timeout_s=1800)
        killed_at = len(list(checkpoints.glob("update_*.zip")))
        done = subprocess.run(cmd(resumed), env=cache, capture_output=True, text=True, timeout=1800)
        resumed_s = time.perf_counter() - start
        assert done.returncode == 0, done.stderr

        a, b = weights(folder / "straight"), weights(resumed)
        largest = max(float((a[k] - b[k]).abs().max()) for k in a)
        k = killed_at
        sizes = {name: (checkpoints / f"{name}_{k:04d}{ext}").stat().st_size for name, ext in
                 (("update", ".zip"), ("vecnormalize", ".pkl"), ("state", ".pkl"))}
        summary = json.loads((policy_dir(resumed) / "train_summary.json").read_text())
        print(f"{args.updates} updates × {args.envs} episodes × 6 steps, {args.latency} s per call, killed after {killed_at} "
              f"checkpoints (resumed from {summary['resumed_from']})")
        print("| run | wall time | requests (all invocations) | largest weight difference | same log |")
        print("|---|---|---|---|---|")
        print(f"| uninterrupted | {straight_s:.1f} s | {requests(folder / 'straight')} | — | — |")
        print(f"| killed and resumed | {resumed_s:.1f} s | {requests(resumed)} | {largest:.3g} | {log(resumed) == log(folder / 'straight')} |")
        print(f"checkpoint {k}: policy {sizes['update']:,} B, normaliser {sizes['vecnormalize']:,} B, training state {sizes['state']:,} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
