"""The runner: drives a recipe's stages over records with bounded concurrency.

Guarantees:

* Each stage's results are appended to its checkpoint as each record finishes, so a crash (even
  `kill -9`) loses at most the records in flight.
* Every record that enters a stage leaves it as output or as a failure row, exactly once.
* The same command with the same `--out` resumes: finished records are not recomputed and the final
  `data.jsonl` has the same bytes as an uninterrupted run's (outputs are ordered by input, not by
  completion time).
* A run-level problem (budget spent, server down, Ctrl-C) stops new work, lets in-flight records
  finish, checkpoints, and records the status in `manifest.json`.

Run directory::

    manifest.json   recipe hash, versions, status, per-stage counts
    recipe.json     the validated recipe (names env vars, never their values)
    usage.json      {"run": …this invocation…, "total": …all invocations…}, per role
    data.jsonl      final records (only once every stage is complete)
    failures.jsonl  one row per failed record: id, stage, kind, message, record
    stages/NN-name/ outputs.jsonl, failures.jsonl, done.json  (the checkpoints)
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datatailor import __version__
from datatailor.errors import RecordFailure, RunAbort, UserError
from datatailor.io import export_records, read_records, write_json, write_jsonl, write_records
from datatailor.llm.cache import RequestCache
from datatailor.llm.models import ModelPool
from datatailor.llm.usage import UsageLedger
from datatailor.progress import RunProgress
from datatailor.recipe import Recipe
from datatailor.records import Record
from datatailor.stages import STAGES, BatchStage, MapStage, Stage, StageContext

STATUS_COMPLETE = "complete"
STATUS_INTERRUPTED = "interrupted"
STATUS_BUDGET = "budget_exhausted"
STATUS_RUNNING = "running"


@dataclass
class RunResult:
    status: str
    out_dir: Path
    records: int = 0
    failures: int = 0
    message: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checkpoints


def _read_checkpoint_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of an append-only checkpoint. A torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    good_bytes = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(good_bytes)
    return rows


class StageCheckpoint:
    """The on-disk state of one stage: finished inputs and their outputs or failures."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.outputs_path = folder / "outputs.jsonl"
        self.failures_path = folder / "failures.jsonl"
        self.done_path = folder / "done.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.outputs: dict[str, list[Record]] = {}
        self.failures: dict[str, dict[str, Any]] = {}
        for row in _read_checkpoint_lines(self.outputs_path):
            self.outputs[row["src"]] = [Record.model_validate(r) for r in row["records"]]
        for row in _read_checkpoint_lines(self.failures_path):
            self.failures[row["id"]] = row
        self._out_fh = self.outputs_path.open("a", encoding="utf-8")
        self._fail_fh = self.failures_path.open("a", encoding="utf-8")

    @property
    def complete(self) -> bool:
        return self.done_path.exists()

    def finished(self, record_id: str) -> bool:
        return record_id in self.outputs or record_id in self.failures

    def add_outputs(self, src: str, records: list[Record]) -> None:
        self.outputs[src] = records
        line = {"src": src, "records": [r.model_dump(mode="json") for r in records]}
        self._out_fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._out_fh.flush()

    def add_failure(self, row: dict[str, Any]) -> None:
        self.failures[row["id"]] = row
        self._fail_fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fail_fh.flush()

    def mark_complete(self, summary: dict[str, Any]) -> None:
        for fh in (self._out_fh, self._fail_fh):
            fh.flush()
            os.fsync(fh.fileno())
        write_json(self.done_path, summary)

    def close(self) -> None:
        self._out_fh.close()
        self._fail_fh.close()


def _failure_row(record: Record, stage: str, kind: str, message: str, shown: Record | None = None) -> dict[str, Any]:
    return {"id": record.id, "stage": stage, "kind": kind, "message": message, "record": (shown or record).model_dump(mode="json")}


# ----------------------------------------------------------------------------- the runner


