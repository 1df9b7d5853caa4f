"""What runs inside Ray: a map stage's actor, the dedup signature task, and the spend tally.

A `StageWorker` builds the stage and its models once. For each shard (an object of pending records the driver
wrote to the run's store) it processes the records with the stage's share of concurrency and appends each
result, as it finishes, to its own part files (`stages/NN-name/parts/<writer>.outputs.jsonl`, `.failures.jsonl`)
and each model call to its own spend log (`usage/<invocation>.<writer>.jsonl`): one writer per file, flushed
per row. With --out on a shared disk those files are in the run directory itself. With --out in an object store
they are in the worker's local spool and reach the store as write-once segments every `flush_records` records
or `flush_s` seconds and at the end of each shard (`executors.spool`): no worker reads or writes the driver's
folder. Ray may run a shard twice (it retries the tasks of a dead actor): a worker claims each shard it starts
(`stages/NN-name/claims/<shard>/<writer>`) and skips the records an earlier claimant finished and uploaded; the
driver keeps one row per input id whatever happens.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from datatailor.errors import RunAbort, UserError
from datatailor.journal import append_row
from datatailor.llm.cache import RequestCache
from datatailor.llm.models import ModelPool
from datatailor.llm.spend_log import SpendLog, log_name, writer_name
from datatailor.llm.usage import UsageLedger
from datatailor.recipe import Recipe
from datatailor.records import Record
from datatailor.storage import JournalPusher, RunStore, iter_journal_rows

PARTS = "parts"
SHARDS = "shards"
CLAIMS = "claims"

__all__ = ["CLAIMS", "PARTS", "SHARDS", "SpendTally", "StageWorker", "sign_shard", "writer_name"]


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
    """Ray Data calls an instance once per batch of shard names (batch_size 1)."""

    def __init__(self, recipe: Recipe, location: str, index: int, workers: int, previous: dict[str, Any],
                 cache_path: str | None, per_writer_cache: bool, invocation: str, tally: Any = None,
                 flush_records: int = 256, flush_s: float = 5.0):
        from datatailor.executors.spool import adopt_orphans, spool_dir
        from datatailor.runner import build_stage, stage_dir

        self.writer = writer_name()
        self.loop = asyncio.new_event_loop()
        self.store = RunStore(location)
        # Records a killed worker of this run finished on this machine but had not uploaded: adopted, not redone.
        self.finished_elsewhere: set[str] = set()
        if self.store.remote:
            adopt_orphans(self.store, location, keep=lambda row: self.finished_elsewhere.add(row.get("src") or row.get("id")))
        root = spool_dir(location) if self.store.remote else Path(location)
        self.stage = build_stage(recipe, root, index)
        self.ledger = UsageLedger(UsageLedger.previous_from_json(previous), recipe.budget,
                                  UsageLedger.previous_stages_from_json(previous))
        self.ledger.log = SpendLog(root / log_name(invocation, self.writer))
        self.cache = None if cache_path is None else RequestCache(cache_path, writer=self.writer if per_writer_cache else None)
        # the model's concurrency limit is for the whole run: each of the workers takes its share
        configs = {name: cfg.model_copy(update={"max_concurrency": max(1, cfg.max_concurrency // workers)})
                   for name, cfg in recipe.models.items()}
        self.pool = ModelPool(configs, self.ledger, self.cache, recipe.base_dir, seed=recipe.seed)
        self.stage.ctx.models = self.pool
        self.concurrency = max(1, self.stage.config.concurrency // workers)
        self.stage_rel = stage_dir(recipe, Path(""), index).as_posix()
        parts = f"{self.stage_rel}/{PARTS}/{self.writer}"
        (root / parts).parent.mkdir(parents=True, exist_ok=True)
        self.out_fh = (root / f"{parts}.outputs.jsonl").open("a", encoding="utf-8")
        self.fail_fh = (root / f"{parts}.failures.jsonl").open("a", encoding="utf-8")
        self.pushers = [JournalPusher(self.store, root / rel, rel)
                        for rel in (f"{parts}.outputs.jsonl", f"{parts}.failures.jsonl", log_name(invocation, self.writer))
                        ] if self.store.remote else []
        self.flush_records, self.flush_s = flush_records, flush_s
        self._unsent, self._sent_at = 0, time.monotonic()
        self._push_lock = threading.Lock()
        self.tally = tally if recipe.budget is not None and (recipe.budget.max_usd or recipe.budget.max_tokens) else None
        self._synced = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [self.loop.run_until_complete(self._shard(str(p))) for p in batch["shard"]]
        return {key: [r[key] for r in rows] for key in ("shard", "done", "failed", "skipped", "rerun", "abort", "status")}

    def _sync_budget(self, force: bool = False) -> None:
        if self.tally is None or (not force and time.monotonic() - self._synced < SYNC_S):
            return
        import ray

        usd, tokens = self.ledger.run_spent()
        self.ledger.elsewhere = ray.get(self.tally.report.remote(self.writer, usd, tokens))
        self._synced = time.monotonic()

    def _claim(self, shard: str) -> bool:
        """Mark the shard as this worker's; when another worker had it (Ray runs a dead worker's shard again),
        skip the records that worker finished and uploaded, so they are not asked for again. True for such a rerun."""
        folder = f"{self.stage_rel}/{CLAIMS}/{shard.rsplit('/', 1)[-1].removesuffix('.jsonl')}"
        earlier = {n.rsplit("/", 1)[-1] for n in self.store.list(folder)} - {self.writer}
        self.store.write_bytes(f"{folder}/{self.writer}", b"")
        for writer in sorted(earlier):
            for kind, key in (("outputs", "src"), ("failures", "id")):
                for row in iter_journal_rows(self.store, f"{self.stage_rel}/{PARTS}/{writer}.{kind}.jsonl"):
                    self.finished_elsewhere.add(row[key])
        return bool(earlier)

    def push(self) -> None:
        """Upload what the part files and the spend log gained since the last push (object store only)."""
        with self._push_lock:
            for pusher in self.pushers:
                pusher.push()
            self._unsent, self._sent_at = 0, time.monotonic()

    async def _maybe_push(self) -> None:
        if self.pushers and (self._unsent >= self.flush_records or time.monotonic() - self._sent_at >= self.flush_s):
            self._unsent = 0
            await asyncio.to_thread(self.push)

    async def _shard(self, name: str) -> dict[str, Any]:
        from datatailor.runner import process_record

        data = self.store.read_bytes(name)
        if data is None:
            raise RuntimeError(f"shard {name} is missing from {self.store.root}")
        records = [Record.model_validate_json(line) for line in data.splitlines() if line.strip()]
        rerun = self._claim(name)
        semaphore = asyncio.Semaphore(self.concurrency)
        counts = {"done": 0, "failed": 0, "skipped": 0}
        stop: list[BaseException] = []
        self._sync_budget(force=True)

        async def one(record: Record) -> None:
            async with semaphore:
                if stop:
                    return
                if record.id in self.finished_elsewhere:
                    counts["skipped"] += 1
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
                self._unsent += 1
                await self._maybe_push()

        try:
            await asyncio.gather(*(one(r) for r in records))
        finally:
            if self.pushers:
                await asyncio.to_thread(self.push)
        abort = stop[0] if stop else None
        return {"shard": name, **counts, "rerun": rerun, "abort": str(abort) if abort else "",
                "status": getattr(abort, "status", "interrupted") if abort else ""}


def sign_shard(batch: dict[str, np.ndarray], location: str, compare: str, near: bool, num_perm: int,
               shingle_words: int) -> dict[str, list[Any]]:
    """The per-record part of `dedup`, as a Ray task: each shard's exact keys and MinHash signatures, saved
    beside the shard (`<shard>.npz`) for the driver to read back in input order."""
    from datatailor.scoring.dedup import Signer, exact_key
    from datatailor.stages.select import dedup_text

    store = RunStore(location)
    signer = Signer(num_perm, shingle_words) if near else None
    done = []
    for p in batch["shard"]:
        name = str(p)
        keys, sigs = [], []
        for line in (store.read_bytes(name) or b"").splitlines():
            if not line.strip():
                continue
            text = dedup_text(Record.model_validate_json(line), compare)
            keys.append(exact_key(text))
            if signer is not None:
                sigs.append(signer(text))
        buf = io.BytesIO()
        np.savez(buf, keys=np.array(keys, dtype="S16"), signatures=np.stack(sigs) if sigs else np.empty((0, num_perm), np.uint32))
        target = name.removesuffix(".jsonl") + ".npz"
        store.write_bytes(target, buf.getvalue())
        done.append(target)
    return {"signed": done}


def adopt_here(location: str) -> dict[str, int]:
    """A task pinned to one node: upload what killed workers of the run left in that node's spool."""
    from datatailor.executors.spool import adopt_orphans

    return adopt_orphans(RunStore(location), location)
