"""Rounds and top-up: when a run delivers fewer than `budget_pairs`, a stage that can write more is asked to.

The first round runs every stage in order. If the final stage's output is short of `budget_pairs` and a batch
stage can top up (`BatchStage.top_up_rounds() > 0`, e.g. CodecLM's decoder or REFED's reference draw), the run
goes round again: that stage writes more records (its checkpoint keeps one row per extra round), only they go
through the later map stages, and whole-set stages run again over the larger set. It stops at the stage's cap.
A run still short after that ends as `shortfall`, and `shortfall` says which stage fell short, by how much, why.

A trim to the budget (`select`, `codec.select`) that stands before stages that dropped pairs (a judge filter,
`filter.rouge`, `dedup`, or failures) caps what those stages see at `budget_pairs`, so no top-up could ever get
past it. Once a run is short for that reason, the trim runs after those stages from then on (their decisions
are checkpointed, so nothing is asked twice): first over the pairs it had trimmed away, without a top-up, then
in the top-up rounds. The run then delivers exactly `budget_pairs` as with the trim written last.

A resumed or repeated run goes on from the last round the top-up stage wrote, in the order the stages last ran
(`RAN_LAST` marks a moved trim), so every stage sees at once the inputs it last had: its `done.json` matches and
nothing is asked again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datatailor.runner.checkpoint import StageCheckpoint
from datatailor.stages import BatchStage, Stage
from datatailor.store import RecordSource

if TYPE_CHECKING:
    from datatailor.runner.run import Runner

NOT_A_LOSS = ("over_budget",)  # a trim's drops: never why a run is short
RAN_LAST = ".ran_last"  # in a trim's stage folder once it runs after the stages that drop pairs (read on resume)


def top_up_stage(stages: list[Stage]) -> BatchStage | None:
    """The last stage that can write more records when the run is short, if any."""
    return next((s for s in reversed(stages) if isinstance(s, BatchStage) and s.top_up_rounds() > 0), None)


def trims_before_losses(stages: list[Stage], order: list[int], summaries: dict[int, dict[str, Any]]) -> list[int]:
    """The trims to the budget that ran before stages that dropped pairs (stage indices, in the order they ran)."""
    return [i for pos, i in enumerate(order) if stages[i].trims_to_budget and any(lost(summaries[j]) for j in order[pos + 1:])]


def lost(summary: dict[str, Any]) -> int:
    """How many of its inputs a stage dropped, not counting a trim's `over_budget` rows."""
    return summary["failures"] - sum(summary.get("failure_kinds", {}).get(k, 0) for k in NOT_A_LOSS)


async def run_rounds(runner: Runner, inputs: RecordSource, stages: list[Stage]) -> tuple[RecordSource, list[dict[str, Any]], int]:
    """Run every stage, round after round while the run is short and a stage can top up.
    Returns the final records, each stage's summary of the last round (in recipe order), and the number of rounds."""
    budget = runner.recipe.budget_pairs
    topper = top_up_stage(stages)
    # Replaying from round 1 would show the stages after the top-up stage fewer inputs than they had, and their
    # compaction would drop the failure rows of the others, which the next round would then pay for again.
    round = recorded_rounds(runner, stages, topper)
    ran_last = {i for i in range(len(stages)) if (runner.stage_dir(i) / RAN_LAST).exists()}
    order = [i for i in range(len(stages)) if i not in ran_last] + sorted(ran_last)
    while True:
        records, summaries = await run_pass(runner, inputs, stages, order, topper, round)
        if budget is None or len(records) >= budget:
            break
        moving = trims_before_losses(stages, order, summaries)
        moved = [i for i in order if i not in moving] + moving
        if moved != order:  # each trim moves once: after this, nothing that drops pairs stands after it
            order = moved
            ran_last.update(moving)
            for i in moving:
                (runner.stage_dir(i) / RAN_LAST).touch()
            if any(summaries[i]["failure_kinds"].get("over_budget") for i in moving):
                continue  # first the pairs the trim left out go through the stages after it, without a top-up
        if topper is None or round > topper.top_up_rounds():
            break
        round += 1
        runner._deficits[round] = budget - len(records)
    for i in ran_last:
        summaries[i]["ran_last"] = "the stages after it dropped pairs, so it ran after them once the run was short"
    return records, [summaries[i] for i in range(len(stages))], round


def recorded_rounds(runner: Runner, stages: list[Stage], topper: BatchStage | None) -> int:
    """1 + the extra rounds the top-up stage's checkpoint holds (1 for a new run)."""
    if topper is None:
        return 1
    checkpoint = StageCheckpoint(runner.stage_dir(stages.index(topper)))
    try:
        return max(checkpoint.rounds, default=1)
    finally:
        checkpoint.close()


async def run_pass(runner: Runner, inputs: RecordSource, stages: list[Stage], order: list[int], topper: BatchStage | None,
                   round: int) -> tuple[RecordSource, dict[int, dict[str, Any]]]:
    """One pass over the stages in `order`; the summaries by stage index."""
    records, summaries = inputs, {}
    for index in order:
        stage = stages[index]
        checkpoint = StageCheckpoint(runner.stage_dir(index))
        try:
            records, summaries[index] = await runner._run_stage(index, stage, checkpoint, records, round if stage is topper else 1)
        finally:
            checkpoint.close()
        if runner._stop is not None:
            raise runner._stop
    return records, summaries


def shortfall(final: RecordSource, summaries: list[dict[str, Any]], budget: int | None, rounds: int) -> dict[str, Any] | None:
    """Which stage fell short of what was asked, by how much and why; None when everything was delivered."""
    for s in summaries:
        d = s.get("delivery")
        if d and d["delivered"] < d["asked"]:
            return {"stage": s["name"], "asked": d["asked"], "delivered": d["delivered"], "why": d["why"],
                    "message": f"{s['name']} delivered {d['delivered']} of {d['asked']}: {d['why']}"}
    if budget is None or len(final) >= budget:
        return None
    lossy = [s for s in summaries if lost(s)]
    if lossy:
        worst = max(lossy, key=lost)
        kinds = ", ".join(f"{k} {n}" for k, n in worst.get("failure_kinds", {}).items() if k not in NOT_A_LOSS)
        why = f"{worst['name']} dropped {lost(worst)} of {worst['inputs']}" + (f" ({kinds})" if kinds else "")
    else:
        worst = summaries[0]
        why = (f"no record was dropped; the {worst['inputs']} input record(s) yielded only {len(final)} pairs "
               "(give more input records, or ask each for more pairs)")
    if rounds > 1:
        why += f", after {rounds - 1} extra round(s) of {next(s['name'] for s in summaries if s.get('rounds', 1) > 1)}"
    return {"stage": worst["name"], "asked": budget, "delivered": len(final), "why": why,
            "message": f"the run delivered {len(final)} of budget_pairs={budget} pairs: {why}"}
