"""Throughput and CPU cost of the `openai` backend, side by side with the plain `openai` client.

A mock OpenAI-compatible server (in a child process, so its CPU is not counted) answers every request
after a fixed latency L and accepts at most C requests in flight. With C requests in flight the best
any client can do is C / L requests per second: the ceiling.

(a) datatailor: `RoleModel.generate` (the facade stages call) over `OpenAIBackend`, cache disabled;
(b) the plain `openai.AsyncOpenAI` client at the same concurrency, in the same run;
    rounds alternate (a, b, a, b, ...) so a noisy neighbour hurts both alike; the best round counts;
(c) CPU time per request of each client: a second mock with zero latency, process CPU time
    (`time.process_time`) of this process divided by the requests.

    python benchmarks/bench_openai_throughput.py                # defaults finish in well under a minute
    python benchmarks/bench_openai_throughput.py --latency 0.1 --concurrency 64 --requests 6000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from datatailor.llm.base import Message
from datatailor.llm.config import OpenAIModel
from datatailor.llm.models import RoleModel
from datatailor.llm.openai import OpenAIBackend
from datatailor.llm.usage import UsageLedger
from datatailor.testing import MockConfig, MockServerProcess

MAX_TOKENS = 32


@dataclass
class Measurement:
    requests: int
    wall_s: float
    cpu_s: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.requests


async def drive(call: Callable[[int], Awaitable[str]], n: int, concurrency: int, offset: int = 0) -> Measurement:
    """`concurrency` workers issue `n` calls between them; each reply is checked."""
    next_index = offset
    errors = 0

    async def worker() -> None:
        nonlocal next_index, errors
        while next_index < offset + n:
            i = next_index
            next_index += 1
            text = await call(i)
            if f"request {i} " not in text:
                errors += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Measurement(n, time.perf_counter() - wall, time.process_time() - cpu, errors)


class DatatailorClient:
    def __init__(self, url: str, concurrency: int):
        config = OpenAIModel(model="mock-model", base_url=url, api_key_env=None, max_concurrency=concurrency,
                             max_tokens=MAX_TOKENS, temperature=0.0)
        self.backend = OpenAIBackend(config)
        self.role = RoleModel("bench", config, self.backend, cache=None, ledger=UsageLedger())

    async def call(self, i: int) -> str:
        gen = await self.role.generate(messages=[Message(role="user", content=f"Answer request {i} briefly.")])
        return gen.text

    async def aclose(self) -> None:
        await self.backend.aclose()


class PlainOpenAIClient:
    def __init__(self, url: str, concurrency: int):
        import openai

        self.client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        self.semaphore = asyncio.Semaphore(concurrency)

    async def call(self, i: int) -> str:
        async with self.semaphore:
            reply = await self.client.chat.completions.create(
                model="mock-model",
                messages=[{"role": "user", "content": f"Answer request {i} briefly."}],
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                seed=0,
            )
        return reply.choices[0].message.content or ""

    async def aclose(self) -> None:
        await self.client.close()


async def measure(kind: str, url: str, concurrency: int, n: int, warmup: int, offset: int) -> tuple[Measurement, dict]:
    client = DatatailorClient(url, concurrency) if kind == "datatailor" else PlainOpenAIClient(url, concurrency)
    try:
        await drive(client.call, warmup, concurrency, offset=10_000_000 + offset)  # open the connections
        result = await drive(client.call, n, concurrency, offset=offset)
        stats = client.backend.stats_snapshot() if isinstance(client, DatatailorClient) else {}
    finally:
        await client.aclose()
    return result, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2, help="mock latency L in seconds (default 0.2)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight C (default 32)")
    parser.add_argument("--requests", type=int, default=960, help="requests per measured round (default 960)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per client (default 2)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--cpu-requests", type=int, default=1000, help="requests for the CPU-per-request figure")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    L, C = args.latency, args.concurrency
    ceiling = C / L
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU(s); mock server in a child process")
    print(f"(a)/(b) throughput: latency L={L:g} s, concurrency C={C}, ceiling C/L = {ceiling:.0f} req/s, "
          f"{args.requests} requests x {args.rounds} round(s) per client")
    figures: dict = {"latency_s": L, "concurrency": C, "ceiling_rps": ceiling, "rounds": {"datatailor": [], "openai": []}}
    with MockServerProcess(MockConfig(latency_s=L, max_inflight=C)) as server:
        for r in range(args.rounds):
            for kind in ("datatailor", "openai"):
                m, stats = asyncio.run(measure(kind, server.url, C, args.requests, args.warmup, offset=r * args.requests))
                figures["rounds"][kind].append({"rps": m.rps, "errors": m.errors, **({"backend": stats} if stats else {})})
                extra = f"  backend: {json.dumps(stats)}" if stats else ""
                print(f"  round {r + 1} {kind:<10} {m.rps:8.1f} req/s  {100 * m.rps / ceiling:5.1f}% of ceiling  errors={m.errors}{extra}")
        server_stats = server.stats()
    best = {k: max(x["rps"] for x in v) for k, v in figures["rounds"].items()}
    median = {k: statistics.median(x["rps"] for x in v) for k, v in figures["rounds"].items()}
    figures.update(best_rps=best, median_rps=median, server=server_stats)
    print(f"  server: {server_stats}")
    for k in ("datatailor", "openai"):
        print(f"  best {k:<10} {best[k]:8.1f} req/s = {100 * best[k] / ceiling:5.1f}% of ceiling (median {median[k]:.1f})")
    print(f"  datatailor / plain openai = {best['datatailor'] / best['openai']:.2f}x")

    print(f"(c) CPU per request: zero-latency mock, C={C}, {args.cpu_requests} requests per client")
    cpu: dict = {}
    with MockServerProcess(MockConfig(latency_s=0.0)) as server:
        for kind in ("datatailor", "openai"):
            m, _ = asyncio.run(measure(kind, server.url, C, args.cpu_requests, args.warmup, offset=0))
            cpu[kind] = {"cpu_us_per_request": m.cpu_us_per_request, "rps": m.rps, "errors": m.errors}
            print(f"  {kind:<10} {m.cpu_us_per_request:7.0f} us CPU/request  ({m.rps:7.1f} req/s unthrottled, errors={m.errors})")
    figures["cpu"] = cpu
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
    errors = sum(x["errors"] for v in figures["rounds"].values() for x in v) + sum(v["errors"] for v in cpu.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
