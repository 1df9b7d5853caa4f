"""A full `datatailor run` against a mock server that fails 20% of requests, and the row accounting.

The mock (a child process) injects, in equal shares, 429 with Retry-After, 500, timeouts (it hangs
past the client's timeout) and 200s whose JSON body is cut short. The recipe answers every input
row with the `respond` stage through the `openai` backend. Afterwards every input row must be in
data.jsonl or in failures.jsonl — exactly once — or the benchmark exits with status 1.

    python benchmarks/bench_faults.py                      # 300 rows, 20% faults, well under a minute
    python benchmarks/bench_faults.py --rows 1000 --fault-rate 0.3 --max-retries 6
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from datatailor.io import read_records
from datatailor.testing import MockConfig, MockServerProcess

FAULTS = ("429", "500", "timeout", "truncated")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--fault-rate", type=float, default=0.2, help="share of requests that fail (default 0.2)")
    parser.add_argument("--latency", type=float, default=0.05, help="mock latency in seconds (default 0.05)")
    parser.add_argument("--concurrency", type=int, default=16, help="the model's max_concurrency (default 16)")
    parser.add_argument("--timeout", type=float, default=1.0, help="client timeout_s; the mock hangs 30 s (default 1.0)")
    parser.add_argument("--retry-after", type=float, default=0.5, help="the mock's Retry-After seconds (default 0.5)")
    parser.add_argument("--max-retries", type=int, default=2, help="the model's max_retries (default 2, so a few rows exhaust them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the run here instead of a temporary folder")
    args = parser.parse_args()

    share = args.fault_rate / len(FAULTS)
    mock = MockConfig(latency_s=args.latency, jitter_s=args.latency / 2, retry_after_s=args.retry_after, hang_s=30.0,
                      seed=args.seed, rate_429=share, rate_500=share, rate_timeout=share, rate_truncated=share)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Task {i}: write one sentence about the number {i}."} for i in range(args.rows)]
    (work / "input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    with MockServerProcess(mock) as server:
        recipe = {
            "name": "bench-faults",
            "models": {"strong": {
                "backend": "openai", "model": "mock-model", "base_url": server.url, "api_key_env": None,
                "max_concurrency": args.concurrency, "timeout_s": args.timeout, "max_retries": args.max_retries,
                "retry_backoff_s": 0.1, "retry_backoff_max_s": 2.0, "max_tokens": 64,
            }},
            "input": "input.jsonl",
            "stages": [{"type": "respond", "role": "strong", "concurrency": 2 * args.concurrency}],
            "cache": False,
        }
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        out = work / "run"
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "datatailor", "run", str(work / "recipe.yaml"), "--out", str(out), "--no-progress"],
            capture_output=True, text=True, cwd=work, env=dict(os.environ),
        )
        elapsed = time.perf_counter() - started
        served = server.stats()

    print(f"rows={args.rows} fault_rate={args.fault_rate:g} (429+Retry-After {args.retry_after:g}s, 500, timeout "
          f"{args.timeout:g}s, truncated JSON; {share:.1%} each) latency={args.latency:g}s "
          f"max_concurrency={args.concurrency} max_retries={args.max_retries}")
    print(f"datatailor run: exit {proc.returncode} in {elapsed:.1f} s | {proc.stdout.strip() or proc.stderr.strip()}")
    input_ids = [r.id for r in read_records(work / "input.jsonl")]
    data = read_jsonl(out / "data.jsonl")
    failures = read_jsonl(out / "failures.jsonl")
    kinds = collections.Counter(f["kind"] for f in failures)
    data_ids, failed_ids = [r["id"] for r in data], [f["id"] for f in failures]
    missing = set(input_ids) - set(data_ids) - set(failed_ids)
    both = set(data_ids) & set(failed_ids)
    dupes = len(data_ids) + len(failed_ids) - len(set(data_ids) | set(failed_ids))
    injected = {k: served.get(k, 0) for k in FAULTS}
    usage = json.loads((out / "usage.json").read_text())["run"]["all"] if (out / "usage.json").exists() else {}
    print(f"data.jsonl: {len(data)} rows | failures.jsonl: {len(failures)} rows {dict(kinds)} | "
          f"total {len(data) + len(failures)} of {len(input_ids)} input rows")
    print(f"server saw {served.get('requests', 0)} requests: ok {served.get('ok', 0)}, injected {injected} "
          f"({sum(injected.values()) / max(1, served.get('requests', 1)):.1%}); "
          f"retries = {served.get('requests', 0) - args.rows} extra requests beyond one per row")
    print(f"usage.json (this run): {usage.get('requests', 0)} successful requests, {usage.get('failed_requests', 0)} "
          f"failed calls, {usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion tokens")
    print(f"throughput: {args.rows / elapsed:.1f} rows/s including start-up")
    ok = proc.returncode == 0 and not missing and not both and not dupes
    print("every row accounted for: " + ("yes" if ok else f"NO (missing {len(missing)}, in both {len(both)}, duplicated {dupes})"))
    if args.keep is None:
        print(f"(run directory: {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
