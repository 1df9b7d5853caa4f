"""Speed of the embedded local models on this machine.

Prints, for the packaged models of DESIGN.md:

* assembly: seconds to concatenate + SHA-256-verify each GGUF (into a fresh temporary folder), and the
  cheap re-check afterwards (size + mtime stamp, no hashing);
* llamacpp (Qwen2.5-Coder-0.5B-Instruct): load time, generation tokens/s (free text) and tokens/s with
  a JSON-schema grammar;
* hf (Gemma-3-270M through transformers): GGUF → fp32 conversion time (into a fresh temporary folder;
  skip with --no-conversion), load time of the cached conversion, generation tokens/s with one
  request and with a batch of 4 concurrent requests, and log-likelihood scoring time.

    python benchmarks/bench_local_models.py                  # about 3-5 minutes on 2 cores
    python benchmarks/bench_local_models.py --no-conversion  # reuse the cached conversion
    python benchmarks/bench_local_models.py --only llamacpp --n-threads 1

Timings depend on what else runs on the machine: the script prints the load average beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

from datatailor.llm.base import CompletionRequest, Message, Sampling
from datatailor.llm.config import HFModel, LlamaCppModel
from datatailor.llm.local_models import LOCAL_MODELS, prepare_local_model

QWEN = "local:qwen2.5-coder-0.5b-instruct"
GEMMA = "local:gemma-3-270m"
PROMPTS = [
    "Explain what a hash table is.",
    "Write a haiku about autumn leaves.",
    "Give three tips for writing clear emails.",
    "Describe how a bicycle gear works.",
]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _request(prompt: str, max_tokens: int, seed: int, schema: dict | None = None) -> CompletionRequest:
    return CompletionRequest(
        messages=[Message(role="user", content=prompt)],
        sampling=Sampling(max_tokens=max_tokens, temperature=0.7, seed=seed),
        json_schema=schema,
    )


def bench_assembly() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name in LOCAL_MODELS:
            report = prepare_local_model(name, folder=Path(folder))
            start = time.perf_counter()
            prepare_local_model(name, folder=Path(folder))
            recheck_ms = (time.perf_counter() - start) * 1000
            size = report.path.stat().st_size / 2**20
            print(f"assembly  local:{name}: {report.seconds:.1f} s for {size:.0f} MiB (concatenate + sha256); re-check {recheck_ms:.2f} ms")


async def bench_llamacpp(max_tokens: int, n_threads: int | None) -> None:
    from datatailor.llm.llamacpp import LlamaCppBackend

    prepare_local_model(QWEN)  # assembly is measured above; keep it out of the load time
    backend = LlamaCppBackend(LlamaCppModel(model=QWEN, n_ctx=2048, n_threads=n_threads))
    await backend.complete(_request("Hi", 1, 0))
    print(f"llamacpp  {QWEN}: load {backend.load_seconds:.2f} s (n_threads={n_threads or os.cpu_count()})")
    tokens, start = 0, time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        tokens += (await backend.complete(_request(prompt, max_tokens, i))).completion_tokens
    elapsed = time.perf_counter() - start
    print(f"llamacpp  free text: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tokens/s (incl. prompt processing)")
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "points": {"type": "array", "items": {"type": "string"}}},
        "required": ["title", "points"],
    }
    tokens, start = 0, time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        tokens += (await backend.complete(_request(prompt + " Reply as JSON.", max_tokens, i, schema))).completion_tokens
    elapsed = time.perf_counter() - start
    print(f"llamacpp  JSON schema: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tokens/s")
    await backend.aclose()


async def bench_hf(max_tokens: int, conversion: bool) -> None:
    from datatailor.llm import hf

    prepare_local_model(GEMMA)
    if conversion:
        with tempfile.TemporaryDirectory() as folder:
            target = Path(folder) / "converted"
            seconds = hf._convert_gguf(prepare_local_model(GEMMA).path, target)
            print(f"hf        {GEMMA}: GGUF -> fp32 conversion + save_pretrained {seconds:.1f} s (first use only)")
    hf.model_source(GEMMA)  # make sure the cached conversion exists before timing the load
    backend = hf.HFBackend(HFModel(model=GEMMA, batch_size=4, device="cpu"))
    await backend.complete(_request("Hi", 1, 0))
    print(f"hf        {GEMMA}: load of the cached conversion {backend.load_seconds:.1f} s")
    tokens, start = 0, time.perf_counter()
    for i, prompt in enumerate(PROMPTS[:2]):
        tokens += (await backend.complete(_request(prompt, max_tokens, i))).completion_tokens
    elapsed = time.perf_counter() - start
    print(f"hf        batch 1: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tokens/s")
    start = time.perf_counter()
    results = await asyncio.gather(*(backend.complete(_request(p, max_tokens, i)) for i, p in enumerate(PROMPTS)))
    elapsed = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    print(f"hf        batch {backend.batch_sizes[-1]}: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tokens/s")
    question = [Message(role="user", content=PROMPTS[0])]
    answer = results[0].text or "A hash table maps keys to values."
    start = time.perf_counter()
    scored = await backend.loglikelihood(question, answer)
    print(f"hf        loglikelihood: {len(scored.logprobs)} response tokens scored in {time.perf_counter() - start:.2f} s")
    await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-conversion", action="store_true", help="Do not time a fresh GGUF conversion.")
    parser.add_argument("--n-threads", type=int, default=None, help="llama.cpp threads (default: all CPUs).")
    parser.add_argument("--only", choices=["assembly", "llamacpp", "hf"], default=None, help="Run one part only.")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, load average {_load()}")
    if args.only in (None, "assembly"):
        bench_assembly()
    if args.only in (None, "llamacpp"):
        asyncio.run(bench_llamacpp(args.max_tokens, args.n_threads))
    if args.only in (None, "hf"):
        asyncio.run(bench_hf(args.max_tokens, not args.no_conversion))
    print(f"load average at the end: {_load()}")


if __name__ == "__main__":
    main()
