"""One stage over its inputs: a map stage record by record, a filter streamed, a batch stage over the whole set.

`StageExecution` is the part of the `Runner` that runs one stage against its checkpoint (`runner.checkpoint`).
It never decides what the run does next: a run-level stop (budget spent, server down, a systematic failure) is
left in `self._stop` for the run loop (`runner.run`), and in-flight records finish and are checkpointed first.
An executor (`--executor ray`) may take over a map stage's records (`executor.run_map`) and calls back into
`_run_map`, `count_finished` and `_run_filter` for the parts that stay on the driver.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.errors import RecordFailure, Rejected, RunAbort, UserError
from datatailor.journal import read_journal
from datatailor.llm.base import CALL_OWNER
from datatailor.recipe import Recipe
from datatailor.records import Record
from datatailor.runner.checkpoint import FailureWriter, StageCheckpoint, check_unique, failure_row
from datatailor.runner.probe import SystematicFailureProbe
from datatailor.stages import STAGES, BatchStage, MapStage, Stage, StageContext
from datatailor.stages.base import RESERVED_FILES, FilterStage
from datatailor.stages.shared import SharedCalls
from datatailor.store import JsonlSource, ListSource, RecordSource, RecordWriter


def stage_dir(recipe: Recipe, out: Path, index: int) -> Path:
    return out / "stages" / f"{index:02d}-{_safe(recipe.stage_name(index))}"


def build_stage(recipe: Recipe, out: Path, index: int) -> Stage:
    """Stage `index` of the recipe, bound to its folder in run directory `out` (models are bound later)."""
    config = recipe.stages[index]
    folder = stage_dir(recipe, out, index)
    ctx = StageContext(
        models=None,  # type: ignore[arg-type]  # bound once the run directory is ready
        stage_name=recipe.stage_name(index),
        seed=recipe.seed,
        artifacts_dir=folder,
        base_dir=recipe.base_dir,
        budget_pairs=recipe.budget_pairs,
        earlier_dirs=[stage_dir(recipe, out, i) for i in range(index)],
        shared=SharedCalls(folder),
    )
    return STAGES[config.type](config, ctx)


async def process_record(stage: MapStage, record: Record) -> tuple[list[Record], dict[str, Any] | None, bool]:
    """Run a map stage on one record: (outputs, None, False), or ([], failure row, whether it was a filter's
    decision). A run-level stop (RunAbort) or a user error propagates; any other exception is the record's
    `stage_error` failure (a bug in a stage must not lose the record or hang the run)."""
    name = stage.name
    owner = CALL_OWNER.set(f"{name}:{record.id}")  # named beside its requests in a batch journal (llm/batch)
    try:
        outputs = await stage.process(record)
    except (RunAbort, UserError):
        raise
    except RecordFailure as failure_exc:
        shown = failure_exc.record if isinstance(failure_exc.record, Record) and failure_exc.record.id == record.id else None
        return [], failure_row(record, name, failure_exc.kind, str(failure_exc), shown), isinstance(failure_exc, Rejected)
    except Exception as exc:
        return [], failure_row(record, name, "stage_error", f"{type(exc).__name__}: {exc}"), False
    finally:
        CALL_OWNER.reset(owner)
    if not outputs:
        return [], failure_row(record, name, "empty_output", "the stage returned no records"), False
    return outputs, None, False


class StageExecution:
    """Runs one stage of the run (mixed into `Runner`, which provides the attributes below)."""

    recipe: Recipe
    out: Path
    executor: Any
    progress: Any
    _stop: RunAbort | None
    _deficits: dict[int, int]

    async def _run_stage(self, index: int, stage: Stage, cp: StageCheckpoint, inputs: RecordSource, round: int) -> tuple[RecordSource, dict[str, Any]]:
        name = stage.name
        digest = inputs.digest()
        done = cp.done()
        if done is not None and done.get("digest") == digest and done.get("rounds", 1) == round:
            # Complete for exactly these inputs: nothing to do, not even reading its checkpoints.
            n = done["inputs"]
            self.progress.stage_started(name, total=n, done=n, failed=done["failures"])
            self.progress.stage_finished(name)
            summary = {k: v for k, v in done.items() if k not in ("digest", "records_digest")}
            return JsonlSource(cp.records_path, done["outputs"], done.get("records_digest")), summary
        if isinstance(stage, MapStage):
            if self.executor is not None and stage.distributed:
                complete = await self.executor.run_map(self, index, stage, cp, inputs)
            else:
                complete = await self._run_map(stage, cp, inputs)
            outputs, failures = cp.compact(inputs, name) if complete else (None, Counter())
        elif isinstance(stage, FilterStage):
            self.progress.stage_started(name, total=len(inputs))
            if self.executor is not None:
                outputs, failures = await self.executor.run_filter(self, stage, cp, inputs)
            else:
                outputs, failures = self._run_filter(stage, cp, inputs)
            complete = True
        elif isinstance(stage, BatchStage):
            self.progress.stage_started(name, total=len(inputs))
            owner = CALL_OWNER.set(f"{name}:*")  # a call no single record owns (TeaMs-RL's training) is the stage's in a batch journal
            try:
                outputs, failures, complete = await self._run_batch(stage, cp, inputs, digest, round)
            finally:
                CALL_OWNER.reset(owner)
        else:  # pragma: no cover - registry only holds these kinds
            raise TypeError(f"{type(stage).__name__} is neither a MapStage nor a BatchStage")
        summary: dict[str, Any] = {
            "name": name,
            "type": stage.config.type,
            "method": stage.method,
            "inputs": len(inputs),
            "outputs": len(outputs) if outputs is not None else 0,
            "failures": sum(failures.values()) if complete else sum(1 for i in inputs.ids() if i in cp.failed),
            "failure_kinds": dict(sorted(failures.items())),
            "rounds": round,
            "complete": False,
        }
        if self._stop is None and complete and outputs is not None:
            if _overrides(stage, "delivery") or _overrides(stage, "finalize"):
                listed, rows = outputs.load(), read_journal(cp.failures_path)  # these stages are method-sized
                delivery = stage.delivery(listed, rows)
                if delivery is not None:
                    summary["delivery"] = {"asked": delivery.asked, "delivered": delivery.delivered, "why": delivery.why}
                stage.finalize(listed, rows)
            summary["artifacts"] = sorted(p.name for p in cp.folder.iterdir() if p.is_file() and p.name not in RESERVED_FILES and not p.name.startswith("."))
            summary["complete"] = True
            cp.mark_complete({"digest": digest, "records_digest": outputs.digest(), **summary})
        self.progress.stage_finished(name)
        return (outputs if outputs is not None else ListSource([])), summary

    def count_finished(self, name: str, cp: StageCheckpoint, inputs: RecordSource) -> tuple[int, int]:
        """(inputs, finished inputs) of a map stage, shown as the stage's progress."""
        total = done = failed = 0
        for rid in inputs.ids():
            total += 1
            if rid in cp.finished:
                done += 1
                failed += rid in cp.failed
        self.progress.stage_started(name, total=total, done=done, failed=failed)
        return total, done

    async def _run_map(self, stage: MapStage, cp: StageCheckpoint, inputs: RecordSource) -> bool:
        """Process the inputs not finished yet, reading them in order, `concurrency` at a time. True when
        every input is finished (no stop)."""
        total, done = self.count_finished(stage.name, cp, inputs)
        if done == total:
            return True
        probe = SystematicFailureProbe(self.recipe.systematic_failures, done)
        # with a batched role, enough records in flight to fill a batch (`batch_records_in_flight`)
        in_flight = stage.ctx.models.records_in_flight(stage.config.role_fields().values(), stage.config.concurrency)
        n = min(in_flight, total - done)
        queue: asyncio.Queue[Record | None] = asyncio.Queue(maxsize=2 * n)

        async def feed() -> None:
            for record in inputs:
                if self._stop is not None:
                    break
                if record.id not in cp.finished:
                    await queue.put(record)
            for _ in range(n):
                await queue.put(None)

        async def worker() -> None:
            while (record := await queue.get()) is not None:
                if self._stop is None:  # after a stop, drain the queue without starting anything
                    await self._process_one(stage, cp, record, probe)

        await asyncio.gather(feed(), *(worker() for _ in range(n)))
        for row in probe.finish():
            cp.add_failure(row)
        if probe.tripped and self._stop is None:
            self._stop = probe.abort(stage.name)
        return self._stop is None

    def _run_filter(self, stage: FilterStage, cp: StageCheckpoint, inputs: RecordSource, **precomputed: Any) -> tuple[RecordSource, Counter[str]]:
        """A keep-or-drop whole-set stage, streamed: its decisions are written as they come, in input order.
        `precomputed`: what an executor computed for the stage (dedup's `signed`)."""
        writer = RecordWriter(cp.records_path, f"{stage.name} outputs")
        failed = FailureWriter(cp)
        try:
            for record, kept, why in stage.decide(inputs, **precomputed):
                if kept is not None:
                    writer.write(kept)
                else:
                    assert why is not None
                    failed.write(failure_row(record, stage.name, why[0], why[1]))
                self.progress.advance(stage.name, failed=kept is None)
        except BaseException:
            writer.abort()
            failed.abort()
            raise
        return writer.close(), failed.close()

    async def _process_one(self, stage: MapStage, cp: StageCheckpoint, record: Record, probe: SystematicFailureProbe) -> None:
        try:
            outputs, failure, decision = await process_record(stage, record)
        except RunAbort as abort:
            if self._stop is None:
                self._stop = abort
            return
        if failure is None:
            cp.add_outputs(record.id, outputs)
        for row in probe.observe(failure, decision):
            cp.add_failure(row)
        if probe.tripped:
            if self._stop is None:
                self._stop = probe.abort(stage.name)
            return
        self.progress.advance(stage.name, failed=failure is not None)

    async def _run_batch(self, stage: BatchStage, cp: StageCheckpoint, inputs: RecordSource, digest: str,
                         round: int) -> tuple[RecordSource | None, Counter[str], bool]:
        records = inputs.load()
        if digest not in cp.batches:
            try:
                result = await stage.process_all(records)
            except RunAbort as abort:
                self._stop = abort
                return None, Counter(), False
            by_id = {r.id: r for r in records}
            rejected = []
            for rid, (kind, message) in result.rejected.items():
                if rid not in by_id:
                    raise RuntimeError(f"stage {stage.name} rejected unknown record id {rid}")
                rejected.append(failure_row(by_id[rid], stage.name, kind, message))
            check_unique(result.outputs, stage.name + " outputs")
            cp.add_batch(digest, result.outputs, rejected)
        outputs, rejected = cp.batch(digest)
        order = {r.id: i for i, r in enumerate(records)}
        failures = cp.replace_failures(sorted(rejected, key=lambda row: order[row["id"]]))
        for extra in range(2, round + 1):
            if extra not in cp.rounds:
                try:
                    more = await stage.top_up(records, outputs, self._deficits[extra], extra)
                except RunAbort as abort:
                    self._stop = abort
                    return None, failures, False
                check_unique(outputs + more, f"{stage.name} round {extra} outputs")
                cp.add_round(extra, more)
            outputs += cp.round_records(extra)
        for _ in records:
            self.progress.advance(stage.name)
        writer = RecordWriter(cp.records_path, f"{stage.name} outputs")
        for r in outputs:
            writer.write(r)
        return writer.close(), failures, True


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
