"""The run loop: check the recipe, prepare the run directory, run the stages (in rounds), write the results.

A run, step by step (`Runner.run`):

1. Read the input and check the recipe against it (stage order, templates) before anything is touched or spent.
2. Build the stages, then prepare the run directory: resume the same recipe's run, refuse another recipe's.
3. Mark the run `running` in its manifest, and bind the models (cache, usage ledger, budget) to the stages.
4. Run the stages in order, round after round while the run is short and a stage can top up (`runner.rounds`);
   each stage checkpoints as records finish (`runner.stage_exec`, `runner.checkpoint`).
5. Write data.jsonl, failures.jsonl, usage, the manifest (complete, shortfall, interrupted, budget_exhausted) and
   the methods' reports (`runner.manifest`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datatailor.errors import RunAbort
from datatailor.io import write_json
from datatailor.llm.cache import RequestCache
from datatailor.llm.models import ModelPool
from datatailor.llm.spend_log import SpendLog, account, base_of, log_name, spend_logs, usage_json, writer_name
from datatailor.llm.usage import UsageLedger
from datatailor.progress import RunProgress
from datatailor.recipe import Recipe
from datatailor.runner.manifest import RunDirectory
from datatailor.runner.result import STATUS_COMPLETE, STATUS_INTERRUPTED, STATUS_RUNNING, STATUS_SHORTFALL, RunResult
from datatailor.runner.rounds import run_rounds, shortfall
from datatailor.runner.stage_exec import StageExecution, build_stage, stage_dir
from datatailor.stages import Stage
from datatailor.errors import UserError
from datatailor.storage import RunStore, is_url


class Runner(StageExecution):
    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path | str,
        *,
        force: bool = False,
        progress: RunProgress | None = None,
        cache: RequestCache | None = None,
        executor: Any = None,
    ):
        self.recipe = recipe
        self.executor = executor  # None: every stage in this process; else e.g. executors.ray_executor.RayExecutor
        # --out may be a URL (s3://…): then the runner works in a local staging folder mirrored to it (`runner.remote`)
        self.remote: Any = None
        if is_url(out_dir):
            from datatailor.runner.remote import StagedRun

            self.remote = StagedRun(str(out_dir))
            self.out = self.remote.local
        else:
            self.out = Path(out_dir)
        self.location = str(out_dir).rstrip("/") if self.remote else str(self.out)  # what the user named
        self.store = self.remote.store if self.remote else RunStore(self.out)  # where workers read and write
        self.invocation = uuid.uuid4().hex[:10]  # names this process's spend log, and its workers'
        self.resumed: dict[str, int] = {}  # stage -> inputs finished by earlier invocations (skipped)
        self.force = force
        self.progress = progress or RunProgress(enabled=False)
        self.run_dir = RunDirectory(recipe, self.out)
        self._cache = cache
        self._stop: RunAbort | None = None
        self._deficits: dict[int, int] = {}  # extra round -> how many pairs the run was short before it

    def stage_dir(self, index: int) -> Path:
        return stage_dir(self.recipe, self.out, index)

    async def run(self) -> RunResult:
        from datatailor.runner import contract_problems, recipe_input

        # 1. A bad input file or a stage order that cannot work fails before anything in --out is touched or spent.
        records = recipe_input(self.recipe)
        problems = contract_problems(self.recipe, records)  # also reads the whole input once: a bad line fails here
        if problems:
            raise UserError("the recipe cannot work; nothing was run:\n  " + "\n  ".join(problems))
        # 2. A stage's configuration error (e.g. no budget_pairs for codec.decode) fails before the folder is touched.
        stages = [build_stage(self.recipe, self.out, i) for i in range(len(self.recipe.stages))]
        if self.remote is not None:
            self.run_dir.notes["storage"] = {"out": self.location, "staging": self.remote.pull()}
        previous = self.run_dir.prepare(self.force)
        if self.remote is not None and self.run_dir.discarded:  # what workers wrote to the store for the discarded run
            for prefix in ("stages", "usage"):
                self.store.delete(prefix)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(self.out / "recipe.json", self.recipe.to_json())
        # 3. "running" marks the folder as ours at once; a killed run leaves it so, and is resumed.
        self.run_dir.write_manifest(STATUS_RUNNING, "in progress (if no process is running, it was killed: re-run to resume)",
                                    [], previous, started, count=False)
        self.ledger = ledger = self._ledger()
        cache = self._cache
        if cache is None and self.recipe.cache is not False:
            cache = RequestCache(None if self.recipe.cache is True else self.recipe.resolve(str(self.recipe.cache)))
        pool = self._bind_models(stages, ledger, cache)

        # 4. The stages, in rounds.
        summaries: list[dict[str, Any]] = []
        status, message, rounds = STATUS_COMPLETE, "", 1
        syncing = asyncio.create_task(self._sync_remote()) if self.remote is not None else None
        try:
            with self.progress:
                records, summaries, rounds = await run_rounds(self, records, stages)
        except RunAbort as abort:
            status, message = abort.status, str(abort)
        except BaseException as exc:
            # Ctrl-C, a user error met mid-run (e.g. a missing model file) or a bug: record why,
            # keep the checkpoints, and leave the folder resumable by the same command.
            interrupted = isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))
            message = "interrupted by the user" if interrupted else f"stopped by an error: {exc}"
            self._close_log()
            self.run_dir.finish(STATUS_INTERRUPTED, message, summaries, previous, started, self.usage(), None)
            await pool.aclose()
            self.push_remote()
            raise
        finally:
            if syncing is not None:
                syncing.cancel()
            if cache is not None and self._cache is None:
                cache.close()
            if self.executor is not None:
                self.executor.close()
        await pool.aclose()

        # 5. The results.
        missing = None
        if status == STATUS_COMPLETE:
            missing = shortfall(records, summaries, self.recipe.budget_pairs, rounds)
            if missing is not None:
                status, message = STATUS_SHORTFALL, missing["message"]
        final = records if status in (STATUS_COMPLETE, STATUS_SHORTFALL) else None
        self._close_log()
        result = self.run_dir.finish(status, message, summaries, previous, started, self.usage(), final, missing, rounds)
        self.push_remote()
        if self.remote is not None:
            result.out_dir = self.location  # type: ignore[assignment]  # the URL the user gave, not the staging folder
        return result

    def _ledger(self) -> UsageLedger:
        """This invocation's usage ledger, carrying the totals of the earlier invocations of the same run (from
        their spend logs), and writing its own spend log as calls are made."""
        from datatailor.executors.spool import adopt_orphans

        if self.remote is not None:
            adopt_orphans(self.store, self.location)  # spend and parts left on this machine by killed workers
        usage_path = self.out / "usage.json"
        prev = json.loads(usage_path.read_text()) if usage_path.exists() else {}
        self._usage_base = base_of(prev)
        _, total = account(spend_logs(self.out, self.store if self.remote else None), self.invocation, self._usage_base)
        ledger = UsageLedger(total.roles, self.recipe.budget, total.stages)
        if total.unaccounted:
            self.note(f"earlier invocations left up to {total.unaccounted} request(s) in flight when they were killed: "
                      "the server may have answered them; usage.json counts them as unaccounted_requests")
        ledger.log = SpendLog(self.out / log_name(self.invocation, writer_name()))
        return ledger

    def usage(self) -> dict[str, Any]:
        """usage.json from the spend logs: this invocation's (the driver's and its workers'), and every invocation's."""
        logs = spend_logs(self.out, self.store if self.remote else None)
        run, total = account(logs, self.invocation, self._usage_base)
        return usage_json(run, total, self._usage_base)

    def _close_log(self) -> None:
        if getattr(self, "ledger", None) is not None and self.ledger.log is not None:
            self.ledger.log.close()

    def note(self, message: str) -> None:
        """Something the user should know (a resume's skipped records, a lost node): printed, and kept in the manifest."""
        self.run_dir.notes.setdefault("log", []).append(message)
        print(f"datatailor: {message}", file=self.progress.stream, flush=True)  # rare and wanted, even with --no-progress

    def count_finished(self, name: str, cp: Any, inputs: Any) -> tuple[int, int]:
        total, done = super().count_finished(name, cp, inputs)
        if done and name not in self.resumed:
            self.resumed[name] = done
            self.run_dir.notes["resumed"] = dict(self.resumed)
            self.note(f"resuming {name}: {done:,} of {total:,} records were finished by earlier invocations; skipped")
        elif name not in self.resumed:
            self.resumed[name] = 0
        return total, done

    async def _sync_remote(self) -> None:
        """Mirror the staging folder to --out every `sync_s` seconds while the run goes on."""
        while True:
            await asyncio.sleep(self.remote.sync_s)
            await asyncio.to_thread(self.remote.push)

    def push_remote(self) -> None:
        if self.remote is not None:
            self.remote.push()

    def _bind_models(self, stages: list[Stage], ledger: UsageLedger, cache: RequestCache | None) -> ModelPool:
        pool = ModelPool(dict(self.recipe.models), ledger, cache, self.recipe.base_dir, seed=self.recipe.seed,
                         run_dir=self.out, on_batch_change=self.progress.refresh)  # batched roles keep out/batches
        for stage in stages:
            stage.ctx.models = pool
        self.progress.attach(ledger, [self.recipe.stage_name(i) for i in range(len(self.recipe.stages))], batches=pool.batch_summary)
        return pool

    def save_usage(self) -> None:
        write_json(self.out / "usage.json", self.usage())


async def run_recipe(recipe: Recipe, out_dir: str | Path, *, force: bool = False, show_progress: bool | None = None,
                     cache: RequestCache | None = None, executor: Any = None) -> RunResult:
    progress = RunProgress(enabled=show_progress)
    out = str(out_dir) if is_url(out_dir) else Path(out_dir)
    return await Runner(recipe, out, force=force, progress=progress, cache=cache, executor=executor).run()


def run_recipe_sync(recipe: Recipe, out_dir: str | Path, **kwargs: Any) -> RunResult:
    return asyncio.run(run_recipe(recipe, out_dir, **kwargs))
