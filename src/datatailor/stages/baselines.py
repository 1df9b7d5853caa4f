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

import asyncio
import re
from collections import Counter
from typing import Literal

from pydantic import Field, model_validator

from datatailor.errors import RecordFailure, RunAbort, UserError
from datatailor.scoring.text import rouge_l, rouge_tokens
from datatailor.io import write_json
from datatailor.llm.models import Generation
from datatailor.llm.structured import parse_numbered_list
from datatailor.prompts import load_prompt
from datatailor.records import Record, stable_hash
from datatailor.stages.base import BatchResult, BatchStage, StageConfig, register

STATS_FILE = "self_instruct_stats.json"

# Self-Instruct drops tasks that a language model cannot do with text alone.
DEFAULT_BLOCKED_WORDS = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)

class NoveltyIndex:
    """Texts seen so far, answering: how similar (ROUGE-L) is a new text to the closest one?"""

    def __init__(self) -> None:
        self._tokens: list[list[str]] = []
        self._counts: list[Counter[str]] = []
        self.ids: list[str] = []

    def add(self, text_id: str, text: str) -> None:
        tokens = rouge_tokens(text)
        self._tokens.append(tokens)
        self._counts.append(Counter(tokens))
        self.ids.append(text_id)

    def closest(self, text: str) -> tuple[float, str | None]:
        """(highest ROUGE-L, id of that text). Pairs whose token overlap cannot beat the best so far are skipped."""
        tokens = rouge_tokens(text)
        counts = Counter(tokens)
        best, best_id = 0.0, None
        for i, other in enumerate(self._tokens):
            if not tokens or not other:
                continue
            # The LCS cannot be longer than the multiset overlap, which bounds the F-measure from above.
            overlap = sum((counts & self._counts[i]).values())
            if 2 * overlap / (len(tokens) + len(other)) <= best:
                continue
            score = rouge_l(tokens, other)
            if score > best:
                best, best_id = score, self.ids[i]
        return best, best_id


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
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
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
    candidates are screened in call order, so the result does not depend on which call finishes first.
    Counts of every drop reason go to `self_instruct_stats.json` in the run directory.
    """

    Config = SelfInstructConfig

    def _target(self) -> int:
        if self.config.target is not None:
            return self.config.target
        budget = self.ctx.recipe.budget_pairs if self.ctx.recipe is not None else None
        if budget is None:
            raise UserError("self_instruct: set `budget_pairs` in the recipe or `target` in the stage")
        return budget

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
        prompt = load_prompt(cfg.template, self.ctx.base_dir)
        model = self.ctx.model(cfg.role)
        accepted: list[Record] = []
        stats: Counter[str] = Counter()
        calls = 0

        async def call(i: int, demos: list[str]) -> Generation[list[str]]:
            return await model.generate(
                prompt, {"demos": demos, "n": cfg.per_call},
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
            results = await asyncio.gather(*(call(i, d) for i, d in batch), return_exceptions=True)
            for (i, demos), result in zip(batch, results):
                if isinstance(result, RunAbort):
                    raise result
                if isinstance(result, RecordFailure):
                    stats[f"call_{result.kind}"] += 1
                    continue
                if isinstance(result, BaseException):
                    raise result
                for text in result.value:
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
                    record = Record.new(instruction=text, id=stable_hash("self_instruct", text), metadata={
                        "method": "self_instruct", "demos": demos, "max_rouge_l": round(similarity, 4),
                        "closest": closest,
                    })
                    record.lineage.append(result.event(self.name, decision="accepted", call=i,
                                                       reason=f"max ROUGE-L {similarity:.3f} < {cfg.rouge_threshold}"))
                    index.add(record.id, text)
                    accepted.append(record)
        stats["calls"] = calls
        stats["accepted"] = len(accepted)
        write_json(self.ctx.artifacts_dir / STATS_FILE, {"target": target, "reached": len(accepted) >= target, **dict(sorted(stats.items()))})
        return BatchResult(outputs=accepted)
