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
* A recipe whose stages cannot work in their order is refused before anything is spent, and a stage
  whose first records all fail with the same error stops the run (`interrupted`) instead of failing
  every record.
* A run that delivers fewer pairs than `budget_pairs` (or a stage short of its own target) ends with
  status `shortfall`, naming the stage, what it delivered of what was asked, and why. A stage that can
  write more (CodecLM's decoder) is asked to, up to its cap of extra rounds, before that.

Run directory::

    manifest.json   recipe hash, versions, status, shortfall, per-stage counts, methods and artifacts
    recipe.json     the validated recipe (names env vars, never their values)
    usage.json      {"run": …this invocation…, "total": …all invocations…}, per role
    data.jsonl      final records (only once every stage is complete)
    failures.jsonl  one row per failed record: id, stage, kind, message, record
    stages/NN-name/ the stage's checkpoints (outputs.jsonl, failures.jsonl, done.json, shared_calls.jsonl),
                    its ordered outputs once complete (records.jsonl: what the next stage reads) and its
                    own artifacts (reports, pools, stats)

Memory: records stream from file to file. A map stage reads its input in order and keeps at most a few
times `concurrency` records in flight; what it keeps per record is a 16-byte digest of the id (finished
ids, and where each output row starts in the journal when the outputs are put back in input order).
Whole-set stages that only keep or drop records (`FilterStage`: dedup, filter.rouge) stream too; the
others (the LLM-heavy methods' batch stages) get their input as a list.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from datatailor import __version__
from datatailor.errors import RecordFailure, Rejected, RunAbort, UserError
from datatailor.io import export_records, iter_records, write_json, write_jsonl
from datatailor.llm.cache import RequestCache
from datatailor.llm.models import ModelPool
from datatailor.llm.usage import UsageLedger
from datatailor.progress import RunProgress
from datatailor.recipe import Recipe
from datatailor.journal import append_row, iter_journal, iter_journal_offsets, read_journal
from datatailor.records import Record
from datatailor.stages import STAGES, BatchStage, MapStage, Stage, StageContext
from datatailor.stages.base import RESERVED_FILES, FilterStage
from datatailor.stages.shared import SharedCalls
from datatailor.store import (
    IdIndex,
    IdSet,
    JsonlSource,
    ListSource,
    RecordSource,
    RecordWriter,
    StreamSource,
    read_row_at,
)

STATUS_COMPLETE = "complete"
STATUS_SHORTFALL = "shortfall"  # every stage finished, but fewer pairs than asked were delivered
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
    shortfall: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- checkpoints


BATCH = "__batch__"
ROUND = "__round__"


class StageCheckpoint:
    """The on-disk state of one stage: which inputs are finished and where their outputs or failures are.

    A map stage appends one row per finished input to outputs.jsonl or failures.jsonl (journals, in the
    order records finish). A batch stage appends one row per input set it processed (keyed by the set's
    digest, so a later round with more inputs runs it again), and a stage that tops up appends one row per
    extra round. In memory: the finished ids as digests, and the journal offsets of batch and round rows.
    Once the stage is complete, its outputs are written in input order to records.jsonl and its failures
    rewritten in input order.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.outputs_path = folder / "outputs.jsonl"
        self.failures_path = folder / "failures.jsonl"
        self.records_path = folder / "records.jsonl"
        self.done_path = folder / "done.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.finished = IdSet()
        self.failed = IdSet()
        self.batches: dict[str, int] = {}  # input digest -> offset of its row in outputs.jsonl
        self.rounds: dict[int, int] = {}  # extra round -> offset of its row
        for offset, row in iter_journal_offsets(self.outputs_path):
            if row["src"] == BATCH:
                self.batches[row["digest"]] = offset
            elif row["src"] == ROUND:
                self.rounds[int(row["round"])] = offset
            else:
                self.finished.add(row["src"])
        for _, row in iter_journal_offsets(self.failures_path):
            self.failed.add(row["id"])
            self.finished.add(row["id"])
        self._out_fh = self.outputs_path.open("a", encoding="utf-8")
        self._fail_fh = self.failures_path.open("a", encoding="utf-8")

    def done(self) -> dict[str, Any] | None:
        """done.json of the last time the stage completed, if its records.jsonl is there."""
        if not (self.done_path.exists() and self.records_path.exists()):
            return None
        return json.loads(self.done_path.read_text(encoding="utf-8"))

    def add_outputs(self, src: str, records: list[Record]) -> None:
        self.finished.add(src)
        append_row(self._out_fh, {"src": src, "records": [r.model_dump(mode="json") for r in records]})

    def add_output_row(self, row: dict[str, Any]) -> None:
        """An outputs row as a worker wrote it ({"src": id, "records": [...]})."""
        self.finished.add(row["src"])
        append_row(self._out_fh, row)

    def add_failure(self, row: dict[str, Any]) -> None:
        self.finished.add(row["id"])
        self.failed.add(row["id"])
        append_row(self._fail_fh, row)

    def add_batch(self, digest: str, records: list[Record], rejected: list[dict[str, Any]]) -> None:
        self._out_fh.flush()
        self.batches[digest] = self.outputs_path.stat().st_size
        append_row(self._out_fh, {"src": BATCH, "digest": digest, "records": [r.model_dump(mode="json") for r in records], "rejected": rejected})

    def add_round(self, round: int, records: list[Record]) -> None:
        self._out_fh.flush()
        self.rounds[round] = self.outputs_path.stat().st_size
        append_row(self._out_fh, {"src": ROUND, "round": round, "records": [r.model_dump(mode="json") for r in records]})

    def _row_at(self, offset: int) -> dict[str, Any]:
        with self.outputs_path.open("rb") as fh:
            return read_row_at(fh, offset)

    def batch(self, digest: str) -> tuple[list[Record], list[dict[str, Any]]]:
        row = self._row_at(self.batches[digest])
        return [Record.model_validate(r) for r in row["records"]], row.get("rejected", [])

    def round_records(self, round: int) -> list[Record]:
        return [Record.model_validate(r) for r in self._row_at(self.rounds[round])["records"]]

    def replace_failures(self, rows: Iterable[dict[str, Any]]) -> Counter[str]:
        """Rewrite failures.jsonl whole (atomically) with `rows`, streamed; returns the count of each kind."""
        writer = FailureWriter(self)
        try:
            for row in rows:
                writer.write(row)
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    def install_failures(self, written: Path) -> None:
        self._fail_fh.close()
        os.replace(written, self.failures_path)
        self._fail_fh = self.failures_path.open("a", encoding="utf-8")


    def sync(self) -> None:
        for fh in (self._out_fh, self._fail_fh):
            fh.flush()
            os.fsync(fh.fileno())

    def mark_complete(self, summary: dict[str, Any]) -> None:
        self.sync()
        write_json(self.done_path, summary)

    def close(self) -> None:
        self._out_fh.close()
        self._fail_fh.close()


class FailureWriter:
    """A stage's failure rows in input order, written to a temporary file that replaces failures.jsonl on
    `close()`; counts each kind on the way, so no row is held in memory."""

    def __init__(self, cp: StageCheckpoint):
        self.cp = cp
        self.kinds: Counter[str] = Counter()
        self._tmp = cp.failures_path.with_name(f".{cp.failures_path.name}.tmp")
        self._fh = self._tmp.open("w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.kinds[row["kind"]] += 1

    def close(self) -> Counter[str]:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.cp.install_failures(self._tmp)
        return self.kinds

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def _failure_row(record: Record, stage: str, kind: str, message: str, shown: Record | None = None) -> dict[str, Any]:
    return {"id": record.id, "stage": stage, "kind": kind, "message": message, "record": (shown or record).model_dump(mode="json")}


class SystematicFailureProbe:
    """Watches a map stage's first finished records: when the first `window` all fail with the same
    error (not a filter's decision), the stage is broken for every record — a template typo, a wrong
    model name — and the run stops instead of spending on the rest.

    Until it has decided, such failures are held back (not checkpointed), so that after the fix a
    re-run retries those records; once it has seen a success or a different error they are written.
    """

    def __init__(self, window: int, already_done: int):
        self.window = window
        self.open = window > 0 and already_done == 0
        self.seen = 0
        self.message: str | None = None
        self.held: list[dict[str, Any]] = []
        self.tripped = False

    def observe(self, failure: dict[str, Any] | None, decision: bool) -> list[dict[str, Any]]:
        """Feed one finished record (its failure row, or None for a success). Returns the rows to write now."""
        if self.tripped:
            return [] if failure is not None and failure["message"] == self.message else ([failure] if failure else [])
        if not self.open:
            return [failure] if failure else []
        self.seen += 1
        if failure is None or decision or (self.message is not None and failure["message"] != self.message):
            self.open = False
            rows, self.held = self.held, []
            return rows + ([failure] if failure else [])
        self.message = failure["message"]
        self.held.append(failure)
        if self.seen >= self.window:
            self.tripped = True
            self.held = []
        return []

    def finish(self) -> list[dict[str, Any]]:
        """At the end of the stage: trip when every record (at least 2) failed the same way; else release what is held."""
        if self.open and self.seen >= 2 and len(self.held) == self.seen:
            self.tripped = True
        rows, self.held = ([] if self.tripped else self.held), []
        return rows

    def abort(self, stage: str) -> RunAbort:
        stop = RunAbort(
            f"stage {stage}: the first {self.seen} records all failed with the same error, so it would fail for every "
            f"record; stopped before spending on the rest. Fix it and re-run the same command to resume. "
            f"The error: {self.message}"
        )
        stop.status = STATUS_INTERRUPTED
        return stop


# ----------------------------------------------------------------------------- one record, one stage


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
    try:
        outputs = await stage.process(record)
    except (RunAbort, UserError):
        raise
    except RecordFailure as failure_exc:
        shown = failure_exc.record if isinstance(failure_exc.record, Record) and failure_exc.record.id == record.id else None
        return [], _failure_row(record, name, failure_exc.kind, str(failure_exc), shown), isinstance(failure_exc, Rejected)
    except Exception as exc:
        return [], _failure_row(record, name, "stage_error", f"{type(exc).__name__}: {exc}"), False
    if not outputs:
        return [], _failure_row(record, name, "empty_output", "the stage returned no records"), False
    return outputs, None, False


# ----------------------------------------------------------------------------- the runner


def recipe_input(recipe: Recipe) -> RecordSource:
    """The records a recipe's run reads, streamed from its input file (none without one)."""
    if recipe.input is None:
        return ListSource([])
    spec = recipe.input
    path = recipe.resolve(spec.path)
    return StreamSource(lambda: iter_records(path, spec.format, spec.limit, spec.fields))


def contract_problems(recipe: Recipe, records: RecordSource | None) -> list[str]:
    """What a run checks of a recipe before anything is spent, as messages: its stage order against the fields of
    `records` (its input; None or a recipe without input: no fields) and the variables of its templates."""
    from datatailor.stages.contract import check_recipe_order, check_templates

    problems = check_recipe_order(recipe.stages, records if recipe.input is not None else None, STAGES)
    return problems + check_templates(recipe.stages, STAGES, recipe.base_dir)


class Runner:
    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        *,
        force: bool = False,
        progress: RunProgress | None = None,
        cache: RequestCache | None = None,
        executor: Any = None,
    ):
        self.recipe = recipe
        self.executor = executor  # None: every stage in this process; else e.g. executors.ray_executor.RayExecutor
        self.out = Path(out_dir)
        self.force = force
        self.progress = progress or RunProgress(enabled=False)
        self._cache = cache
        self._stop: RunAbort | None = None
        self._deficits: dict[int, int] = {}  # extra round -> how many pairs the run was short before it

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
            if not self._killed_at_start():
                raise UserError(f"{self.out} exists and is not a datatailor run directory; choose another --out")
            for p in self.out.glob(".*.tmp"):  # half-written by the killed start
                p.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        return previous

    def _killed_at_start(self) -> bool:
        """The folder holds only what a run writes before its first manifest (recipe.json, or a half-written temp
        file of either): a run killed as it started, so it is ours to resume."""
        return all(p.is_file() and (p.name == "recipe.json" or (p.name.startswith((".recipe.json.", ".manifest.json."))
                                                               and p.name.endswith(".tmp")))
                   for p in self.out.iterdir())

    def _write_manifest(
        self, status: str, message: str, stages: list[dict[str, Any]], previous: dict[str, Any], started: str,
        count: bool = True, shortfall: dict[str, Any] | None = None, rounds: int = 1,
    ) -> None:
        manifest = {
            "recipe_name": self.recipe.name,
            "recipe_hash": self.recipe.content_hash(),
            "status": status,
            "message": message,
            "budget_pairs": self.recipe.budget_pairs,
            "shortfall": shortfall,
            "rounds": rounds,
            "stages": stages,
            "invocations": int(previous.get("invocations", 0)) + int(count),
            "first_started_at": previous.get("first_started_at", started),
            "started_at": started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        write_json(self.out / "manifest.json", manifest)

    def stage_dir(self, index: int) -> Path:
        return stage_dir(self.recipe, self.out, index)

    # -- main -------------------------------------------------------------------

    async def run(self) -> RunResult:
        # Read the input and check the recipe first: a bad input file or a stage order that cannot work
        # must fail before anything in --out is touched or spent.
        records = recipe_input(self.recipe)
        problems = contract_problems(self.recipe, records)  # also reads the whole input once: a bad line fails here
        if problems:
            raise UserError("the recipe cannot work; nothing was run:\n  " + "\n  ".join(problems))
        # Stages are built before the run directory is touched, so a stage's configuration error (e.g. no
        # budget_pairs for codec.decode) fails first; the model pool is bound to them below.
        stages = [self._build_stage(i) for i in range(len(self.recipe.stages))]
        previous = self._prepare_dir()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(self.out / "recipe.json", self.recipe.to_json())
        # "running" marks the folder as ours at once; a killed run leaves it so, and is resumed.
        self._write_manifest(STATUS_RUNNING, "in progress (if no process is running, it was killed: re-run to resume)", [], previous, started, count=False)
        usage_path = self.out / "usage.json"
        prev = json.loads(usage_path.read_text()) if usage_path.exists() else {}
        ledger = UsageLedger(UsageLedger.previous_from_json(prev), self.recipe.budget, UsageLedger.previous_stages_from_json(prev))
        self.ledger = ledger
        cache = self._cache
        if cache is None and self.recipe.cache is not False:
            cache = RequestCache(None if self.recipe.cache is True else self.recipe.resolve(str(self.recipe.cache)))
        pool = ModelPool(dict(self.recipe.models), ledger, cache, self.recipe.base_dir, seed=self.recipe.seed)
        for stage in stages:
            stage.ctx.models = pool
        self.progress.attach(ledger, [self.recipe.stage_name(i) for i in range(len(self.recipe.stages))])

        summaries: list[dict[str, Any]] = []
        status, message, rounds = STATUS_COMPLETE, "", 1
        try:
            with self.progress:
                records, summaries, rounds = await self._run_rounds(records, stages)
        except RunAbort as abort:
            status, message = abort.status, str(abort)
        except BaseException as exc:
            # Ctrl-C, a user error met mid-run (e.g. a missing model file) or a bug: record why,
            # keep the checkpoints, and leave the folder resumable by the same command.
            interrupted = isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))
            message = "interrupted by the user" if interrupted else f"stopped by an error: {exc}"
            self._finish(STATUS_INTERRUPTED, message, summaries, previous, started, ledger, None)
            await pool.aclose()
            raise
        finally:
            if cache is not None and self._cache is None:
                cache.close()
            if self.executor is not None:
                self.executor.close()
        await pool.aclose()
        shortfall = None
        if status == STATUS_COMPLETE:
            shortfall = self._shortfall(records, summaries, rounds)
            if shortfall is not None:
                status, message = STATUS_SHORTFALL, shortfall["message"]
        final = records if status in (STATUS_COMPLETE, STATUS_SHORTFALL) else None
        return self._finish(status, message, summaries, previous, started, ledger, final, shortfall, rounds)

    def save_usage(self) -> None:
        write_json(self.out / "usage.json", self.ledger.as_json())


    def _finish(self, status, message, summaries, previous, started, ledger, final: RecordSource | None,
                shortfall: dict[str, Any] | None = None, rounds: int = 1) -> RunResult:
        write_json(self.out / "usage.json", ledger.as_json())
        n_failures = 0
        if final is not None:
            if isinstance(final, JsonlSource):
                _copy_atomic(final.path, self.out / "data.jsonl")
            else:
                writer = RecordWriter(self.out / "data.jsonl", "the final records")
                for r in final:
                    writer.write(r)
                writer.close()
            n_failures = write_jsonl(self.out / "failures.jsonl", self._collect_failures())
            for fmt in self.recipe.output.formats:
                export_records(final, self.out / f"data.{fmt}.jsonl", fmt)
        self._write_manifest(status, message, summaries, previous, started, shortfall=shortfall, rounds=rounds)
        if final is not None:
            self._method_reports(summaries)
        return RunResult(status, self.out, len(final) if final is not None else 0, n_failures, message, ledger.as_json(), shortfall)

    def _method_reports(self, summaries: list[dict[str, Any]]) -> None:
        """Run-level reports of the methods the recipe used (e.g. REFED's), from the finished run directory.

        They read what the run wrote, so they come last; a report that fails leaves the data as it is and
        says so in the manifest."""
        from datatailor.stages.contract import method_report

        errors: list[str] = []
        for key in dict.fromkeys(s.get("method") for s in summaries):
            write = method_report(key)
            if write is None:
                continue
            try:
                write(self.out)
            except Exception as exc:  # the data is written; the report's failure is recorded, not hidden
                errors.append(f"{key} report: {type(exc).__name__}: {exc}")
        if errors:
            manifest = json.loads((self.out / "manifest.json").read_text(encoding="utf-8"))
            manifest["report_errors"] = errors
            write_json(self.out / "manifest.json", manifest)

    def _collect_failures(self) -> Iterable[dict[str, Any]]:
        """Every stage's failure rows, stage by stage, each in its input order (as complete stages keep them)."""
        for index in range(len(self.recipe.stages)):
            yield from iter_journal(self.stage_dir(index) / "failures.jsonl")

    # -- rounds -------------------------------------------------------------------

    async def _run_rounds(self, inputs: RecordSource, stages: list[Stage]) -> tuple[RecordSource, list[dict[str, Any]], int]:
        """Run every stage in order. When the run delivers fewer than `budget_pairs` and a stage can write
        more (`top_up_rounds`), run again: that stage writes more records and only they go through the
        later map stages (whole-set stages run again over the larger set). Stops at the stage's cap."""
        budget = self.recipe.budget_pairs
        topper = next((s for s in reversed(stages) if isinstance(s, BatchStage) and s.top_up_rounds() > 0), None)
        round = 1
        while True:
            records, summaries = inputs, []
            for index, stage in enumerate(stages):
                checkpoint = StageCheckpoint(self.stage_dir(index))
                try:
                    records, summary = await self._run_stage(index, stage, checkpoint, records, round if stage is topper else 1)
                finally:
                    checkpoint.close()
                summaries.append(summary)
                if self._stop is not None:
                    raise self._stop
            if budget is None or len(records) >= budget or topper is None or round > topper.top_up_rounds():
                return records, summaries, round
            round += 1
            self._deficits[round] = budget - len(records)

    def _build_stage(self, index: int) -> Stage:
        return build_stage(self.recipe, self.out, index)

    def _shortfall(self, final: RecordSource, summaries: list[dict[str, Any]], rounds: int) -> dict[str, Any] | None:
        """Which stage fell short of what was asked, by how much and why; None when everything was delivered."""
        for s in summaries:
            d = s.get("delivery")
            if d and d["delivered"] < d["asked"]:
                return {"stage": s["name"], "asked": d["asked"], "delivered": d["delivered"], "why": d["why"],
                        "message": f"{s['name']} delivered {d['delivered']} of {d['asked']}: {d['why']}"}
        budget = self.recipe.budget_pairs
        if budget is None or len(final) >= budget:
            return None
        lossy = [s for s in summaries if s["failures"]]
        if lossy:
            worst = max(lossy, key=lambda s: s["failures"])
            kinds = ", ".join(f"{k} {n}" for k, n in worst.get("failure_kinds", {}).items())
            why = f"{worst['name']} dropped {worst['failures']} of {worst['inputs']}" + (f" ({kinds})" if kinds else "")
        else:
            worst = summaries[0]
            why = (f"no record was dropped; the {worst['inputs']} input record(s) yielded only {len(final)} pairs "
                   "(give more input records, or ask each for more pairs)")
        if rounds > 1:
            why += f", after {rounds - 1} extra round(s) of {next(s['name'] for s in summaries if s.get('rounds', 1) > 1)}"
        return {"stage": worst["name"], "asked": budget, "delivered": len(final), "why": why,
                "message": f"the run delivered {len(final)} of budget_pairs={budget} pairs: {why}"}

    # -- one stage ----------------------------------------------------------------

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
            outputs, failures = self._compact_map(cp, inputs, name) if complete else (None, Counter())
        elif isinstance(stage, FilterStage):
            self.progress.stage_started(name, total=len(inputs))
            if self.executor is not None:
                outputs, failures = await self.executor.run_filter(self, stage, cp, inputs)
            else:
                outputs, failures = self._run_filter(stage, cp, inputs)
            complete = True
        elif isinstance(stage, BatchStage):
            self.progress.stage_started(name, total=len(inputs))
            outputs, failures, complete = await self._run_batch(stage, cp, inputs, digest, round)
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
        n = min(stage.config.concurrency, total - done)
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

    def _compact_map(self, cp: StageCheckpoint, inputs: RecordSource, name: str) -> tuple[RecordSource, Counter[str]]:
        """Write the finished stage's outputs to records.jsonl and its failures back to failures.jsonl, both in
        input order, checking that every input is accounted for exactly once. Returns the failure kinds."""
        cp.sync()
        outputs_at = IdIndex.of_journal(cp.outputs_path, "src")
        failures_at = IdIndex.of_journal(cp.failures_path, "id")
        writer = RecordWriter(cp.records_path, f"{name} outputs")
        failed = FailureWriter(cp)
        try:
            with cp.outputs_path.open("rb") as out_fh, cp.failures_path.open("rb") as fail_fh:
                for rid in inputs.ids():
                    offset = outputs_at.offset(rid)
                    if offset is not None:
                        row = read_row_at(out_fh, offset)
                        for r in row["records"]:
                            writer.write_line(r["id"], json.dumps(r, ensure_ascii=False) + "\n")
                        continue
                    offset = failures_at.offset(rid)
                    if offset is None:
                        raise RuntimeError(f"stage {name}: input {rid} has neither an output nor a failure row")
                    failed.write(read_row_at(fail_fh, offset))
        except BaseException:
            writer.abort()
            failed.abort()
            raise
        del outputs_at, failures_at
        return writer.close(), failed.close()

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
                    failed.write(_failure_row(record, stage.name, why[0], why[1]))
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
                rejected.append(_failure_row(by_id[rid], stage.name, kind, message))
            _check_unique(result.outputs, stage.name + " outputs")
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
                _check_unique(outputs + more, f"{stage.name} round {extra} outputs")
                cp.add_round(extra, more)
            outputs += cp.round_records(extra)
        for _ in records:
            self.progress.advance(stage.name)
        writer = RecordWriter(cp.records_path, f"{stage.name} outputs")
        for r in outputs:
            writer.write(r)
        return writer.close(), failures, True


def _check_unique(records: list[Record], where: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise RuntimeError(f"duplicate record id {r.id} in {where}; a stage must give derived records distinct ids")
        seen.add(r.id)


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _versions() -> dict[str, str]:
    import pydantic

    return {"datatailor": __version__, "python": platform.python_version(), "pydantic": pydantic.VERSION}


async def run_recipe(recipe: Recipe, out_dir: str | Path, *, force: bool = False, show_progress: bool | None = None,
                     cache: RequestCache | None = None, executor: Any = None) -> RunResult:
    progress = RunProgress(enabled=show_progress)
    return await Runner(recipe, Path(out_dir), force=force, progress=progress, cache=cache, executor=executor).run()


def run_recipe_sync(recipe: Recipe, out_dir: str | Path, **kwargs: Any) -> RunResult:
    return asyncio.run(run_recipe(recipe, out_dir, **kwargs))
