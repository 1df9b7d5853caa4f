"""Self-Instruct-style baseline (Wang et al. 2022; Alpaca's variant): new instructions from random seed subsets.

Each call shows the model a few randomly drawn seed tasks (Alpaca: 3; Self-Instruct: 6 human + 2 machine; both
configurable) and asks for more. A candidate joins the pool only if its ROUGE-L F-measure against every
instruction already in the pool (seeds and accepted ones) is below 0.7, and it passes Self-Instruct's simple
filters (length, tasks a text model cannot do). Generation stops at the data budget. Responses come from a
separate `respond` stage with the strong model, as for every other method.

ROUGE-L is `datatailor.scoring.text.rouge_l` (LCS over lower-cased alphanumeric tokens, as `rouge-score`
tokenises without a stemmer), so the core does not need the extra.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Literal

from typing import Any

from pydantic import Field, model_validator

from datatailor.errors import RecordFailure, UserError
from datatailor.io import write_json
from datatailor.llm.models import Generation
from datatailor.llm.structured import parse_numbered_list
from datatailor.records import Record, stable_hash
from datatailor.scoring.novelty import NoveltyIndex
from datatailor.stages.base import BatchResult, BatchStage, Delivery, StageConfig, register
from datatailor.stages.namespace import Namespace

STATS_FILE = "self_instruct_stats.json"

# Self-Instruct drops tasks that a language model cannot do with text alone.
DEFAULT_BLOCKED_WORDS = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)

class SelfInstructData(Namespace):
    """What Self-Instruct records about an instruction it wrote."""

    key = "self_instruct"

    call: int
    demos: list[str]
    max_rouge_l: float
    closest: str | None = None


def candidate_problem(text: str, min_words: int, max_words: int, blocked: tuple[str, ...] | list[str]) -> str | None:
    """Self-Instruct's cheap filters; the reason a candidate is dropped, or None."""
    words = text.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    low = text.lower()
    for word in blocked:
        if re.search(rf"\b{re.escape(word)}\b", low):
            return "blocked_word"
    if not text[0].isalnum() and text[0] not in "\"'([":
        return "starts_with_punctuation"
    return None


class SelfInstructConfig(StageConfig):
    type: Literal["self_instruct"] = "self_instruct"
    role: str = Field("strong", description="Model that writes new instructions.")
    template: str = "baselines/self_instruct.j2"
    seed_demos: int = Field(3, ge=1, description="Seed tasks shown per call (Alpaca: 3; Self-Instruct: 6).")
    machine_demos: int = Field(0, ge=0, description="Generated tasks also shown per call, once there are enough (Self-Instruct: 2).")
    per_call: int = Field(8, ge=1, description="New instructions asked for per call.")
    target: int | None = Field(None, ge=1, description="Instructions to generate; default the recipe's budget_pairs.")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Keep a candidate only if ROUGE-L with every pool text is below this.")
    min_words: int = Field(4, ge=1, description="Drop instructions of fewer words (Alpaca drops those of 3 words or fewer).")
    max_words: int = Field(150, ge=1, description="Drop instructions of more words (Alpaca: 150).")
    blocked_words: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED_WORDS))
    max_calls: int | None = Field(None, ge=1, description="Stop after this many calls even if short (default: 5 × the calls needed + 5).")
    temperature: float | None = None
    max_tokens: int | None = None

    @model_validator(mode="after")
    def _word_range(self) -> "SelfInstructConfig":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is larger than max_words ({self.max_words})")
        return self


