"""`--executor ray`: a map stage's pending records as shards on a Ray Data actor pool, and `dedup`'s signatures
as Ray tasks. The driver (the runner's process) keeps every decision about what is finished.

For a map stage that can be spread (`Stage.distributed`):

1. Part files a killed invocation left are merged into the stage's journals (one row per input id: the
   first output wins, an output beats a failure), with its workers' usage.
2. The first `systematic_failures` pending records run on the driver, as in a local run, so a stage that
   fails every record (a template typo, a wrong model name) stops before the cluster spends anything.
3. The other pending records are written to shard objects in the run's store (`stages/NN-name/shards/NNNNNN.jsonl`,
   --shard-size each: the run directory on a shared disk, or the object store of `--out s3://…`), and
   `map_batches` sends each shard's name to a `StageWorker` actor (--workers of them, built once). Ray retries the
   shards of an actor that dies (at-least-once); nothing drops failed blocks (`max_errored_blocks` unset).
4. When every shard is back, the part files (or part objects) are merged; the stage is complete only when every
   input id is accounted for exactly once (else `interrupted`, and the same command resumes with the missing ones).

What the user is told (printed, and in the manifest under "executor"): a worker node that died (its id and
address), how many records ran twice because a worker died before its result was known, and how many rows were
recovered from a killed worker's spool. A watchdog stops the run as `interrupted` (resumable) when no part grew
and no shard came back for --stall-timeout seconds: Ray has open bugs where a job hangs for good. A budget
holds across workers: each reports its spending to a tally actor every 0.5 s and sees the others'. Spend is
counted from every process's spend log (`llm.spend_log`), never from what a worker reports at the end. The
request cache is shared: one SQLite file in WAL mode on one machine, one file per worker on several.

A local Ray that the run starts is shut down when the run ends, and a watcher process (`executors.reaper`)
stops it if the run is killed.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datatailor.errors import RunAbort, UserError
from datatailor.executors import RaySettings
from datatailor.executors.worker import CLAIMS, PARTS, SHARDS, SpendTally, StageWorker, adopt_here, sign_shard
from datatailor.storage import LOG, RunStore, iter_journal_rows
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
        self._reaper: subprocess.Popen[bytes] | None = None
        self._session_dir: str | None = None
        self._alive: dict[str, str] = {}  # node id -> address, of the nodes seen alive
        self._last_node_check = 0.0
        # What the user is told, and the manifest keeps under "executor".
        self.events: dict[str, Any] = {"nodes_lost": [], "shards_rerun": 0, "records_rerun": 0, "records_skipped": 0,
                                       "records_retried": 0}

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
                # address="local": a new Ray of our own, never one that `ray start` left running on this machine
                ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1", **options)
                self._start_reaper()
            self._owned = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        for name in ("ray", "ray.data"):  # the run's own progress line says what happens; Ray's INFO lines repeat it
            logging.getLogger(name).setLevel(logging.WARNING)
        ctx.max_errored_blocks = 0  # never drop a failed block
        self._alive = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
        self.nodes = len(self._alive)
        self._started = True

    def _start_reaper(self) -> None:
        """A watcher in its own session that stops this local Ray if this process is killed (`executors.reaper`)."""
        import ray

        node = getattr(ray._private.worker, "_global_node", None)
        if node is None:
            return
        self._session_dir = node.get_session_dir_path()
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "datatailor.executors.reaper", "--pid", str(os.getpid()), "--session-dir", self._session_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def close(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
        if self._reaper is not None:
            from datatailor.executors.reaper import session_processes, stop

            import signal

            # ray.shutdown() stops what it started; anything left of the session (an agent slow to exit) goes now
            deadline = time.monotonic() + 5
            while (left := session_processes(self._session_dir or "")) and time.monotonic() < deadline:
                time.sleep(0.2)
            stop(left, signal.SIGKILL)
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
        self._started = self._owned = False

    def summary(self) -> dict[str, Any]:
        return {"kind": "ray", "nodes": self.nodes, "workers": self.settings.workers, "shard_size": self.settings.shard_size,
                **self.events}

    def _check_nodes(self, runner: Runner) -> None:
        """Tell the user about a node that died (at most every 2 s: ray.nodes() asks the GCS)."""
        if time.monotonic() - self._last_node_check < 2.0:
            return
        self._last_node_check = time.monotonic()
        import ray

        try:
            now = {n["NodeID"]: n for n in ray.nodes()}
        except Exception:  # the GCS busy or gone: the stall watchdog covers a cluster that stopped answering
            return
        for node_id, address in list(self._alive.items()):
            if not (now.get(node_id) or {}).get("Alive"):
                del self._alive[node_id]
                at = datetime.now(timezone.utc).isoformat(timespec="seconds")
                self.events["nodes_lost"].append({"node_id": node_id, "address": address, "at": at})
                runner.note(f"worker node {node_id[:12]} ({address}) died at {at}; Ray runs its shards again on the "
                            f"other nodes ({len(self._alive)} left)")
                if runner.store.remote:
                    in_flight = max((s.concurrency for s in runner.recipe.stages), default=1) // self.settings.workers
                    per_worker = self.settings.flush_records + max(1, in_flight)
                    runner.note(f"node {node_id[:12]}: its workers' requests sent since their last upload are not in usage.json "
                                f"(at most {per_worker} per worker, or --flush-seconds {self.settings.flush_s:g} s of requests)")
                runner.run_dir.notes["executor"] = self.summary()

    @property
    def per_writer_cache(self) -> bool:
        s = self.settings.per_writer_cache
        return self.nodes > 1 if s is None else s

    # -- a map stage ---------------------------------------------------------------------------------

    async def run_map(self, runner: Runner, index: int, stage: MapStage, cp: StageCheckpoint, inputs: RecordSource) -> bool:
        """Process the stage's pending inputs on the cluster; True when every input is finished."""
        self.start()
        name = stage.name
        self.adopt_everywhere(runner)
        self.merge(cp, runner)
        total, done = runner.count_finished(name, cp, inputs)  # also tells what a resume skips
        if done == total:
            return True
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
        folder = f"{stage_rel(runner, cp)}/{SHARDS}"
        shards = write_shards(runner.store, folder, (r for r in inputs if r.id not in cp.finished), self.settings.shard_size)
        ok = await self._map(runner, index, cp, shards)
        self.adopt_everywhere(runner)  # what a worker killed mid-stage left unsent on a node that lives on
        self.merge(cp, runner)
        runner.store.delete(folder)
        runner.store.delete(f"{stage_rel(runner, cp)}/{CLAIMS}")
        if not ok:
            return False
        missing = sum(1 for rid in inputs.ids() if rid not in cp.finished)
        if missing:
            runner._stop = _stall(f"stage {name}: {missing} records came back from no worker; re-run the same command to process them")
            return False
        return True

    def adopt_everywhere(self, runner: Runner) -> None:
        """With --out in an object store: on every node, upload what killed workers of this run left in its spool
        (a resume after the driver was killed), so those records count as finished before anything is shipped."""
        if not runner.store.remote:
            return
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(adopt_here)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(runner.location)
                for node_id in self._alive]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=120)  # a node that does not answer keeps its spool
        adopted = [ray.get(ref) for ref in done]
        files = sum(a["files"] for a in adopted)
        if files:
            runner.note(f"recovered {files} file(s) that killed workers left unsent on the nodes "
                        f"({sum(a['bytes'] for a in adopted):,} bytes)")

    def merge(self, cp: StageCheckpoint, runner: Runner) -> None:
        merged, repeated = merge_parts(cp, runner)
        if repeated:
            self.events["records_retried"] += repeated
            runner.note(f"{repeated} record(s) of {cp.folder.name} ran twice (a worker died before its result was "
                        "known, and Ray ran its shard again); the first result of each was kept")
        runner.run_dir.notes["executor"] = self.summary()

    async def _map(self, runner: Runner, index: int, cp: StageCheckpoint, shards: list[str]) -> bool:
        import ray

        from datatailor.llm.cache import default_cache_path

        recipe = runner.recipe
        cache_path = None
        if recipe.cache is not False:
            cache_path = str(default_cache_path() if recipe.cache is True else recipe.resolve(str(recipe.cache)))
        tally = ray.remote(num_cpus=0)(SpendTally).remote()
        workers = min(self.settings.workers, len(shards))
        ds = ray.data.from_items([{"shard": p} for p in shards], override_num_blocks=len(shards))
        results = ds.map_batches(
            StageWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=self.settings.worker_cpus,
            fn_constructor_kwargs={
                "recipe": recipe, "location": runner.location, "index": index, "workers": workers,
                "previous": {"total": runner.ledger.as_json()["total"]}, "cache_path": cache_path,
                "per_writer_cache": self.per_writer_cache, "invocation": runner.invocation, "tally": tally,
                "flush_records": self.settings.flush_records, "flush_s": self.settings.flush_s,
            },
        )
        name = recipe.stage_name(index)

        def on_row(row: dict[str, Any]) -> RunAbort | None:
            skipped = int(row.get("skipped", 0))
            self.events["records_skipped"] += skipped
            if row.get("rerun"):
                self.events["shards_rerun"] += 1
                self.events["records_rerun"] += int(row["done"])
                runner.note(f"shard {str(row['shard']).rsplit('/', 1)[-1]} of a worker that died ran again: "
                            f"{int(row['done'])} record(s) processed again, {skipped} skipped (their results had been uploaded)")
                runner.run_dir.notes["executor"] = self.summary()
            for _ in range(int(row["done"]) - int(row["failed"])):
                runner.progress.advance(name)
            for _ in range(int(row["failed"])):
                runner.progress.advance(name, failed=True)
            if row["abort"]:
                return _stall(str(row["abort"]), str(row["status"]) or "interrupted")
            return None

        return await self._drain(runner, results.iter_rows(), on_row, growth(runner.store, f"{stage_rel(runner, cp)}/{PARTS}"))

    async def _drain(self, runner: Runner, rows: Iterator[dict[str, Any]], on_row: Any, moved: Callable[[], int]) -> bool:
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
            self._check_nodes(runner)
            size = moved()
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
        folder = f"{stage_rel(runner, cp)}/{SHARDS}"
        store = runner.store
        shards = write_shards(store, folder, iter(inputs), self.settings.shard_size)
        runner.progress.stage_started(stage.name, total=len(inputs))
        try:
            if shards:
                ds = ray.data.from_items([{"shard": p} for p in shards], override_num_blocks=len(shards))
                signed = ds.map_batches(
                    sign_shard, batch_size=1, num_cpus=self.settings.worker_cpus,
                    fn_kwargs={"location": runner.location, "compare": cfg.compare, "near": cfg.near,
                               "num_perm": cfg.num_perm, "shingle_words": cfg.shingle_words},
                )
                if not await self._drain(runner, signed.iter_rows(), lambda row: None, growth(store, folder)):
                    raise runner._stop or _stall("dedup: the signature job stopped")
            return runner._run_filter(stage, cp, inputs, signed=read_signatures(store, shards, cfg.near))
        finally:
            store.delete(folder)