class Runner:
    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        *,
        force: bool = False,
        progress: RunProgress | None = None,
        cache: RequestCache | None = None,
    ):
        self.recipe = recipe
        self.out = Path(out_dir)
        self.force = force
        self.progress = progress or RunProgress(enabled=False)
        self._cache = cache
        self._stop: RunAbort | None = None

    # -- run directory --------------------------------------------------------

    def _prepare_dir(self) -> dict[str, Any]:
        manifest_path = self.out / "manifest.json"
        recipe_hash = self.recipe.content_hash()
        previous: dict[str, Any] = {}
        if manifest_path.exists():
            try:
                previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise UserError(f"{manifest_path}: damaged manifest; use another --out or --force") from None
            if previous.get("recipe_hash") != recipe_hash:
                if not self.force:
                    raise UserError(
                        f"{self.out} holds a run of a different recipe (hash {previous.get('recipe_hash')} != "
                        f"{recipe_hash}). Use another --out, or --force to discard that run and start over."
                    )
                previous = {}
                for name in ("stages", "data.jsonl", "failures.jsonl", "usage.json", "manifest.json"):
                    p = self.out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
        elif self.out.exists() and any(self.out.iterdir()) and not self.force:
            raise UserError(f"{self.out} exists and is not a datatailor run directory; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        return previous

    def _write_manifest(self, status: str, message: str, stages: list[dict[str, Any]], previous: dict[str, Any], started: str, count: bool = True) -> None:
        manifest = {
            "recipe_name": self.recipe.name,
            "recipe_hash": self.recipe.content_hash(),
            "status": status,
            "message": message,
            "stages": stages,
            "invocations": int(previous.get("invocations", 0)) + int(count),
            "first_started_at": previous.get("first_started_at", started),
            "started_at": started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        write_json(self.out / "manifest.json", manifest)

    # -- main -------------------------------------------------------------------

    async def run(self) -> RunResult:
        # Read the input first: a bad input file must fail before anything in --out is touched.
        records = self._load_input()
        previous = self._prepare_dir()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(self.out / "recipe.json", self.recipe.to_json())
        # "running" marks the folder as ours at once; a killed run leaves it so, and is resumed.
        self._write_manifest(STATUS_RUNNING, "in progress (if no process is running, it was killed: re-run to resume)", [], previous, started, count=False)
        usage_path = self.out / "usage.json"
        prev_usage = UsageLedger.previous_from_json(json.loads(usage_path.read_text())) if usage_path.exists() else {}
        ledger = UsageLedger(prev_usage, self.recipe.budget)
        cache = self._cache
        if cache is None and self.recipe.cache is not False:
            cache = RequestCache(None if self.recipe.cache is True else self.recipe.resolve(str(self.recipe.cache)))
        pool = ModelPool(dict(self.recipe.models), ledger, cache, self.recipe.base_dir, seed=self.recipe.seed)
        self.progress.attach(ledger, [self.recipe.stage_name(i) for i in range(len(self.recipe.stages))])

        stage_summaries: list[dict[str, Any]] = []
        status, message = STATUS_COMPLETE, ""
        try:
            with self.progress:
                for index, config in enumerate(self.recipe.stages):
                    name = self.recipe.stage_name(index)
                    ctx = StageContext(
                        models=pool,
                        stage_name=name,
                        seed=self.recipe.seed,
                        artifacts_dir=self.out,
                        base_dir=self.recipe.base_dir,
                        recipe=self.recipe,
                    )
                    stage = STAGES[config.type](config, ctx)
                    checkpoint = StageCheckpoint(self.out / "stages" / f"{index:02d}-{_safe(name)}")
                    try:
                        records, summary = await self._run_stage(stage, checkpoint, records)
                    finally:
                        checkpoint.close()
                    stage_summaries.append(summary)
                    if self._stop is not None:
                        raise self._stop
        except RunAbort as abort:
            status, message = abort.status, str(abort)
        except BaseException as exc:
            # Ctrl-C, a user error met mid-run (e.g. a missing model file) or a bug: record why,
            # keep the checkpoints, and leave the folder resumable by the same command.
            interrupted = isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))
            message = "interrupted by the user" if interrupted else f"stopped by an error: {exc}"
            self._finish(STATUS_INTERRUPTED, message, stage_summaries, previous, started, ledger, None)
            await pool.aclose()
            raise
        finally:
            if cache is not None and self._cache is None:
                cache.close()
        await pool.aclose()
        return self._finish(status, message, stage_summaries, previous, started, ledger, records if status == STATUS_COMPLETE else None)

    def _finish(self, status, message, summaries, previous, started, ledger, final: list[Record] | None) -> RunResult:
        write_json(self.out / "usage.json", ledger.as_json())
        n_failures = 0
        if final is not None:
            write_records(self.out / "data.jsonl", final)
            failures = self._collect_failures()
            n_failures = write_jsonl(self.out / "failures.jsonl", failures)
            for fmt in self.recipe.output.formats:
                export_records(final, self.out / f"data.{fmt}.jsonl", fmt)
        self._write_manifest(status, message, summaries, previous, started)
        return RunResult(status, self.out, len(final or []), n_failures, message, ledger.as_json())

    def _load_input(self) -> list[Record]:
        if self.recipe.input is None:
            return []
        spec = self.recipe.input
        return read_records(self.recipe.resolve(spec.path), spec.format, spec.limit)

    def _collect_failures(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for index in range(len(self.recipe.stages)):
            folder = self.out / "stages" / f"{index:02d}-{_safe(self.recipe.stage_name(index))}"
            order_path = folder / "done.json"
            order = json.loads(order_path.read_text())["input_order"] if order_path.exists() else []
            by_id = {r["id"]: r for r in _read_checkpoint_lines(folder / "failures.jsonl")}
            rows.extend(by_id[i] for i in order if i in by_id)
        return rows

    # -- one stage ----------------------------------------------------------------

    async def _run_stage(self, stage: Stage, cp: StageCheckpoint, inputs: list[Record]) -> tuple[list[Record], dict[str, Any]]:
        name = stage.name
        _check_unique(inputs, name)
        self.progress.stage_started(name, total=len(inputs), done=sum(cp.finished(r.id) for r in inputs), failed=sum(r.id in cp.failures for r in inputs))
        if not cp.complete:
            if isinstance(stage, MapStage):
                await self._run_map(stage, cp, inputs)
            elif isinstance(stage, BatchStage):
                await self._run_batch(stage, cp, inputs)
            else:  # pragma: no cover - registry only holds these two kinds
                raise TypeError(f"{type(stage).__name__} is neither a MapStage nor a BatchStage")
        outputs = self._ordered_outputs(cp, inputs)
        summary = {
            "name": name,
            "type": stage.config.type,
            "inputs": len(inputs),
            "outputs": len(outputs),
            "failures": sum(1 for r in inputs if r.id in cp.failures),
            "complete": False,
        }
        batch_done = "__batch__" in cp.outputs  # a batch stage writes all its outputs at once
        if self._stop is None and (batch_done or all(cp.finished(r.id) for r in inputs)):
            if not cp.complete:
                cp.mark_complete({"input_order": [r.id for r in inputs], **summary, "complete": True})
            summary["complete"] = True
            stage.finalize(outputs, [cp.failures[r.id] for r in inputs if r.id in cp.failures])
        self.progress.stage_finished(name)
        return outputs, summary

    def _ordered_outputs(self, cp: StageCheckpoint, inputs: list[Record]) -> list[Record]:
        if "__batch__" in cp.outputs:
            return cp.outputs["__batch__"]
        out: list[Record] = []
        for r in inputs:
            out.extend(cp.outputs.get(r.id, []))
        return out

    async def _run_map(self, stage: MapStage, cp: StageCheckpoint, inputs: list[Record]) -> None:
        queue: asyncio.Queue[Record] = asyncio.Queue()
        for r in inputs:
            if not cp.finished(r.id):
                queue.put_nowait(r)

        async def worker() -> None:
            while self._stop is None:
                try:
                    record = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._process_one(stage, cp, record)

        n = min(stage.config.concurrency, max(1, queue.qsize()))
        await asyncio.gather(*(worker() for _ in range(n)))

    async def _process_one(self, stage: MapStage, cp: StageCheckpoint, record: Record) -> None:
        name = stage.name
        try:
            outputs = await stage.process(record)
        except RunAbort as abort:
            if self._stop is None:
                self._stop = abort
            return
        except RecordFailure as failure:
            shown = failure.record if isinstance(failure.record, Record) and failure.record.id == record.id else None
            cp.add_failure(_failure_row(record, name, failure.kind, str(failure), shown))
            self.progress.advance(name, failed=True)
            return
        except UserError:
            raise
        except Exception as exc:  # a bug in a stage must not lose the record or hang the run
            cp.add_failure(_failure_row(record, name, "stage_error", f"{type(exc).__name__}: {exc}"))
            self.progress.advance(name, failed=True)
            return
        if not outputs:
            cp.add_failure(_failure_row(record, name, "empty_output", "the stage returned no records"))
            self.progress.advance(name, failed=True)
            return
        cp.add_outputs(record.id, outputs)
        self.progress.advance(name)

    async def _run_batch(self, stage: BatchStage, cp: StageCheckpoint, inputs: list[Record]) -> None:
        try:
            result = await stage.process_all(inputs)
        except RunAbort as abort:
            self._stop = abort
            return
        by_id = {r.id: r for r in inputs}
        for rid, (kind, message) in result.rejected.items():
            if rid not in by_id:
                raise RuntimeError(f"stage {stage.name} rejected unknown record id {rid}")
            cp.add_failure(_failure_row(by_id[rid], stage.name, kind, message))
            self.progress.advance(stage.name, failed=True)
        _check_unique(result.outputs, stage.name + " outputs")
        cp.add_outputs("__batch__", result.outputs)
        for _ in range(len(inputs) - len(result.rejected)):
            self.progress.advance(stage.name)



def _check_unique(records: list[Record], where: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise RuntimeError(f"duplicate record id {r.id} in {where}; a stage must give derived records distinct ids")
        seen.add(r.id)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _versions() -> dict[str, str]:
    import pydantic

    return {"datatailor": __version__, "python": platform.python_version(), "pydantic": pydantic.VERSION}


async def run_recipe(recipe: Recipe, out_dir: str | Path, *, force: bool = False, show_progress: bool | None = None, cache: RequestCache | None = None) -> RunResult:
    progress = RunProgress(enabled=show_progress)
    return await Runner(recipe, Path(out_dir), force=force, progress=progress, cache=cache).run()


def run_recipe_sync(recipe: Recipe, out_dir: str | Path, **kwargs: Any) -> RunResult:
    return asyncio.run(run_recipe(recipe, out_dir, **kwargs))