@register("self_instruct")
class SelfInstruct(BatchStage[SelfInstructConfig]):
    """Generate `target` new instructions from random seed subsets, each novel by ROUGE-L (< 0.7) against the pool.

    Seeds are consumed (the output holds only new instructions). Calls run `concurrency` at a time in rounds;
    candidates are screened in call order, so the result does not depend on which call finishes first. The last
    item of a reply cut off by max_tokens is dropped (it may be cut mid-sentence). Counts of every drop reason go
    to `self_instruct_stats.json` in the stage's folder; a run that falls short of the target says why.
    """

    Config = SelfInstructConfig
    method = "self_instruct"
    needs = ("instruction",)
    provides = ("instruction",)
    clears = ("*",)
    templates = {"template": ("demos", "n")}

    def _target(self) -> int:
        if self.config.target is not None:
            return self.config.target
        if self.ctx.budget_pairs is None:
            raise UserError("self_instruct: set `budget_pairs` in the recipe or `target` in the stage")
        return self.ctx.budget_pairs

    async def process_all(self, records: list[Record]) -> BatchResult:
        cfg = self.config
        target = self._target()
        seeds = [r.prompt for r in records]
        if not seeds:
            raise UserError("self_instruct: needs seed instructions as input")
        max_calls = cfg.max_calls or 5 * -(-target // cfg.per_call) + 5
        index = NoveltyIndex()
        for r in records:
            index.add(r.id, r.prompt)
        accepted: list[Record] = []
        stats: Counter[str] = Counter()
        calls = 0

        async def call(item: tuple[int, list[str]]) -> Generation[list[str]]:
            i, demos = item
            return await self.call(
                cfg.role, "template", {"demos": demos, "n": cfg.per_call},
                parse=lambda text: parse_numbered_list(text, min_items=1),
                seed_key=(self.name, i), temperature=cfg.temperature, max_tokens=cfg.max_tokens,
            )

        while len(accepted) < target and calls < max_calls:
            batch = []
            # No more calls than could still be needed if every candidate were kept.
            needed = -(-(target - len(accepted)) // cfg.per_call)
            for _ in range(min(cfg.concurrency, max_calls - calls, needed)):
                rng = self.ctx.rng("call", calls)
                demos = rng.sample(seeds, min(cfg.seed_demos, len(seeds)))
                machine = [r.instruction for r in accepted]
                if cfg.machine_demos and len(machine) >= cfg.machine_demos:
                    demos += rng.sample(machine, cfg.machine_demos)
                batch.append((calls, demos))
                calls += 1
            results = await self.gather(batch, call)
            for (i, demos), result in zip(batch, results):
                if isinstance(result, RecordFailure):
                    stats[f"call_{result.kind}"] += 1
                    continue
                stats["replies"] += 1
                items = list(result.value)
                if result.truncated and items:
                    stats["cut_off_last_item"] += 1
                    items = items[:-1]  # the reply was cut off by max_tokens: its last item may be cut mid-sentence
                for text in items:
                    if len(accepted) >= target:
                        stats["beyond_target"] += 1
                        continue
                    stats["candidates"] += 1
                    text = text.strip()
                    if problem := candidate_problem(text, cfg.min_words, cfg.max_words, cfg.blocked_words):
                        stats[problem] += 1
                        continue
                    similarity, closest = index.closest(text)
                    if similarity >= cfg.rouge_threshold:
                        stats["rouge_l_too_similar"] += 1
                        continue
                    record = Record.new(instruction=text, id=stable_hash("self_instruct", text))
                    data = SelfInstructData(call=i, demos=demos, max_rouge_l=round(similarity, 4), closest=closest)
                    record.metadata = data.stored(record)
                    record.lineage.append(result.event(self.name, decision="accepted", call=i,
                                                       reason=f"max ROUGE-L {similarity:.3f} < {cfg.rouge_threshold}"))
                    index.add(record.id, text)
                    accepted.append(record)
        stats["calls"] = calls
        stats["accepted"] = len(accepted)
        write_json(self.ctx.artifact(STATS_FILE), {"target": target, "reached": len(accepted) >= target, **dict(sorted(stats.items()))})
        return BatchResult(outputs=accepted)

    def delivery(self, outputs: list[Record], failures: list[dict[str, Any]]) -> Delivery | None:
        path = self.ctx.artifacts_dir / STATS_FILE
        stats = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        target = stats.get("target", self._target())
        why = (
            f"{stats.get('calls', 0)} calls, {stats.get('replies', 0)} replies that parsed as lists, "
            f"{stats.get('candidates', 0)} candidate instructions, {len(outputs)} kept"
        )
        drops = {k: v for k, v in stats.items() if k not in ("target", "reached", "calls", "replies", "candidates", "accepted", "beyond_target") and v}
        if drops:
            why += " (dropped: " + ", ".join(f"{k} {v}" for k, v in drops.items()) + ")"
        return Delivery(asked=target, delivered=len(outputs), why=why)
