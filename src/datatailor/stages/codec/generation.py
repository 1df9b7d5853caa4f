"""Generation: `codec.rubrics` (Self-Rubrics per metadata entry), `codec.decode` (k instructions per entry,
sized to the data budget, with top-up rounds) and `codec.improve` (rewrite by one sampled action)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from datatailor.errors import RecordFailure, UserError
from datatailor.llm.models import Generation
from datatailor.records import Record, inherit_once
from datatailor.stages.base import BatchResult, BatchStage, MapStage, Stage, StageConfig, register
from datatailor.stages.codec.data import ActionStep, CodecData, codec_metadata, entry_key
from datatailor.stages.codec.parsers import parse_improved, parse_instruction_list, parse_rubrics_actions, text_key

# ----------------------------------------------------------------------------- codec.rubrics


class RubricsConfig(StageConfig):
    type: Literal["codec.rubrics"] = "codec.rubrics"
    role: str = Field("strong", description="Model role that writes rubrics and actions.")
    template: str = "codec/rubrics.j2"
    count: int = Field(4, ge=1, description="Rubrics, and as many paired actions, per metadata entry (paper: 4).")
    temperature: float | None = Field(0.7, description="Sampling temperature (paper: 0.7).")
    max_tokens: int | None = None


@register("codec.rubrics")
class Rubrics(MapStage[RubricsConfig]):
    """Self-Rubrics: per metadata entry, rubrics for how hard an instruction is and actions that make it harder.

    Works on entries (the usual place, before `codec.decode`, so decoded instructions inherit them) or on
    instructions; either way one call is made per entry, shared by every record of that entry (checkpointed,
    and its tokens counted once). A reply with fewer than `count` rubric/action pairs is re-asked.
    """

    Config = RubricsConfig
    distributed = False  # its records share calls: one owner each, in one process
    method = "codec"
    needs = ("codec.metadata",)
    provides = ("codec.actions",)
    templates = {"template": ("use_case", "skills", "n")}

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        use_case, skills = require_metadata(record, self.name)
        key = entry_key(record)
        n = cfg.count

        def parse(text: str) -> tuple[list[str], list[str]]:
            return parse_rubrics_actions(text, n)

        async def make() -> Generation[Any]:
            gen = await self.call(
                cfg.role, "template", {"use_case": use_case, "skills": skills, "n": n}, parse=parse,
                seed_key=(self.name, key), temperature=cfg.temperature, max_tokens=cfg.max_tokens,
            )
            if gen.truncated:
                raise RecordFailure("the Self-Rubrics reply was cut off by max_tokens; raise max_tokens", kind="truncated")
            return gen

        gen, owner = await self.shared_call(key, record.id, make, parse)
        rubrics, actions = gen.value
        event = gen.event(self.name, decision="rubrics", entry_id=key, rubrics=rubrics, actions=actions)
        if not owner:
            event.details["shared_call"] = key
        data = CodecData.get(record).update(rubrics=rubrics, actions=actions)
        return [record.with_event(event, metadata=data.stored(record))]


def require_metadata(record: Record, stage: str) -> tuple[str, list[str]]:
    from datatailor.errors import Rejected

    found = codec_metadata(record)
    if found is None:
        raise Rejected(
            f"{stage}: record has no CodecLM metadata (use case and skills); run codec.encode or codec.metadata first",
            kind="missing_metadata",
        )
    return found


# ----------------------------------------------------------------------------- codec.decode


class DecodeConfig(StageConfig):
    type: Literal["codec.decode"] = "codec.decode"
    role: str = Field("strong", description="Model role that writes instructions.")
    template: str = "codec/decode.j2"
    instructions_per_entry: int | None = Field(
        None, ge=1, description="k per entry; default ceil(recipe budget_pairs / number of entries)."
    )
    top_up_rounds: int = Field(
        3, ge=0,
        description=(
            "When the run ends with fewer than budget_pairs pairs (Contrastive Filtering dropped the rest), decode more "
            "instructions per entry and send them through the later stages, at most this many extra rounds."
        ),
    )
    temperature: float | None = Field(0.7, description="Sampling temperature (paper: 0.7).")
    max_tokens: int | None = None


def instructions_per_entry(budget_pairs: int | None, n_entries: int, override: int | None) -> int:
    """k = ceil(budget / pool size): an equal number per entry that meets the data budget."""
    if override is not None:
        return override
    if budget_pairs is None:
        raise UserError("codec.decode: set `budget_pairs` in the recipe or `instructions_per_entry` in the stage")
    return max(1, math.ceil(budget_pairs / max(1, n_entries)))


# A top-up round asks for deficit / (share of decoded instructions that were kept) more; this floors the share,
# so a round where almost nothing was kept asks for at most 4× the deficit.
MIN_KEEP_RATE = 0.25


@register("codec.decode")
class Decode(BatchStage[DecodeConfig]):
    """Per metadata entry, the strong model writes k instructions under its use case and skills (no demos).

    A batch stage because k depends on the pool size. Each instruction is a child record of its entry and
    inherits the entry's namespace; an entry whose reply never parses is rejected (`parse_error`). The last
    item of a list cut off by max_tokens is dropped (it may be cut mid-sentence). When the run delivers fewer
    than `budget_pairs` pairs, the runner asks for top-up rounds: each decodes enough new instructions per
    entry to cover the deficit at the keep rate seen so far, never repeating an instruction.
    """

    Config = DecodeConfig
    method = "codec"
    needs = ("codec.metadata",)
    provides = ("instruction",)
    clears = ("response",)
    templates = {"template": ("use_case", "skills", "n")}

    def __init__(self, config: DecodeConfig, ctx: Any):
        super().__init__(config, ctx)
        if config.instructions_per_entry is None and ctx.budget_pairs is None:
            raise UserError("codec.decode: set `budget_pairs` in the recipe or `instructions_per_entry` in the stage")

    def _entries(self, records: list[Record]) -> tuple[list[tuple[Record, str, list[str]]], dict[str, tuple[str, str]]]:
        entries, rejected = [], {}
        for r in records:
            found = codec_metadata(r)
            if found is None:
                rejected[r.id] = ("missing_metadata", "codec.decode: record has no use_case/skills")
            else:
                entries.append((r, *found))
        return entries, rejected

    async def _decode(self, entry: tuple[Record, str, list[str]], k: int, round: int) -> Generation[list[str]]:
        record, use_case, skills = entry
        key = (self.name, record.id, k) if round == 1 else (self.name, record.id, k, "round", round)
        return await self.call(
            self.config.role, "template", {"use_case": use_case, "skills": skills, "n": k},
            parse=parse_instruction_list, seed_key=key,
            temperature=self.config.temperature, max_tokens=self.config.max_tokens,
        )

    async def process_all(self, records: list[Record]) -> BatchResult:
        entries, rejected = self._entries(records)
        k = instructions_per_entry(self.ctx.budget_pairs, len(entries), self.config.instructions_per_entry)
        results = await self.gather(entries, lambda e: self._decode(e, k, 1))
        outputs: list[Record] = []
        for (entry, _, _), result in zip(entries, results):
            if isinstance(result, RecordFailure):
                rejected[entry.id] = (result.kind, str(result))
            else:
                outputs.extend(self._children(entry, result, k, 1, set()))
        return BatchResult(outputs=outputs, rejected=rejected)

    def top_up_rounds(self) -> int:
        return self.config.top_up_rounds

    async def top_up(self, records: list[Record], produced: list[Record], deficit: int, round: int) -> list[Record]:
        entries, _ = self._entries(records)
        if not entries:
            return []
        kept = max(0, (self.ctx.budget_pairs or 0) - deficit)
        rate = max(MIN_KEEP_RATE, kept / len(produced)) if produced else 1.0
        k = max(1, math.ceil(math.ceil(deficit / rate) / len(entries)))
        seen: dict[str, set[str]] = {}
        for r in produced:
            seen.setdefault(entry_key(r), set()).add(text_key(r.instruction))
        results = await self.gather(entries, lambda e: self._decode(e, k, round))
        outputs: list[Record] = []
        for (entry, _, _), result in zip(entries, results):
            if not isinstance(result, RecordFailure):  # a failed top-up call only means fewer new instructions
                outputs.extend(self._children(entry, result, k, round, seen.setdefault(entry_key(entry), set())))
        return outputs

    def _children(self, entry: Record, gen: Generation[list[str]], k: int, round: int, seen: set[str]) -> list[Record]:
        items = list(gen.value)
        if gen.truncated and len(items) > 1:
            items = items[:-1]  # the list was cut off: its last item may be cut mid-sentence
        texts: list[str] = []
        for text in items:
            key = text_key(text)
            if key and key not in seen:
                seen.add(key)
                texts.append(text)
        texts = texts[:k]
        key = entry_key(entry)
        children: list[Record] = []
        for i, text in enumerate(texts):
            event = gen.event(self.name, decision="decoded", entry_id=key, index=i, requested=k, returned=len(gen.value), round=round)
            if i:
                event.prompt_tokens = event.completion_tokens = 0
                event.cost_usd = 0.0
                event.details["shared_call"] = True
            data = CodecData.get(entry).update(kind="instruction", entry_id=key, action_chain=[], decode_round=round)
            child = entry.child(("codec.decode", text_key(text)), instruction=text, input="", response=None)
            child.metadata = data.stored(child)
            child.lineage.append(event)
            children.append(child)
        inherit_once(children, entry)
        return children


# ----------------------------------------------------------------------------- codec.improve


def pick_action(record: Record, rng: Any) -> tuple[int, str, str | None]:
    """One action, uniformly at random (the paper names no distribution), with its paired rubric."""
    data = CodecData.get(record)
    if not data.actions:
        raise RecordFailure(
            "record has no Self-Rubrics actions; run codec.rubrics before improving instructions", kind="missing_actions"
        )
    index = rng.randrange(len(data.actions))
    return index, data.actions[index], data.rubrics[index] if index < len(data.rubrics) else None


async def improve_instruction(
    stage: Stage[Any], role: str, template_field: str, instruction: str, action: str, *, seed_key: Any, **sampling: Any
) -> Generation[str]:
    """The strong model rewrites `instruction` to follow `action` (CodecLM's improver). A rewrite cut off by
    max_tokens is a `truncated` failure: a half-written instruction is never used."""
    gen = await stage.call(
        role, template_field, {"instruction": instruction, "action": action},
        parse=lambda text: parse_improved(text, action), seed_key=seed_key, **sampling,
    )
    if gen.truncated:
        raise RecordFailure(f"the rewritten instruction was cut off by max_tokens ({gen.model})", kind="truncated")
    return gen


class ImproveConfig(StageConfig):
    type: Literal["codec.improve"] = "codec.improve"
    role: str = Field("strong", description="Model role that rewrites instructions.")
    template: str = "codec/improve.j2"
    temperature: float | None = Field(0.7, description="Sampling temperature (paper: 0.7).")
    max_tokens: int | None = None


@register("codec.improve")
class Improve(MapStage[ImproveConfig]):
    """Rewrite each instruction following one action sampled (seeded) from its entry's actions."""

    Config = ImproveConfig
    method = "codec"
    needs = ("instruction", "codec.actions")
    provides = ("instruction",)
    clears = ("response",)
    templates = {"template": ("instruction", "action")}

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        index, action, rubric = pick_action(record, self.ctx.rng(record.id, "action"))
        gen = await improve_instruction(
            self, cfg.role, "template", record.instruction, action,
            seed_key=(self.name, record.id, index), temperature=cfg.temperature, max_tokens=cfg.max_tokens,
        )
        data = CodecData.get(record)
        chain = [*data.action_chain, ActionStep(action=action, rubric=rubric, before=record.instruction)]
        child = record.child(("codec.improve", index, gen.value), instruction=gen.value, response=None)
        child.metadata = data.update(action_chain=chain).stored(child)
        child.lineage.append(gen.event(self.name, decision="improved", action=action, rubric=rubric))
        return [child]
