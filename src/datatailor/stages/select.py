"""Selection stages: exact and near-duplicate removal (MinHash LSH), and the ROUGE-L novelty filter.

Both only keep or drop records, so they are `FilterStage`s: they decide from compact keys (text digests and
signatures; the compared texts) and stream over the input instead of holding its records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from datatailor.records import LineageEvent, Record
from datatailor.scoring.dedup import EXACT, GreedyDedup, normalise, shingles
from datatailor.stages.base import Decision, FilterStage, StageConfig, register
from datatailor.stages.contract import Contract

if TYPE_CHECKING:
    from datatailor.store import RecordSource

__all__ = ["Dedup", "RougeFilter", "dedup_text", "normalise", "shingles"]


def dedup_text(record: Record, compare: str) -> str:
    if compare == "instruction":
        return record.instruction
    if compare == "response":
        return record.response or ""
    if compare == "pair":
        return f"{record.prompt}\n{record.response or ''}"
    return record.prompt


class DedupConfig(StageConfig):
    type: Literal["dedup"] = "dedup"
    # Not named `on`: YAML 1.1 reads a bare `on:` key as the boolean true.
    compare: Literal["instruction", "prompt", "response", "pair"] = Field(
        "prompt", description="Which text is compared: instruction, instruction+input, response, or all."
    )
    exact: bool = Field(True, description="Drop exact duplicates (after lower-casing and collapsing punctuation).")
    near: bool = Field(True, description="Drop near duplicates by MinHash LSH.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Estimated Jaccard similarity that counts as near-duplicate.")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_words: int = Field(3, ge=1, le=10)


@register("dedup")
class Dedup(FilterStage[DedupConfig]):
    """Keep the first of each group of exact or near-duplicate records; drop the rest with a reason.

    Greedy in input order: a record is dropped when an earlier kept record has the same normalised text, or
    shares a MinHash LSH band with it and an estimated Jaccard similarity of at least `threshold` (the
    earliest such record is named). Streams: about 16 bytes per record in memory plus the band groups of
    records that collide, signatures in scratch files in the stage folder."""

    Config = DedupConfig

    @classmethod
    def contract(cls, config: Any) -> Contract:
        return Contract.of(needs=["response"] if config is not None and config.compare == "response" else [])

    def decide(self, records: RecordSource, signed: Iterable[tuple[bytes, np.ndarray | None]] | None = None) -> Iterator[Decision]:
        """`signed`: each record's exact key and signature, in input order, when an executor computed them
        (`executors.worker.sign_shard`); otherwise they are computed here."""
        cfg = self.config
        engine = GreedyDedup(exact=cfg.exact, near=cfg.near, threshold=cfg.threshold, num_perm=cfg.num_perm,
                             shingle_words=cfg.shingle_words, scratch_dir=self.ctx.artifacts_dir)
        try:
            if signed is None:
                for record in records:
                    engine.add(dedup_text(record, cfg.compare))
            else:
                for key, signature in signed:
                    engine.add_signed(key, signature)
            if engine.count != len(records):
                raise RuntimeError(f"dedup: {engine.count} signatures for {len(records)} records")
            decisions = engine.decide()
        finally:
            engine.close()
        kept_event = LineageEvent(stage=self.name, decision="kept", reason="no earlier duplicate")
        names = decisions.names()
        for i, record in enumerate(records):
            original = names.see(i, record.id)
            if original is None:
                yield record, record.with_event(kept_event), None
            elif decisions.kind[i] == EXACT:
                yield record, None, ("duplicate", f"exact duplicate of {original}")
            else:
                yield record, None, ("near_duplicate", f"near duplicate (Jaccard ≥ {cfg.threshold}) of {original}")


class RougeFilterConfig(StageConfig):
    type: Literal["filter.rouge"] = "filter.rouge"
    threshold: float = Field(0.7, gt=0, le=1, description="Keep a record only if its ROUGE-L with every kept one is below this (Self-Instruct: 0.7).")
    compare: Literal["instruction", "prompt", "response"] = Field("instruction", description="Which text is compared.")
    order: Literal["random", "input"] = Field(
        "random", description="random: visit records in a seeded random order (REFED's subset selection starts from a random sample); input: in input order."
    )


@register("filter.rouge")
class RougeFilter(FilterStage[RougeFilterConfig]):
    """Greedy ROUGE-L novelty filter, usable on any method's output (REFED's ROUGE-L selection, Self-Instruct's rule):
    visit the records (in a seeded random order by default) and keep one only if its ROUGE-L F-measure with every
    record kept so far is below `threshold`; the others are dropped as `too_similar`, naming the closest. Kept
    records stay in input order. Holds the compared texts (not the records); the comparison is quadratic in the
    number kept, so it is meant for method-sized sets, not millions."""

    Config = RougeFilterConfig

    @classmethod
    def contract(cls, config: Any) -> Contract:
        return Contract.of(needs=["response"] if config is not None and config.compare == "response" else [])

    def decide(self, records: RecordSource) -> Iterator[Decision]:
        from datatailor.scoring.novelty import NoveltyIndex

        cfg = self.config
        keys = [(r.id, dedup_text(r, cfg.compare)) for r in records]
        visit = list(range(len(keys)))
        if cfg.order == "random":
            self.ctx.rng("rouge-order").shuffle(visit)
        index = NoveltyIndex()
        rejected: dict[int, tuple[str, str]] = {}
        for i in visit:
            rid, text = keys[i]
            similarity, closest = index.closest(text)
            if similarity >= cfg.threshold:
                rejected[i] = ("too_similar", f"ROUGE-L {similarity:.3f} ≥ {cfg.threshold} with {closest}")
                continue
            index.add(rid, text)
        kept_event = LineageEvent(stage=self.name, decision="kept", reason=f"ROUGE-L < {cfg.threshold} with every kept record")
        for i, record in enumerate(records):
            yield (record, None, rejected[i]) if i in rejected else (record, record.with_event(kept_event), None)