# ----------------------------------------------------------------------------- files


def stage_rel(runner: Runner, cp: StageCheckpoint) -> str:
    """A stage's folder relative to the run directory: where its shards and parts are in the run's store."""
    return cp.folder.relative_to(runner.out).as_posix()


def write_shards(store: RunStore, folder: str, records: Iterator[Any], shard_size: int) -> list[str]:
    """The records as shard objects of `shard_size` lines (one in memory at a time); returns their names."""
    store.delete(folder)
    names: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        names.append(f"{folder}/{len(names):06d}.jsonl")
        store.write_bytes(names[-1], "".join(lines).encode("utf-8"))
        lines.clear()

    for record in records:
        lines.append(record_line(record))
        if len(lines) >= shard_size:
            flush()
    if lines:
        flush()
    return names


def read_signatures(store: RunStore, shards: list[str], near: bool) -> Iterator[tuple[bytes, np.ndarray | None]]:
    for shard in shards:
        with np.load(io.BytesIO(store.read_bytes(shard.removesuffix(".jsonl") + ".npz") or b"")) as data:
            keys = data["keys"]
            sigs = data["signatures"] if near else None
            for i, key in enumerate(keys):
                yield bytes(key), (sigs[i] if sigs is not None else None)


def part_journals(store: RunStore, folder: str) -> list[str]:
    """The part journals under a stage's parts folder: outputs first (an output beats a failure of the same id)."""
    names = {n.split(LOG + "/", 1)[0] if LOG + "/" in n else n for n in store.list(folder)}
    outs = sorted(n for n in names if n.endswith(".outputs.jsonl"))
    return outs + sorted(n for n in names if n.endswith(".failures.jsonl"))


