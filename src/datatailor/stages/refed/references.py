"""`refed.references`: draw references from any pair dataset, uniformly without replacement, only as many as the
data budget needs (the last one asked for only the pairs still needed); draw more (the next ones in the order, then
a new pass) when the run ends short."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from datatailor.errors import UserError
from datatailor.records import LineageEvent, Record, stable_hash
from datatailor.stages.base import BatchResult, BatchStage, StageConfig, register
from datatailor.stages.refed.data import RefedData


class ReferencesConfig(StageConfig):
    type: Literal["refed.references"] = "refed.references"
    count: int | None = Field(
        None, ge=1, description="References to draw first; default ceil(budget_pairs / pairs_per_reference)."
    )
    pairs_per_reference: int = Field(
        20, ge=1,
        description="Pairs one reference yields when nothing fails: features × instructions per feature (the paper: 2 × 10).",
    )
    top_up_rounds: int = Field(
        3, ge=0, description="When the run ends short of budget_pairs, draw more references, at most this many extra rounds."
    )


@register("refed.references")
class References(BatchStage[ReferencesConfig]):
    """Draw REFED references (Mehri et al., arXiv 2502.04511) from the input pairs.

    Single-turn pairs with a response are references; a multi-turn conversation is a `multi_turn` failure row and
    a pair without a response a `no_response` one (the paper keeps single-turn pairs only). References are drawn
    uniformly without replacement with the recipe's seed; one is used again only once every reference has been
    (a new pass, in a new order). Only as many are drawn as the data budget needs, and each carries the number of
    pairs asked of it (`quota`): `pairs_per_reference`, and for the last one only what the budget still needs
    (budget 24 at 20 per reference: 20, then 4). When the run ends short, the runner asks for top-up rounds, which
    draw the next ones for the pairs still missing, at the rate pairs were kept so far.

    The input is a pool, not a list to process: an input row is a failure row (not a reference), or a reference that
    was drawn, or one that was not needed and stays in the input file only. The REFED report counts the three.
    """

    Config = ReferencesConfig
    method = "refed"
    needs = ("instruction", "response")
    provides = ("refed.reference",)

    def __init__(self, config: ReferencesConfig, ctx: Any):
        super().__init__(config, ctx)
        if config.count is None and ctx.budget_pairs is None:
            raise UserError("refed.references: set `budget_pairs` in the recipe or `count` in the stage")

    def _usable(self, records: list[Record]) -> tuple[list[Record], dict[str, tuple[str, str]]]:
        usable: list[Record] = []
        rejected: dict[str, tuple[str, str]] = {}
        for r in records:
            turns = r.metadata.get("turns")
            if isinstance(turns, list) and len(turns) > 2:
                rejected[r.id] = ("multi_turn", f"a conversation of {len(turns)} turns is not a reference: REFED uses single-turn pairs")
            elif not (r.response or "").strip():
                rejected[r.id] = ("no_response", "a reference needs a response")
            else:
                usable.append(r)
        return usable, rejected

    def _order(self, usable: list[Record], draw_pass: int) -> list[Record]:
        order = list(usable)
        self.ctx.rng("draw", draw_pass).shuffle(order)
        return order

    def _draw(self, usable: list[Record], start: int, quotas: list[int | None]) -> list[Record]:
        """References at positions start, start+1, … of the draw, one per quota: pass after pass, each a new seeded
        order."""
        out: list[Record] = []
        orders: dict[int, list[Record]] = {}
        for position, quota in enumerate(quotas, start):
            draw_pass, index = position // len(usable) + 1, position % len(usable)
            source = orders.setdefault(draw_pass, self._order(usable, draw_pass))[index]
            ref_id = source.id if draw_pass == 1 else stable_hash(source.id, "refed.pass", draw_pass)
            reference = source.model_copy(deep=True, update={"id": ref_id, "parents": [source.id] if draw_pass > 1 else source.parents})
            data = RefedData(reference_id=source.id, reference_instruction=source.prompt, reference_response=source.response or "",
                             draw=position, draw_pass=draw_pass, quota=quota)
            reference.metadata = data.stored(reference)
            reference.lineage.append(LineageEvent(stage=self.name, decision="drawn", details={"draw": position, "pass": draw_pass, "quota": quota}))
            out.append(reference)
        return out

    def _quotas(self, pairs: int) -> list[int | None]:
        """Pairs to ask of each reference so that they add up to `pairs`: full ones, then the remainder."""
        full, rest = divmod(pairs, self.config.pairs_per_reference)
        return [self.config.pairs_per_reference] * full + ([rest] if rest else [])

    async def process_all(self, records: list[Record]) -> BatchResult:
        usable, rejected = self._usable(records)
        if not usable:
            raise UserError(f"{self.name}: none of the {len(records)} input rows is a single-turn pair with a response")
        quotas = [None] * self.config.count if self.config.count else self._quotas(self.ctx.budget_pairs or 0)
        return BatchResult(outputs=self._draw(usable, 0, quotas), rejected=rejected)

    def top_up_rounds(self) -> int:
        return self.config.top_up_rounds

    async def top_up(self, records: list[Record], produced: list[Record], deficit: int, round: int) -> list[Record]:
        """References for `deficit` more pairs at the rate the run kept pairs so far (pairs kept per pair asked of the
        references drawn; at least one per reference, so a round that kept nothing still draws)."""
        usable, _ = self._usable(records)
        kept = max(0, (self.ctx.budget_pairs or 0) - deficit)
        asked = sum(self._asked(r) for r in produced)
        pairs = deficit * self.config.pairs_per_reference  # the floor: one kept pair per reference
        if kept and asked:
            pairs = min(pairs, -(-deficit * asked // kept))  # deficit / (kept / asked), rounded up
        return self._draw(usable, len(produced), self._quotas(pairs))

    def _asked(self, reference: Record) -> int:
        data = RefedData.of(reference)
        return data.quota if data is not None and data.quota is not None else self.config.pairs_per_reference
