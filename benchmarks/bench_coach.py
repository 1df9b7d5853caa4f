"""CoachLM on the local models: coach training cost, revision throughput, and closeness to the experts' revisions.

1. `coach prepare` (held-out 20, seed 0; the smallest revisions for the tiny run, as examples/coachlm.sh).
2. Train a tiny coach: LoRA on local:gemma-3-270m with the coachlm_coach preset scaled down (--train pairs, 2 epochs,
   r 16, max length 512): wall time and peak RSS from the training report.
3. Revise the same --pairs held-out raw pairs three ways, greedy: the trained coach, the untrained base model (the
   same prompt, no adapter), and a prompted coach (Qwen2.5-Coder-0.5B-Instruct, 3 expert revisions as examples).
   Per coach: pairs revised, originals kept and why, seconds and pairs/s, and how close the result is to the
   experts' revision (ROUGE-L of the response, edit similarity of the pair) next to the unrevised original's.

A fresh request cache each time. About 10-15 minutes on 2 idle cores.

    python benchmarks/bench_coach.py [--pairs 6] [--train 8]
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


def revise(tmp: Path, name: str, coach: dict[str, Any], pairs: Path, n: int, mode: str, shots: Path | None) -> dict[str, Any]:
    from datatailor.recipe import parse_recipe
    from datatailor.runner import run_recipe_sync

    stage: dict[str, Any] = {"type": "coach.revise", "mode": mode}
    if shots is not None:
        stage.update(shots_file=str(shots), shots=3)
    recipe = parse_recipe({"models": {"coach": coach}, "input": {"path": str(pairs), "limit": n}, "stages": [stage]}, name, tmp)
    start = time.perf_counter()
    run_recipe_sync(recipe, tmp / name, show_progress=False)
    seconds = time.perf_counter() - start
    report = json.loads((tmp / name / "reports" / "coachlm_report.json").read_text())
    usage = json.loads((tmp / name / "usage.json").read_text())["total"]["all"]
    return {"coach": name, "seconds": round(seconds, 1), "pairs_per_s": round(report["pairs"] / seconds, 3),
            "completion_tokens": usage["completion_tokens"], "revised": report["revised"], "pairs": report["pairs"],
            "kept": report["kept_original"], "closeness": report["closeness_to_expert"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6, help="held-out pairs revised by each coach")
    parser.add_argument("--train", type=int, default=8, help="expert revisions the tiny coach trains on")
    args = parser.parse_args()
    from datatailor.stages.coach import prepare
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import load_train_config

    with tempfile.TemporaryDirectory(prefix="bench-coach-") as name:
        tmp = Path(name)
        os.environ["DATATAILOR_CACHE_DIR"] = str(tmp / "cache")
        prepare("coachlm", tmp / "prep", holdout=20, alpha=0.3, direction="ascending")
        settings = load_train_config(None, {"preset": "coachlm_coach", "epochs": 2, "batch_size": 4, "lora_r": 16, "max_length": 512})
        report = train_sft(tmp / "prep" / "train.jsonl", "local:gemma-3-270m", tmp / "coach", settings, limit=args.train)
        print(f"training: {report.examples} pairs, {report.steps} steps, loss {report.first_loss:.3f} → {report.final_loss:.3f}, "
              f"{report.wall_time_s:.0f} s, peak RSS {report.peak_rss_mb:.0f} MB")
        heldout = tmp / "prep" / "heldout.jsonl"
        gemma = {"backend": "hf", "model": "local:gemma-3-270m", "device": "cpu", "temperature": 0.0, "max_tokens": 512}
        rows = [
            revise(tmp, "trained", {**gemma, "adapter": str(tmp / "coach")}, heldout, args.pairs, "trained", None),
            revise(tmp, "untrained", gemma, heldout, args.pairs, "trained", None),
            revise(tmp, "prompted", {"backend": "llamacpp", "model": "local:qwen2.5-coder-0.5b-instruct", "temperature": 0.0,
                                     "max_tokens": 512, "n_ctx": 4096}, heldout, args.pairs, "prompted", tmp / "prep" / "shots.jsonl"),
        ]
    print(f"\n{'coach':10s} {'revised':>8s} {'s':>7s} {'pairs/s':>8s} {'ROUGE-L':>8s} {'(orig)':>7s} {'edit sim':>9s} {'(orig)':>7s}  kept originals")
    for r in rows:
        c = r["closeness"] or {}
        print(f"{r['coach']:10s} {r['revised']:>3d}/{r['pairs']:<4d} {r['seconds']:7.1f} {r['pairs_per_s']:8.3f} "
              f"{c.get('rouge_l', 0):8.3f} {c.get('rouge_l_original', 0):7.3f} {c.get('edit_similarity', 0):9.3f} "
              f"{c.get('edit_similarity_original', 0):7.3f}  {r['kept']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
