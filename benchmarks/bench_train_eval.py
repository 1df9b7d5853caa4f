"""Wall time and peak memory of `datatailor train` (and, later, `eval`) at a fixed tiny size on the CPU.

train: LoRA on `local:gemma-3-270m`, 32 pairs, 1 epoch, max_length 256, batch 4 (micro-batch 2),
       run as its own `datatailor train` process so that its peak RSS (from wait4's rusage) is the
       command's alone. The pairs are the first 32 Alpaca seed tasks (their first instance as input
       and output) from ../shared/data, or the 12 built-in facts repeated when that is missing.
       Prints the command, the figures and the loss curve, and a Markdown row for RESULTS.md.

    python benchmarks/bench_train_eval.py train                 # about 3-6 minutes on 2 busy cores
    python benchmarks/bench_train_eval.py train --pairs 8 --threads 2

The model conversion (GGUF → HF folder, once per machine) is done before timing starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ALPACA_SEEDS = REPO.parent / "shared" / "data" / "stanford_alpaca" / "seed_tasks.jsonl"
BASE = "local:gemma-3-270m"


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load {load:.1f}"


def write_pairs(path: Path, n: int) -> str:
    """n training pairs in Alpaca format; returns where they came from."""
    rows: list[dict[str, str]] = []
    source = str(ALPACA_SEEDS)
    if ALPACA_SEEDS.is_file():
        for line in ALPACA_SEEDS.read_text(encoding="utf-8").splitlines():
            task = json.loads(line)
            first = task["instances"][0]
            if first.get("output"):
                rows.append({"instruction": task["instruction"], "input": first.get("input", ""), "output": first["output"]})
            if len(rows) == n:
                break
    else:
        sys.path.insert(0, str(REPO))
        from tests.train_fixtures import FACTS

        source = "tests/train_fixtures.py FACTS (shared data not found)"
        while len(rows) < n:
            q, a = FACTS[len(rows) % len(FACTS)]
            rows.append({"instruction": f"{q} ({len(rows)})", "input": "", "output": a})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return source


def run_cli(args: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, exit code, stderr) of one `datatailor` process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    # communicate() reaped the child; RUSAGE_CHILDREN now includes it (and only it: nothing else ran).
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(stdout, end="")
    return wall, peak_kib / 1024, proc.returncode, stderr


def bench_train(opts: argparse.Namespace) -> None:
    from datatailor.llm.hf import model_source

    t = time.perf_counter()
    source, converted = model_source(BASE)
    print(f"base model folder: {source}" + (f" (converted now in {converted:.0f} s)" if converted else " (already converted)"))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = work / "pairs.jsonl"
        origin = write_pairs(data, opts.pairs)
        out = work / "adapter"
        args = ["train", "--data", str(data), "--base", BASE, "--out", str(out), "--epochs", str(opts.epochs),
                "--max-length", str(opts.max_length), "--batch-size", "4", "--micro-batch-size", "2", "--lora",
                "--seed", "0"]
        if opts.threads:
            args += ["--threads", str(opts.threads)]
        print(f"machine: {machine()}")
        print(f"data: {opts.pairs} pairs from {origin}")
        print("command: datatailor " + " ".join(a if a not in (str(data), str(out)) else ("PAIRS.jsonl" if a == str(data) else "OUT") for a in args))
        wall, peak_mb, code, stderr = run_cli(args)
        if code != 0:
            print(stderr, file=sys.stderr)
            raise SystemExit(f"datatailor train failed with exit code {code}")
        report = json.loads((out / "train_report.json").read_text(encoding="utf-8"))
        losses = [round(p["loss"], 4) for p in report["loss_curve"]]
        print(f"loss curve: {losses}")
        print(
            f"train: wall {wall:.1f} s (training loop {report['train_time_s']:.1f} s, model load {report['load_time_s']:.1f} s), "
            f"peak RSS {peak_mb:.0f} MiB; {report['examples']} pairs, {report['steps']} steps, "
            f"{report['tokens_per_epoch']} tokens/epoch ({report['response_tokens_per_epoch']} in responses, "
            f"{report['truncated']} truncated), loss {report['first_loss']:.3f} → {report['final_loss']:.3f}, "
            f"{report['trainable_params']:,} trainable parameters"
        )
        print(
            f"| `{' '.join(['train', '--pairs', str(opts.pairs)] + (['--threads', str(opts.threads)] if opts.threads else []))}` "
            f"| {wall:.0f} s | {report['train_time_s']:.0f} s | {report['train_time_s'] / max(1, report['steps']):.1f} s "
            f"| {peak_mb:.0f} MiB | {report['steps']} | {report['tokens_per_epoch']} | {report['first_loss']:.3f} → {report['final_loss']:.3f} |"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"(benchmark total {time.perf_counter() - t:.0f} s)")


# One entry per section. The `eval` section (wall time and memory of `datatailor eval` at the same
# size, issue 4 "Evaluate") is to be added here by its author, with its own subcommand options.
SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {"train": bench_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="section", required=True)
    train = sub.add_parser("train", help="wall time and peak RSS of `datatailor train` (LoRA, CPU)")
    train.add_argument("--pairs", type=int, default=32)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    opts = parser.parse_args()
    SECTIONS[opts.section](opts)


if __name__ == "__main__":
    main()