def merge_parts(cp: StageCheckpoint, runner: Runner) -> tuple[int, int]:
    """Fold the workers' part files into the stage's journals, one row per input id (outputs first, so an
    output beats a failure of the same id); make that durable (pushed to the store when --out is a URL); then
    delete the parts. Returns (rows merged, rows of ids already finished: records that ran twice)."""
    store = runner.store
    journals = part_journals(store, f"{stage_rel(runner, cp)}/{PARTS}")
    merged = repeated = 0
    for rel in journals:
        outputs = rel.endswith(".outputs.jsonl")
        for row in iter_journal_rows(store, rel):
            rid = row["src"] if outputs else row["id"]
            if rid in cp.finished:
                repeated += 1
            elif outputs:
                cp.add_output_row(row)
                merged += 1
            else:
                cp.add_failure(row)
                merged += 1
    cp.sync()
    if journals:
        runner.push_remote()  # the merged journals reach the store before the parts are deleted
        for rel in journals:
            store.delete(rel + LOG if store.remote else rel)
    runner.save_usage()
    return merged, repeated


def growth(store: RunStore, folder: str) -> Callable[[], int]:
    """A number that changes while workers make progress under `folder`: the bytes of its files on a disk,
    the count of its objects in a store (listed at most every 5 s)."""
    if not store.remote:
        return lambda: _folder_size(Path(store.path(folder)))
    last = [0.0, 0]

    def count() -> int:
        if time.monotonic() - last[0] >= 5.0:
            last[0], last[1] = time.monotonic(), len(store.list(folder))
        return int(last[1])

    return count


def _folder_size(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.iterdir())
    except FileNotFoundError:
        return 0
