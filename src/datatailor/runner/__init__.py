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

The run directory's files are listed in `runner.manifest`.

The parts, each its own module:

    run.py         the run loop (`Runner.run`), step by step
    stage_exec.py  one stage over its inputs: map (bounded concurrency), filter (streamed), batch
    checkpoint.py  a stage's journals, and their compaction into input order when it completes
    rounds.py      rounds and top-up when the run is short of `budget_pairs`; the shortfall message
    probe.py       the systematic-failure probe (the first records all failing the same way stop the run)
    manifest.py    the run directory: preparing it, the manifest, the final files and the methods' reports
    result.py      statuses and `RunResult`

Memory: records stream from file to file. A map stage reads its input in order and keeps at most a few
times `concurrency` records in flight; what it keeps per record is a 16-byte digest of the id (finished
ids, and where each output row starts in the journal when the outputs are put back in input order).
Whole-set stages that only keep or drop records (`FilterStage`: dedup, filter.rouge) stream too; the
others (the LLM-heavy methods' batch stages) get their input as a list.
"""

from __future__ import annotations

from datatailor.io import iter_records
from datatailor.recipe import Recipe
from datatailor.stages import STAGES
from datatailor.store import ListSource, RecordSource, StreamSource


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


# The run loop and its parts import the two functions above, so they come after them.
from datatailor.runner.checkpoint import FailureWriter, StageCheckpoint, failure_row  # noqa: E402
from datatailor.runner.probe import SystematicFailureProbe  # noqa: E402
from datatailor.runner.result import (  # noqa: E402
    STATUS_BUDGET,
    STATUS_COMPLETE,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    STATUS_SHORTFALL,
    RunResult,
)
from datatailor.runner.run import Runner, run_recipe, run_recipe_sync  # noqa: E402
from datatailor.runner.stage_exec import build_stage, process_record, stage_dir  # noqa: E402

__all__ = [
    "STATUS_BUDGET", "STATUS_COMPLETE", "STATUS_INTERRUPTED", "STATUS_RUNNING", "STATUS_SHORTFALL",
    "FailureWriter", "RunResult", "Runner", "StageCheckpoint", "SystematicFailureProbe",
    "build_stage", "contract_problems", "failure_row", "process_record", "recipe_input", "run_recipe",
    "run_recipe_sync", "stage_dir",
]
