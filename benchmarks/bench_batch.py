"""Batch inference at scale: REFED for N pairs (default 10,000) online vs through the batch API, on the mock server.

Prints, for gpt-4o-mini's prices (input $0.15, output $0.60 per million tokens; batch: half):

* the projected cost of N pairs online and batched, from REFED's calls per pair (2 feedback + 2 synthesis calls per
  reference of 20 pairs, then a draft and an improvement per pair) and the token sizes assumed below;
* the measured cost of the same recipe run online and batched against the mock server (`datatailor run` in a child
  process each, fresh request cache each). The mock counts words as tokens; its teacher (`teacher` below) writes
  replies of about the assumed sizes, so the measured figures check the accounting against the projection;
* batches, requests, wall time and peak RSS of each run. The batched run waits `--delay` seconds per batch, the mock's
  stand-in for the minutes to hours a real batch takes (OpenAI promises 24 h).

    python benchmarks/bench_batch.py                        # 10,000 pairs, 60 s per batch: ~10 min on 2 cores
    python benchmarks/bench_batch.py --pairs 1000 --delay 5 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LIMA = REPO.parent / "shared" / "data" / "lima" / "train.jsonl"
PRICE_IN, PRICE_OUT = 0.15, 0.60  # gpt-4o-mini, $ per million tokens
PAIRS_PER_REFERENCE = 20  # REFED's paper shape: 2 features × 10 instructions

# Assumed tokens (prompt, reply) of one call of each kind with gpt-4o-mini on LIMA references: the prompts are our
# templates with a LIMA pair (~450 words) in them; the replies are the sizes the paper's prompts ask for.
ASSUMED = {
    "instruction feedback": (750, 120),
    "response feedback": (750, 150),
    "synthesis (10 instructions)": (400, 450),
    "draft response": (800, 500),
    "improvement": (1400, 900),
}


def calls_per_kind(pairs: int) -> dict[str, int]:
    refs = -(-pairs // PAIRS_PER_REFERENCE)
    return {"instruction feedback": refs, "response feedback": refs, "synthesis (10 instructions)": 2 * refs,
            "draft response": pairs, "improvement": pairs}


def projected(pairs: int) -> dict[str, Any]:
    calls = calls_per_kind(pairs)
    tokens_in = sum(n * ASSUMED[k][0] for k, n in calls.items())
    tokens_out = sum(n * ASSUMED[k][1] for k, n in calls.items())
    online = (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6
    return {"calls": sum(calls.values()), "tokens_in": tokens_in, "tokens_out": tokens_out, "online_usd": online,
            "batch_usd": online / 2, "batches": 4}


# ----------------------------------------------------------------------------- the mock's teacher


def _words(n: int, what: str) -> str:
    return " ".join([what] * n)


def _after(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].lstrip("\n").split("\n", 1)[0]


def teacher(body: dict[str, Any]) -> str:
    """Replies of about the assumed sizes (in words, which the mock counts as tokens), routed by the rendered prompt."""
    first = next(m["content"] for m in body["messages"] if m["role"] == "user")
    if "# Reference pair (JSON)" in first:
        return json.dumps({"subject_areas": _words(60, "topic"), "relevant_skills": _words(58, "skill")})
    if "# Pair (JSON)" in first:
        return json.dumps({"response_feedback": _words(148, "advice")})
    if "# Reference instruction (JSON string)" in first:
        n = int(re.search(r"Write (\d+) new instructions", first)[1])  # type: ignore[index]
        tag = body.get("seed", 0)
        return json.dumps({"instructions": [f"Instruction {i} ({tag}): " + _words(42, "detail") for i in range(n)]})
    if "# Response to improve (JSON string)" in first:
        return json.dumps({
            "analysis": {"original_strengths": [_words(40, "strength")], "improvement_opportunities": [_words(40, "gap")],
                         "relevant_feedback": [_words(40, "point")]},
            "implementation_strategy": {"planned_changes": [_words(40, "change")], "rationale": _words(40, "because")},
            "improved_response": _words(690, "better"),
        })
    return _words(500, "answer")


# ----------------------------------------------------------------------------- running


def recipe(url: str, pairs: int, refs: Path, batch: bool) -> dict[str, Any]:
    teacher_model = {"backend": "openai", "model": "gpt-4o-mini", "base_url": url, "api_key_env": None, "max_concurrency": 64,
                     "temperature": 1.0, "max_tokens": 4096, "price_per_mtok_in": PRICE_IN, "price_per_mtok_out": PRICE_OUT,
                     "max_retries": 2}
    if batch:
        teacher_model.update(batch=True, batch_poll_s=2.0, batch_poll_max_s=5.0)
    return {"name": "bench-batch", "seed": 0, "budget_pairs": pairs, "input": str(refs), "models": {"teacher": teacher_model},
            "stages": [{"type": "refed.references", "pairs_per_reference": PAIRS_PER_REFERENCE},
                       {"type": "refed.feedback", "concurrency": 64},
                       {"type": "refed.synthesize", "per_feature": 10, "concurrency": 64},
                       {"type": "refed.respond", "concurrency": 64},
                       {"type": "refed.improve", "concurrency": 64},
                       {"type": "select"}]}


def run(tmp: Path, name: str, data: dict[str, Any]) -> dict[str, Any]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp / name
    env = {**os.environ, "DATATAILOR_CACHE_DIR": str(tmp / f"cache-{name}")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "run", str(path), "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, rusage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} run failed:\n{stderr[-2000:]}")
    usage = json.loads((out / "usage.json").read_text())["total"]["all"]
    records = sum(1 for _ in (out / "data.jsonl").open())
    return {"records": records, "requests": usage["requests"], "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "usd": usage["cost_usd"], "seconds": seconds,
            "peak_rss_mb": rusage.ru_maxrss / 1024, "out": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=60.0, help="seconds the mock takes per batch (default 60)")
    args = parser.parse_args()
    if not LIMA.is_file():
        print(f"LIMA train not found at {LIMA}", file=sys.stderr)
        return 2
    from datatailor.testing import MockConfig, MockServerProcess

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    p = projected(args.pairs)
    print(f"REFED, {args.pairs:,} pairs, gpt-4o-mini (${PRICE_IN}/${PRICE_OUT} per M tokens; batch half)")
    print(f"projected: {p['calls']:,} calls, {p['tokens_in'] / 1e6:.1f}M prompt + {p['tokens_out'] / 1e6:.1f}M completion tokens: "
          f"online ${p['online_usd']:.2f}, batched ${p['batch_usd']:.2f}, {p['batches']} batches "
          f"(one per calling stage: feedback, synthesis, drafts, improvements)")
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as d:
        tmp = Path(d)
        rows = {}
        with MockServerProcess(MockConfig(handler="bench_batch:teacher", batch_delay_s=args.delay, model="gpt-4o-mini")) as mock:
            rows["batched"] = run(tmp, "batched", recipe(mock.url, args.pairs, LIMA, batch=True))
            stats = mock.stats()
            rows["online"] = run(tmp, "online", recipe(mock.url, args.pairs, LIMA, batch=False))
        journal = [json.loads(line) for line in (rows["batched"]["out"] / "batches" / "journal.jsonl").read_text().splitlines()]
        sizes = [len(r["requests"]) for r in journal if r["event"] == "planned"]
        same = _strip(rows["batched"]["out"] / "data.jsonl") == _strip(rows["online"]["out"] / "data.jsonl")
    print(f"batches: {stats.get('batches_created', 0)} created ({', '.join(f'{n:,}' for n in sizes)} requests), "
          f"{stats.get('batch_lines', 0):,} lines, {stats.get('batch_answered_again', 0)} answered twice; "
          f"mock delay {args.delay:g} s per batch")
    for name, r in rows.items():
        print(f"{name:8s} {r['records']:,} pairs, {r['requests']:,} requests, {r['prompt_tokens'] / 1e6:.2f}M + "
              f"{r['completion_tokens'] / 1e6:.2f}M tokens, ${r['usd']:.2f}, {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"measured batched / online cost: {rows['batched']['usd'] / rows['online']['usd']:.3f}; "
          f"same records (lineage's batch ids and $ aside): {same}")
    return 0


def _strip(path: Path) -> list[Any]:
    rows = [json.loads(line) for line in path.open()]
    for r in rows:
        for e in r["lineage"]:
            e["details"].pop("batch_id", None)
            e["cost_usd"] = 0.0
    return rows


if __name__ == "__main__":
    sys.exit(main())
