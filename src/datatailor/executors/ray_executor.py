"""`--executor ray`: a map stage's pending records as shards on a Ray Data actor pool, and `dedup`'s signatures
as Ray tasks. The driver (the runner's process) keeps every decision about what is finished.

For a map stage that can be spread (`Stage.distributed`):

1. Part files a killed invocation left are merged into the stage's journals (one row per input id: the
   first output wins, an output beats a failure), with its workers' usage.
2. The first `systematic_failures` pending records run on the driver, as in a local run, so a stage that
   fails every record (a template typo, a wrong model name) stops before the cluster spends anything.
3. The other pending records are written to shard files (`shards/NNNNNN.jsonl`, --shard-size each) and
   `map_batches` sends each shard to a `StageWorker` actor (--workers of them, built once). Ray retries the
   shards of an actor that dies (at-least-once); nothing drops failed blocks (`max_errored_blocks` unset).
4. When every shard is back, the part files are merged; the stage is complete only when every input id is
   accounted for exactly once (else `interrupted`, and the same command resumes with the missing ones).

A watchdog stops the run as `interrupted` (resumable) when no part file grew and no shard came back for
--stall-timeout seconds: Ray has open bugs where a job hangs for good. A budget holds across workers: each
reports its spending to a tally actor every 0.5 s and sees the others'. The request cache is shared: one
SQLite file in WAL mode on one machine, one file per worker on several (a shared filesystem is needed for
--out and the cache either way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datatailor.errors import RunAbort, UserError
from datatailor.executors import RaySettings
from datatailor.executors.worker import PARTS, SHARDS, USAGE, SpendTally, StageWorker, sign_shard
from datatailor.journal import iter_journal
from datatailor.store import ListSource, RecordSource, record_line

if TYPE_CHECKING:
    from datatailor.runner import Runner, StageCheckpoint
    from datatailor.stages.base import FilterStage, MapStage

POLL_S = 0.5


def _stall(message: str, status: str = "interrupted") -> RunAbort:
    abort = RunAbort(message)
    abort.status = status
    return abort


class RayExecutor:
    def __init__(self, settings: RaySettings):
        self.settings = settings
        self._started = False
        self._owned = False
        self.nodes = 1

    # -- cluster ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'datatailor[ray]'") from None
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            address = self.settings.address or os.environ.get("RAY_ADDRESS")
            if address:
                try:
                    ray.init(address=address, **options)
                except Exception as exc:  # ConnectionError and friends, worded differently across versions
                    raise UserError(f"--executor ray: cannot reach the Ray cluster at {address}: {exc}") from None
            else:
                # A local Ray on the loopback only (without this variable Ray binds the machine's own address).
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                ray.init(num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1", **options)
            self._owned = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        for name in ("ray", "ray.data"):  # the run's own progress line says what happens; Ray's INFO lines repeat it
            logging.getLogger(name).setLevel(logging.WARNING)
        ctx.max_errored_blocks = 0  # never drop a failed block
        self.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        self._started = True

    def close(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
        self._started = self._owned = False

    @property
    def per_writer_cache(self) -> bool:
        s = self.settings.per_writer_cache
        return self.nodes > 1 if s is None else s

    # -- a map stage ---------------------------------------------------------------------------------

    async def run_map(self, runner: Runner, index: int, stage: MapStage, cp: StageCheckpoint, inputs: RecordSource) -> bool:
        """Process the stage's pending inputs on the cluster; True when every input is finished."""
        self.start()
        name = stage.name
        merge_parts(cp, runner)
        head: list[Any] = []
        for record in inputs:
            if record.id not in cp.finished:
                head.append(record)
                if len(head) >= max(1, runner.recipe.systematic_failures):
                    break
        if head and not await runner._run_map(stage, cp, ListSource(head)):
            return False
        total, done = runner.count_finished(name, cp, inputs)
        if done == total:
            return True
        shards = write_shards(cp.folder / SHARDS, (r for r in inputs if r.id not in cp.finished), self.settings.shard_size)
        ok = await self._map(runner, index, cp, shards)
        merge_parts(cp, runner)
        shutil.rmtree(cp.folder / SHARDS, ignore_errors=True)
        if not ok:
            return False
        missing = sum(1 for rid in inputs.ids() if rid not in cp.finished)
        if missing:
            runner._stop = _stall(f"stage {name}: {missing} records came back from no worker; re-run the same command to process them")
            return False
        return True

    async def _map(self, runner: Runner, index: int, cp: StageCheckpoint, shards: list[Path]) -> bool:
        import ray

        from datatailor.llm.cache import default_cache_path

        recipe = runner.recipe
        cache_path = None
        if recipe.cache is not False:
            cache_path = str(default_cache_path() if recipe.cache is True else recipe.resolve(str(recipe.cache)))
        tally = ray.remote(num_cpus=0)(SpendTally).remote()
        workers = min(self.settings.workers, len(shards))
        ds = ray.data.from_items([{"shard": str(p)} for p in shards], override_num_blocks=len(shards))
        results = ds.map_batches(
            StageWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=self.settings.worker_cpus,
            fn_constructor_kwargs={
                "recipe": recipe, "out": str(runner.out), "index": index, "workers": workers,
                "previous": {"total": runner.ledger.as_json()["total"]}, "cache_path": cache_path,
                "per_writer_cache": self.per_writer_cache, "tally": tally,
            },
        )
        name = recipe.stage_name(index)

        def on_row(row: dict[str, Any]) -> RunAbort | None:
            for _ in range(int(row["done"]) - int(row["failed"])):
                runner.progress.advance(name)
            for _ in range(int(row["failed"])):
                runner.progress.advance(name, failed=True)
            if row["abort"]:
                return _stall(str(row["abort"]), str(row["status"]) or "interrupted")
            return None

        return await self._drain(runner, results.iter_rows(), on_row, cp.folder / PARTS)

    async def _drain(self, runner: Runner, rows: Iterator[dict[str, Any]], on_row: Any, watched: Path) -> bool:
        """Consume a Ray Data iterator in a thread; stop on the first abort, or when nothing moves for the
        stall timeout. True when every row came back without an abort."""
        queue: list[Any] = []
        finished = threading.Event()
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                for row in rows:
                    queue.append(row)
            except BaseException as exc:  # surfaced on the driver below
                failure.append(exc)
            finally:
                finished.set()

        threading.Thread(target=consume, daemon=True, name="datatailor-ray-results").start()
        last_size, last_move = -1, time.monotonic()
        while True:
            while queue:
                abort = on_row(queue.pop(0))
                if abort is not None and runner._stop is None:
                    runner._stop = abort
                last_move = time.monotonic()
            if runner._stop is not None:
                return False
            if finished.is_set() and not queue:
                break
            size = _folder_size(watched)
            if size != last_size:
                last_size, last_move = size, time.monotonic()
            elif time.monotonic() - last_move > self.settings.stall_timeout_s:
                runner._stop = _stall(
                    f"no worker made progress for {self.settings.stall_timeout_s:.0f} s (Ray may be hung); "
                    "stopped: re-run the same command to resume"
                )
                return False
            await asyncio.sleep(POLL_S)
        if failure:
            exc = failure[0]
            runner._stop = _stall(f"the Ray job failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                  "re-run the same command to resume")
            return False
        return True

    # -- dedup's signatures --------------------------------------------------------------------------

    async def run_filter(self, runner: Runner, stage: FilterStage, cp: StageCheckpoint, inputs: RecordSource) -> Any:
        """A whole-set stage: dedup computes its signatures on the cluster, then decides on the driver (the
        greedy pass in input order, as locally). Other filter stages run on the driver."""
        from datatailor.stages.select import Dedup

        if not isinstance(stage, Dedup):
            return runner._run_filter(stage, cp, inputs)
        import ray

        self.start()
        cfg = stage.config
        folder = cp.folder / SHARDS
        shards = write_shards(folder, iter(inputs), self.settings.shard_size)
        runner.progress.stage_started(stage.name, total=len(inputs))
        try:
            if shards:
                ds = ray.data.from_items([{"shard": str(p)} for p in shards], override_num_blocks=len(shards))
                signed = ds.map_batches(
                    sign_shard, batch_size=1, num_cpus=self.settings.worker_cpus,
                    fn_kwargs={"compare": cfg.compare, "near": cfg.near, "num_perm": cfg.num_perm, "shingle_words": cfg.shingle_words},
                )
                if not await self._drain(runner, signed.iter_rows(), lambda row: None, folder):
                    raise runner._stop or _stall("dedup: the signature job stopped")
            return runner._run_filter(stage, cp, inputs, signed=read_signatures(shards, cfg.near))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- files


def write_shards(folder: Path, records: Iterator[Any], shard_size: int) -> list[Path]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths: list[Path] = []
    fh = None
    n = 0
    for record in records:
        if n % shard_size == 0:
            if fh is not None:
                fh.close()
            paths.append(folder / f"{len(paths):06d}.jsonl")
            fh = paths[-1].open("w", encoding="utf-8")
        fh.write(record_line(record))
        n += 1
    if fh is not None:
        fh.close()
    return paths


def read_signatures(shards: list[Path], near: bool) -> Iterator[tuple[bytes, np.ndarray | None]]:
    for shard in shards:
        with np.load(shard.with_suffix(".npz")) as data:
            keys = data["keys"]
            sigs = data["signatures"] if near else None
            for i, key in enumerate(keys):
                yield bytes(key), (sigs[i] if sigs is not None else None)


def merge_parts(cp: StageCheckpoint, runner: Runner) -> None:
    """Fold the workers' part files into the stage's journals, one row per input id (outputs first, so an
    output beats a failure of the same id), and their usage into the run's; then delete them."""
    parts = cp.folder / PARTS
    files = sorted(parts.glob("*.outputs.jsonl")) + sorted(parts.glob("*.failures.jsonl"))
    for path in files:
        for row in iter_journal(path):
            if path.name.endswith(".outputs.jsonl"):
                if row["src"] not in cp.finished:
                    cp.add_output_row(row)
            elif row["id"] not in cp.finished:
                cp.add_failure(row)
    cp.sync()
    for path in sorted((cp.folder / USAGE).glob("*.json")):
        import json

        runner.ledger.absorb(json.loads(path.read_text(encoding="utf-8")))
    runner.save_usage()
    for path in [*files, *(cp.folder / USAGE).glob("*.json")]:
        path.unlink(missing_ok=True)


def _folder_size(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.iterdir())
    except FileNotFoundError:
        return 0
