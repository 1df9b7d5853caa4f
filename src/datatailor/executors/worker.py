"""What runs inside Ray: a map stage's actor, the dedup signature task, and the spend tally.

A `StageWorker` builds the stage and its models once. For each shard (a file of pending records written by
the driver) it processes the records with the stage's share of concurrency and appends each result, as it
finishes, to its own part files in the stage folder (`parts/<writer>.outputs.jsonl`, `.failures.jsonl`):
one writer per file, flushed per row, so a killed worker loses only what was in flight and its torn last
line is cut off when the driver merges. Ray may run a shard twice (it retries the tasks of a dead actor);
the driver keeps one row per input id. Its usage goes to `usage/<writer>.json` after every shard.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from datatailor.errors import RunAbort, UserError
from datatailor.io import write_json
from datatailor.journal import append_row
from datatailor.llm.cache import RequestCache
from datatailor.llm.models import ModelPool
from datatailor.llm.usage import UsageLedger
from datatailor.recipe import Recipe
from datatailor.records import Record

PARTS = "parts"
USAGE = "usage"
SHARDS = "shards"


def writer_name() -> str:
    """Unique per worker process and incarnation: host, pid (what a test kills) and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SpendTally:
    """A Ray actor (no CPU) holding each worker's spending in this invocation, so every worker's budget check
    sees the others' (refreshed every `SYNC_S`; the overshoot is bounded by the calls started in between)."""

    def __init__(self) -> None:
        self.spent: dict[str, tuple[float, int]] = {}

    def report(self, writer: str, usd: float, tokens: int) -> tuple[float, int]:
        self.spent[writer] = (usd, tokens)
        others = [v for k, v in self.spent.items() if k != writer]
        return sum(u for u, _ in others), sum(t for _, t in others)


SYNC_S = 0.5


class StageWorker:
    """Ray Data calls an instance once per batch of shard paths (batch_size 1)."""

    def __init__(self, recipe: Recipe, out: str, index: int, workers: int, previous: dict[str, Any],
                 cache_path: str | None, per_writer_cache: bool, tally: Any = None):
        from datatailor.runner import build_stage

        self.writer = writer_name()
        self.loop = asyncio.new_event_loop()
        self.stage = build_stage(recipe, Path(out), index)
        self.ledger = UsageLedger(UsageLedger.previous_from_json(previous), recipe.budget,
                                  UsageLedger.previous_stages_from_json(previous))
        self.cache = None if cache_path is None else RequestCache(cache_path, writer=self.writer if per_writer_cache else None)
        # the model's concurrency limit is for the whole run: each of the workers takes its share
        configs = {name: cfg.model_copy(update={"max_concurrency": max(1, cfg.max_concurrency // workers)})
                   for name, cfg in recipe.models.items()}
        self.pool = ModelPool(configs, self.ledger, self.cache, recipe.base_dir, seed=recipe.seed)
        self.stage.ctx.models = self.pool
        self.concurrency = max(1, self.stage.config.concurrency // workers)
        folder = self.stage.ctx.artifacts_dir
        (folder / PARTS).mkdir(parents=True, exist_ok=True)
        (folder / USAGE).mkdir(parents=True, exist_ok=True)
        self.usage_path = folder / USAGE / f"{self.writer}.json"
        self.out_fh = (folder / PARTS / f"{self.writer}.outputs.jsonl").open("a", encoding="utf-8")
        self.fail_fh = (folder / PARTS / f"{self.writer}.failures.jsonl").open("a", encoding="utf-8")
        self.tally = tally if recipe.budget is not None and (recipe.budget.max_usd or recipe.budget.max_tokens) else None
        self._synced = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [self.loop.run_until_complete(self._shard(Path(str(p)))) for p in batch["shard"]]
        return {key: [r[key] for r in rows] for key in ("shard", "done", "failed", "abort", "status")}

    def _sync_budget(self, force: bool = False) -> None:
        if self.tally is None or (not force and time.monotonic() - self._synced < SYNC_S):
            return
        import ray

        usd, tokens = self.ledger.run_spent()
        self.ledger.elsewhere = ray.get(self.tally.report.remote(self.writer, usd, tokens))
        self._synced = time.monotonic()

    async def _shard(self, path: Path) -> dict[str, Any]:
        from datatailor.runner import process_record

        with path.open(encoding="utf-8") as fh:
            records = [Record.model_validate_json(line) for line in fh]
        semaphore = asyncio.Semaphore(self.concurrency)
        counts = {"done": 0, "failed": 0}
        stop: list[BaseException] = []
        self._sync_budget(force=True)

        async def one(record: Record) -> None:
            async with semaphore:
                if stop:
                    return
                try:
                    self._sync_budget()
                    outputs, failure, _ = await process_record(self.stage, record)
                except (RunAbort, UserError) as exc:
                    stop.append(exc)
                    return
                if failure is None:
                    append_row(self.out_fh, {"src": record.id, "records": [r.model_dump(mode="json") for r in outputs]})
                else:
                    append_row(self.fail_fh, failure)
                    counts["failed"] += 1
                counts["done"] += 1

        try:
            await asyncio.gather(*(one(r) for r in records))
        finally:
            write_json(self.usage_path, self.ledger.as_json()["run"])
        abort = stop[0] if stop else None
        return {"shard": str(path), **counts, "abort": str(abort) if abort else "",
                "status": getattr(abort, "status", "interrupted") if abort else ""}


def sign_shard(batch: dict[str, np.ndarray], compare: str, near: bool, num_perm: int, shingle_words: int) -> dict[str, list[Any]]:
    """The per-record part of `dedup`, as a Ray task: each shard's exact keys and MinHash signatures, saved
    beside the shard (`<shard>.npz`) for the driver to read back in input order."""
    from datatailor.scoring.dedup import Signer, exact_key
    from datatailor.stages.select import dedup_text

    signer = Signer(num_perm, shingle_words) if near else None
    done = []
    for p in batch["shard"]:
        path = Path(str(p))
        keys, sigs = [], []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                text = dedup_text(Record.model_validate_json(line), compare)
                keys.append(exact_key(text))
                if signer is not None:
                    sigs.append(signer(text))
        target = path.with_suffix(".npz")
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys, dtype="S16"), signatures=np.stack(sigs) if sigs else np.empty((0, num_perm), np.uint32))
        os.replace(tmp, target)
        done.append(str(target))
    return {"signed": done}
