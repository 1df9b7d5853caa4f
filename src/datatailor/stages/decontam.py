"""`decontam`: drop pairs that overlap test sets, each with the item and the evidence."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datatailor.errors import Rejected
from datatailor.evaluate.decontam import ContaminationIndex, DecontamSettings, record_text, testset_items
from datatailor.records import LineageEvent, Record
from datatailor.stages.base import MapStage, StageConfig, StageContext, register


class DecontamConfig(StageConfig):
    type: Literal["decontam"] = "decontam"
    testsets: list[str] = Field(
        ..., min_length=1,
        description="Test sets by name (vicuna80, selfinstruct252, mtbench, coachlm150), alpacaeval:PATH, or a path.",
    )
    n: int = Field(13, ge=1, description="Word n-gram length of the overlap check.")
    containment: float = Field(0.8, gt=0.0, le=1.0, description="Share of a test item's k-grams in the pair that flags it.")
    containment_n: int = Field(3, ge=1, description="k of the containment check.")
    include_response: bool = Field(False, description="Also look for test items in the responses.")


@register("decontam")
class Decontam(MapStage[DecontamConfig]):
    """Drop every pair that shares a word n-gram (default 13) with a test item, or contains most of a short
    item's word 3-grams (the check of `datatailor export --decontaminate`); the failure row names the test set,
    the item and the evidence. A map over records: the test sets' index is built once per process, so
    `--executor ray` spreads it like any map stage."""

    Config = DecontamConfig

    def __init__(self, config: DecontamConfig, ctx: StageContext):
        super().__init__(config, ctx)
        settings = DecontamSettings(n=config.n, containment=config.containment, containment_n=config.containment_n,
                                    include_response=config.include_response)
        # built here, before the run touches anything: an unknown test set fails the run at once
        self.index = ContaminationIndex(testset_items(config.testsets), settings)

    async def process(self, record: Record) -> list[Record]:
        matches = self.index.matches(record_text(record, self.config.include_response))
        if matches:
            described = "; ".join(self._describe(m) for m in matches[:3]) + (f"; and {len(matches) - 3} more" if len(matches) > 3 else "")
            raise Rejected(f"overlaps the test set: {described}", kind="contaminated")
        return [record.with_event(LineageEvent(stage=self.name, decision="kept",
                                               reason=f"no overlap with {', '.join(self.config.testsets)}"))]

    def _describe(self, match: tuple[int, str, str, float]) -> str:
        idx, kind, evidence, _ = match
        item = self.index.items[idx]
        return f"{item.testset} item {item.item_id} ({kind}: {evidence!r})"

    @classmethod
    def contract(cls, config: Any):  # needs a response only when responses are checked
        from datatailor.stages.contract import Contract

        return Contract.of(needs=["response"] if config is not None and config.include_response else [])
