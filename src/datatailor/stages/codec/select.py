"""`codec.select`: trim the kept pairs to exactly the data budget."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datatailor.errors import UserError
from datatailor.records import Record
from datatailor.stages.base import BatchResult, BatchStage, StageConfig, register
from datatailor.stages.codec.data import CodecData


class SelectConfig(StageConfig):
    type: Literal["codec.select"] = "codec.select"
    budget_pairs: int | None = Field(None, ge=1, description="How many to keep; default the recipe's budget_pairs.")
    strategy: Literal["spread", "gap", "random"] = Field(
        "spread",
        description=(
            "spread: round-robin over metadata entries (largest |G| first within an entry), keeping coverage; "
            "gap: largest |G| overall; random: a seeded sample."
        ),
    )


def abs_gap(record: Record) -> float:
    data = CodecData.of(record)
    gap = data.contrastive.G if data is not None and data.contrastive is not None else None
    return abs(gap) if isinstance(gap, (int, float)) else 0.0


def group_of(record: Record) -> str:
    """What `spread` keeps coverage over: the metadata entry, else the seed the record came from."""
    data = CodecData.of(record)
    if data is not None and data.entry_id:
        return data.entry_id
    return record.parents[0] if record.parents else record.id


class Select(BatchStage[SelectConfig]):
    """Trim to exactly `budget_pairs` when more were kept; the order of the kept records is unchanged.

    Works on any method's pairs (spread then groups by the seed each pair came from)."""

    trims_to_budget = True

    Config = SelectConfig

    def __init__(self, config: SelectConfig, ctx):
        super().__init__(config, ctx)
        if config.budget_pairs is None and ctx.budget_pairs is None:
            raise UserError("codec.select: set `budget_pairs` in the recipe or in the stage")

    async def process_all(self, records: list[Record]) -> BatchResult:
        cfg = self.config
        budget = cfg.budget_pairs or self.ctx.budget_pairs
        assert budget is not None
        if len(records) <= budget:
            return BatchResult(outputs=list(records))
        order = list(range(len(records)))
        if cfg.strategy == "gap":
            order.sort(key=lambda i: (-abs_gap(records[i]), i))
        elif cfg.strategy == "random":
            self.ctx.rng("select").shuffle(order)
        else:
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(records):
                groups.setdefault(group_of(r), []).append(i)
            queues = [sorted(ids, key=lambda i: (-abs_gap(records[i]), i)) for ids in groups.values()]
            order = []
            while any(queues):
                for q in queues:
                    if q:
                        order.append(q.pop(0))
        chosen = set(order[:budget])
        reason = f"trimmed to budget_pairs={budget} by the {cfg.strategy} strategy"
        return BatchResult(
            outputs=[r for i, r in enumerate(records) if i in chosen],
            rejected={r.id: ("over_budget", reason) for i, r in enumerate(records) if i not in chosen},
        )


@register("codec.select")
class CodecSelect(Select):
    """CodecLM's final selection: trim the pairs Contrastive Filtering kept to exactly `budget_pairs` (the paper
    compares methods at equal size); `spread` keeps every metadata entry represented."""

    method = "codec"


class BudgetSelectConfig(SelectConfig):
    type: Literal["select"] = "select"  # type: ignore[assignment]


@register("select")
class BudgetSelect(Select):
    """Trim any method's pairs to exactly `budget_pairs` (the same rules as `codec.select`, for baselines and other
    methods: `spread` groups by the seed each pair came from)."""

    Config = BudgetSelectConfig

