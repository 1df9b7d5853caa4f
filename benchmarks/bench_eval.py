"""Wall time and peak memory of `datatailor eval` at a fixed tiny size on the CPU.

(a) real models, cold cache: the first N Vicuna-80 questions; candidate local:gemma-3-270m, reference and
    judge local:qwen2.5-coder-0.5b-instruct (llama.cpp, in-process), answers capped at --max-tokens,
    judge replies at 16 tokens. That is 2N answers + 2N judge calls (both orders).
(b) the same command again on the same folder: it resumes from the checkpoints and must make zero calls.
(c) engine overhead: all 252 Self-Instruct items with scripted models (no model time at all).

Each run is a separate `datatailor eval` process; its peak RSS comes from wait4's rusage.

    python benchmarks/bench_eval.py                 # N = 4, about 3-5 minutes on 2 busy cores
    python benchmarks/bench_eval.py --items 2 --skip-real
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

SCRIPTED_MODELS = """
models:
  candidate: {backend: scripted, model: cand, rules: [{match: ".*", reply: "A candidate answer in a few words."}]}
  reference: {backend: scripted, model: ref, rules: [{match: ".*", reply: "A reference answer in a few words."}]}
  judge: {backend: scripted, model: judge, rules: [{match: ".*", reply: "7 6"}]}
"""


def timed(args: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run one CLI process; wall time, peak RSS (MiB) and the eval.json it wrote."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"datatailor {' '.join(args)} failed ({code}):\n{out}\n{err}")
    out_dir = Path(args[args.index("--out") + 1])
    ev = json.loads((out_dir / "eval.json").read_text())
    calls = json.loads((out_dir / "run" / "usage.json").read_text())["run"]["all"]["requests"]
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "calls": calls,
            "judged": ev["judged"], "crr": ev["metrics"]["crr"], "position_consistency": ev["position_consistency"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4, help="Vicuna-80 questions for the real-model run.")
    parser.add_argument("--max-tokens", type=int, default=48, help="Cap on each candidate/reference answer.")
    parser.add_argument("--skip-real", action="store_true", help="Only the scripted engine-overhead run.")
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    env = dict(os.environ, DATATAILOR_CACHE_DIR=str(work / "cache"))
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    try:
        if not opts.skip_real:
            real = ["eval", "--testset", "vicuna80", "--limit", str(opts.items), "--candidate", "local:gemma-3-270m",
                    "--reference", "local:qwen2.5-coder-0.5b-instruct", "--judge", "local:qwen2.5-coder-0.5b-instruct",
                    "--max-tokens", str(opts.max_tokens), "--judge-max-tokens", "16", "--out", str(work / "real"), "--no-progress"]
            results["real_cold"] = {"items": opts.items, **timed(real, env)}
            results["real_resume"] = timed(real, env)
        models = work / "models.yaml"
        models.write_text(SCRIPTED_MODELS, encoding="utf-8")
        scripted = ["eval", "--testset", "selfinstruct252", "--models", str(models), "--out", str(work / "scripted"), "--no-progress"]
        results["scripted_252"] = timed(scripted, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    for name in ("real_cold", "real_resume", "scripted_252"):
        if name in results:
            r = results[name]
            print(f"| eval {name} | {r['wall_s']} s | {r['peak_rss_mib']} MiB | {r['calls']} calls | {r['judged']} judged |")  # type: ignore[index]


if __name__ == "__main__":
    main()
