"""Sampled-score vs logprob (expected-score) judging with the small local judge.

On the first N Vicuna-80 questions, the strong model (local:qwen2.5-coder-0.5b-instruct) and the target
(local:gemma-3-270m, chat format gemma) answer each question (llama.cpp, in-process); then the Qwen judge
scores each (strong, target) pair in both orders, once per scoring mode:

* sampled  the two numbers the judge writes (temperature 0, as the papers' judges);
* logprob  the expectation over the score tokens, from the top-20 logprobs (scoring/logprob.py).

Printed per mode: position consistency (share of items whose two orders give the same verdict), the
strict-rule verdicts (strong wins / ties / target wins), the mean score gap, failures, and wall time;
and the modes' agreement (share of items where both give the same strict-rule verdict).

The request cache is fresh (a temporary folder) unless --cache-dir is given, so the times are cold.

    python benchmarks/bench_judge_modes.py            # N = 40: about 20-30 minutes on 2 cores
    python benchmarks/bench_judge_modes.py --n 3      # a quick check, about 1-2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.errors import RecordFailure
from datatailor.evaluate.testsets import resolve_testset
from datatailor.llm.cache import RequestCache
from datatailor.llm.config import LlamaCppModel
from datatailor.llm.models import ModelPool
from datatailor.llm.usage import UsageLedger
from datatailor.scoring.judge import SCORES_ONLY, EXPLAINED, PairwiseScores, judge_pair

STRONG = "local:qwen2.5-coder-0.5b-instruct"
TARGET = "local:gemma-3-270m"
MODES = ("sampled", "logprob")


async def answer_all(pool: ModelPool, questions: list[str], max_tokens: int) -> tuple[list[str], list[str], float]:
    start = time.perf_counter()

    async def one(role: str, i: int, q: str) -> str:
        gen = await pool.role(role).generate("respond.j2", {"instruction": q, "input": ""}, seed_key=("answer", i),
                                             max_tokens=max_tokens)
        return gen.text.strip()

    strong, target = await asyncio.gather(
        asyncio.gather(*(one("strong", i, q) for i, q in enumerate(questions))),
        asyncio.gather(*(one("target", i, q) for i, q in enumerate(questions))),
    )
    return list(strong), list(target), time.perf_counter() - start


async def judge_all(pool: ModelPool, questions: list[str], strong: list[str], target: list[str], mode: str,
                    template: str, max_tokens: int) -> tuple[list[PairwiseScores | None], list[str], float]:
    start = time.perf_counter()
    failures: list[str] = []

    async def one(i: int) -> PairwiseScores | None:
        try:
            scores, _ = await judge_pair(pool.role("judge"), questions[i], strong[i], target[i], template=template,
                                         seed_key=("judge", i), mode=mode, temperature=0.0,  # type: ignore[arg-type]
                                         max_tokens=max_tokens)
            return scores
        except RecordFailure as exc:
            failures.append(f"item {i}: {exc}")
            return None

    results = await asyncio.gather(*(one(i) for i in range(len(questions))))
    return list(results), failures, time.perf_counter() - start


def summarise(scores: list[PairwiseScores | None]) -> dict[str, Any]:
    done = [s for s in scores if s is not None]
    verdicts = Counter(s.verdict("strict") for s in done)
    n = len(done)
    return {
        "judged": n,
        "position_consistency": round(sum(s.position_consistent for s in done) / n, 3) if n else None,
        "strict": {"strong_wins": verdicts["a"], "ties": verdicts["tie"], "target_wins": verdicts["b"]},
        "mean_gap": round(sum(s.gap for s in done) / n, 3) if n else None,
    }


async def main_async(opts: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    testset = resolve_testset("vicuna80")
    questions = [r.instruction + (f"\n\n{r.input}" if r.input else "") for r in testset.records[: opts.n]]
    qwen = dict(model=STRONG, n_ctx=opts.n_ctx, n_threads=opts.n_threads)
    configs = {
        "strong": LlamaCppModel(**qwen, temperature=0.0),
        "target": LlamaCppModel(model=TARGET, chat_format="gemma", n_ctx=opts.n_ctx, n_threads=opts.n_threads,
                                temperature=0.0),
        "judge": LlamaCppModel(**qwen, temperature=0.0),  # same backend settings as strong: one Llama object
    }
    pool = ModelPool(configs, UsageLedger(), RequestCache(cache_dir / "requests.sqlite"))
    template = EXPLAINED if opts.explained else SCORES_ONLY
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load": " ".join(f"{x:.1f}" for x in os.getloadavg())},
        "items": len(questions), "template": template, "answer_max_tokens": opts.max_tokens,
    }
    try:
        strong, target, answer_s = await answer_all(pool, questions, opts.max_tokens)
        results["answer_wall_s"] = round(answer_s, 1)
        by_mode: dict[str, list[PairwiseScores | None]] = {}
        for mode in MODES:
            scores, failures, wall = await judge_all(pool, questions, strong, target, mode, template, opts.judge_max_tokens)
            by_mode[mode] = scores
            results[mode] = {**summarise(scores), "failures": failures, "wall_s": round(wall, 1)}
        both = [(a, b) for a, b in zip(by_mode["sampled"], by_mode["logprob"]) if a is not None and b is not None]
        results["agreement_strict"] = round(sum(a.verdict("strict") == b.verdict("strict") for a, b in both) / len(both), 3) if both else None
        if opts.show:
            results["per_item"] = [
                {"sampled": a.summary("strict") if a else None, "logprob": b.summary("strict") if b else None}
                for a, b in zip(by_mode["sampled"], by_mode["logprob"])
            ]
    finally:
        await pool.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="Vicuna-80 questions (default 40).")
    parser.add_argument("--max-tokens", type=int, default=128, help="Cap on each answer (default 128).")
    parser.add_argument("--judge-max-tokens", type=int, default=16, help="Cap on each judge reply (default 16).")
    parser.add_argument("--explained", action="store_true", help="Judge with the explained template (scores, then reasons).")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="Request cache folder (default: a fresh temporary one).")
    parser.add_argument("--show", action="store_true", help="Also print every item's scores in both modes.")
    opts = parser.parse_args()
    temporary = opts.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-judge-modes-")) if temporary else opts.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["DATATAILOR_CACHE_DIR"] = str(cache_dir)
    start = time.perf_counter()
    try:
        results = asyncio.run(main_async(opts, cache_dir))
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))
    print()
    print("| mode | position consistency | strict: strong / tie / target | mean gap | failures | judge wall s |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        r = results[mode]
        s = r["strict"]
        print(f"| {mode} | {r['position_consistency']} | {s['strong_wins']} / {s['ties']} / {s['target_wins']} "
              f"| {r['mean_gap']} | {len(r['failures'])} | {r['wall_s']} |")
    print(f"agreement of the modes (strict verdict): {results['agreement_strict']}; "
          f"answers {results['answer_wall_s']} s; total {results['total_wall_s']} s")


if __name__ == "__main__":
    main()
