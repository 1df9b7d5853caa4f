"""Selection stages: exact and near-duplicate removal (MinHash LSH)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from datatailor.records import LineageEvent, Record
from datatailor.stages.base import BatchResult, BatchStage, StageConfig, register
from datatailor.stages.contract import Contract

_WORD = re.compile(r"\w+", re.UNICODE)


def dedup_text(record: Record, compare: str) -> str:
    if compare == "instruction":
        return record.instruction
    if compare == "response":
        return record.response or ""
    if compare == "pair":
        return f"{record.prompt}\n{record.response or ''}"
    return record.prompt


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, n: int) -> set[str]:
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


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
class Dedup(BatchStage[DedupConfig]):
    """Keep the first of each group of exact or near-duplicate records; drop the rest with a reason."""

    Config = DedupConfig

    @classmethod
    def contract(cls, config: Any) -> Contract:
        return Contract.of(needs=["response"] if config is not None and config.compare == "response" else [])

    async def process_all(self, records: list[Record]) -> BatchResult:
        from datasketch import MinHash, MinHashLSH  # slow to import (pulls scipy): only when used

        cfg = self.config
        kept: list[Record] = []
        rejected: dict[str, tuple[str, str]] = {}
        exact_seen: dict[str, str] = {}
        # Bands tuned for recall; every candidate is then checked against the threshold, so the
        # extra candidates cost a comparison each but never a wrong drop.
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(0.05, 0.95)) if cfg.near else None
        signatures: dict[str, Any] = {}
        for record in records:
            text = dedup_text(record, cfg.compare)
            key = normalise(text)
            if cfg.exact and key in exact_seen:
                rejected[record.id] = ("duplicate", f"exact duplicate of {exact_seen[key]}")
                continue
            if lsh is not None:
                mh = MinHash(num_perm=cfg.num_perm, seed=1)
                for sh in shingles(text, cfg.shingle_words):
                    mh.update(sh.encode("utf-8"))
                hits = [h for h in lsh.query(mh) if signatures[h].jaccard(mh) >= cfg.threshold]
                if hits:
                    first = min(hits, key=lambda h: int(h.split(":", 1)[0]))
                    rejected[record.id] = (
                        "near_duplicate",
                        f"near duplicate (Jaccard ≥ {cfg.threshold}) of {first.split(':', 1)[1]}",
                    )
                    continue
                key_in_index = f"{len(kept)}:{record.id}"
                signatures[key_in_index] = mh
                lsh.insert(key_in_index, mh)
            exact_seen.setdefault(key, record.id)
            kept.append(record.with_event(LineageEvent(stage=self.name, decision="kept", reason="no earlier duplicate")))
        return BatchResult(outputs=kept, rejected=rejected)


class RougeFilterConfig(StageConfig):
    type: Literal["filter.rouge"] = "filter.rouge"
    threshold: float = Field(0.7, gt=0, le=1, description="Keep a record only if its ROUGE-L with every kept one is below this (Self-Instruct: 0.7).")
    compare: Literal["instruction", "prompt", "response"] = Field("instruction", description="Which text is compared.")
    order: Literal["random", "input"] = Field(
        "random", description="random: visit records in a seeded random order (REFED's subset selection starts from a random sample); input: in input order."
    )


@register("filter.rouge")
class RougeFilter(BatchStage[RougeFilterConfig]):
    """Greedy ROUGE-L novelty filter, usable on any method's output (REFED's ROUGE-L selection, Self-Instruct's rule):
    visit the records (in a seeded random order by default) and keep one only if its ROUGE-L F-measure with every
    record kept so far is below `threshold`; the others are dropped as `too_similar`, naming the closest. Kept
    records stay in input order."""

    Config = RougeFilterConfig

    @classmethod
    def contract(cls, config: Any) -> Contract:
        return Contract.of(needs=["response"] if config is not None and config.compare == "response" else [])

    async def process_all(self, records: list[Record]) -> BatchResult:
        from datatailor.scoring.novelty import NoveltyIndex

        cfg = self.config
        visit = list(range(len(records)))
        if cfg.order == "random":
            self.ctx.rng("rouge-order").shuffle(visit)
        index = NoveltyIndex()
        kept: set[int] = set()
        rejected: dict[str, tuple[str, str]] = {}
        for i in visit:
            text = dedup_text(records[i], cfg.compare)
            similarity, closest = index.closest(text)
            if similarity >= cfg.threshold:
                rejected[records[i].id] = ("too_similar", f"ROUGE-L {similarity:.3f} ≥ {cfg.threshold} with {closest}")
                continue
            index.add(records[i].id, text)
            kept.add(i)
        outputs = [
            r.with_event(LineageEvent(stage=self.name, decision="kept", reason=f"ROUGE-L < {cfg.threshold} with every kept record"))
            for i, r in enumerate(records) if i in kept
        ]
        return BatchResult(outputs=outputs, rejected=rejected)
