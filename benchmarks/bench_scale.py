"""Bounded memory at scale: peak RSS and records/s of `datatailor run` as the input grows.

Two jobs, each a separate `datatailor run` process (its peak RSS read from the kernel with wait4):

* respond: N short instructions answered by the `respond` stage through the `openai` backend against the
  local mock server (a separate process, fixed latency, replies of --reply-chars characters), with a fresh
  request cache (DATATAILOR_CACHE_DIR in a temporary folder). The goal: under 2 GB at 1M records, roughly
  flat per record.
* dedup: N instructions of which about 30 % are planted exact or near copies, through the `dedup` stage
  (MinHash LSH, threshold 0.8); no model.

    python benchmarks/bench_scale.py --job respond --sizes 100000,300000,1000000
    python benchmarks/bench_scale.py --job dedup --sizes 100000,1000000
    python benchmarks/bench_scale.py --job respond --sizes 20000        # a quick check, about a minute
    python benchmarks/bench_scale.py --job respond --sizes 100,20000 --executor ray   # Ray's fixed cost and rate

With --executor ray the run starts a local Ray (2 workers unless --workers): the peak RSS is the driver's
alone (Ray's own processes are not counted), the wall time includes starting Ray.

Prints one row per size: records, wall seconds, records/s, peak RSS (MB), RSS per 1K records, and what
the run wrote (data and failures rows). Run directories go to a temporary folder (--keep to keep them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from datatailor.testing import MockConfig, MockServerProcess

WORDS = ("river mountain city number letter colour planet animal recipe poem story law market engine garden "
         "bridge music winter ocean forest theory history language machine island desert").split()


def write_input(path: Path, n: int, duplicates: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            if recent and rng.random() < duplicates:
                words = rng.choice(recent).split()
                if rng.random() < 0.5:  # near copy: one word changed
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                text = " ".join(words)
            else:
                text = f"Task {i}: write two sentences about the {rng.choice(WORDS)} and the {rng.choice(WORDS)} " \
                       f"in {rng.choice(WORDS)} terms for reader {rng.randrange(10**6)}."
                recent = (recent + [text])[-1000:]
            fh.write(json.dumps({"instruction": text}) + "\n")


def run_once(work: Path, recipe: dict, env: dict[str, str], extra: list[str]) -> tuple[float, float, str]:
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    out = work / "run"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "run", str(work / "recipe.yaml"), "--out", str(out),
                             "--no-progress", *extra], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    output = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"datatailor run failed:\n{output}")
    return elapsed, usage.ru_maxrss / 1024, output.strip().splitlines()[-1] if output.strip() else ""


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=["respond", "dedup"], default="respond")
    parser.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated record counts")
    parser.add_argument("--concurrency", type=int, default=64, help="respond: stage concurrency and max_concurrency")
    parser.add_argument("--latency", type=float, default=0.002, help="respond: mock latency in seconds")
    parser.add_argument("--reply-chars", type=int, default=200)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, default=2, help="ray: actors")
    parser.add_argument("--shard-size", type=int, default=512, help="ray: records per task")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    extra = ["--executor", "ray", "--workers", str(args.workers), "--shard-size", str(args.shard_size)] if args.executor == "ray" else []
    print(f"job={args.job} executor={args.executor} sizes={sizes} concurrency={args.concurrency} latency={args.latency}s "
          f"cpu_count={os.cpu_count()}")
    print(f"{'records':>9} {'wall s':>8} {'rec/s':>8} {'peak RSS MB':>12} {'MB per 1K':>10}  data / failures")
    server = MockServerProcess(MockConfig(latency_s=args.latency, reply_chars=args.reply_chars)).start() if args.job == "respond" else None
    try:
        for n in sizes:
            work = root / f"{args.job}-{n}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            write_input(work / "input.jsonl", n, duplicates=0.3 if args.job == "dedup" else 0.0)
            env = dict(os.environ, DATATAILOR_CACHE_DIR=str(work / "cache"))  # a fresh request cache
            if args.job == "respond":
                recipe = {"name": "bench-scale-respond", "input": "input.jsonl",
                          "models": {"strong": {"backend": "openai", "model": "mock-model", "base_url": server.url,
                                                "api_key_env": None, "max_concurrency": args.concurrency,
                                                "max_tokens": 64, "timeout_s": 30}},
                          "stages": [{"type": "respond", "role": "strong", "concurrency": args.concurrency}]}
            else:
                recipe = {"name": "bench-scale-dedup", "input": "input.jsonl", "stages": [{"type": "dedup", "compare": "instruction"}]}
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            elapsed, rss_mb, _ = run_once(work, recipe, env, extra)
            data, failures = count_lines(work / "run" / "data.jsonl"), count_lines(work / "run" / "failures.jsonl")
            print(f"{n:>9} {elapsed:>8.1f} {n / elapsed:>8.0f} {rss_mb:>12.0f} {1000 * rss_mb / n:>10.2f}  {data} / {failures}",
                  flush=True)
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
