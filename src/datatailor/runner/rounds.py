"""Rounds and top-up: when a run delivers fewer than `budget_pairs`, a stage that can write more is asked to.

The first round runs every stage in order. If the final stage's output is short of `budget_pairs` and a batch
stage can top up (`BatchStage.top_up_rounds() > 0`, e.g. CodecLM's decoder or REFED's reference draw), the run
goes round again: that stage writes more records (its checkpoint keeps one row per extra round), only they go
through the later map stages, and whole-set stages run again over the larger set. It stops at the stage's cap.
A run still short after that ends as `shortfall`, and `shortfall` says which stage fell short, by how much, why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datatailor.runner.checkpoint import StageCheckpoint
from datatailor.stages import BatchStage, Stage
from datatailor.store import RecordSource

if TYPE_CHECKING:
    from datatailor.runner.run import Runner


def top_up_stage(stages: list[Stage]) -> BatchStage | None:
    """The last stage that can write more records when the run is short, if any."""
    return next((s for s in reversed(stages) if isinstance(s, BatchStage) and s.top_up_rounds() > 0), None)


async def run_rounds(runner: Runner, inputs: RecordSource, stages: list[Stage]) -> tuple[RecordSource, list[dict[str, Any]], int]:
    """Run every stage in order, round after round while the run is short and a stage can top up.
    Returns the final records, each stage's summary of the last round, and the number of rounds."""
    budget = runner.recipe.budget_pairs
    topper = top_up_stage(stages)
    round = 1
    while True:
        records, summaries = inputs, []
        for index, stage in enumerate(stages):
            checkpoint = StageCheckpoint(runner.stage_dir(index))
            try:
                records, summary = await runner._run_stage(index, stage, checkpoint, records, round if stage is topper else 1)
            finally:
                checkpoint.close()
            summaries.append(summary)
            if runner._stop is not None:
                raise runner._stop
        if budget is None or len(records) >= budget or topper is None or round > topper.top_up_rounds():
            return records, summaries, round
        round += 1
        runner._deficits[round] = budget - len(records)


def shortfall(final: RecordSource, summaries: list[dict[str, Any]], budget: int | None, rounds: int) -> dict[str, Any] | None:
    """Which stage fell short of what was asked, by how much and why; None when everything was delivered."""
    for s in summaries:
        d = s.get("delivery")
        if d and d["delivered"] < d["asked"]:
            return {"stage": s["name"], "asked": d["asked"], "delivered": d["delivered"], "why": d["why"],
                    "message": f"{s['name']} delivered {d['delivered']} of {d['asked']}: {d['why']}"}
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
