"""CodecLM (arXiv 2404.05875, methods.md §1): encode seeds to metadata, decode tailored instructions, make them
harder with Self-Rubrics, and keep the pairs the target model gets wrong (Contrastive Filtering).

Stages, each usable on its own in a recipe:

* `codec.encode`      seed → the same record with `metadata.use_case` and `metadata.skills` (strong model, few-shot).
* `codec.metadata`    metadata-only mode: use cases and skills written by hand (recipe or YAML file); no encoder.
* `codec.augment`     grow the metadata pool to N entries by mix-and-match; writes `metadata.jsonl`.
* `codec.rubrics`     per metadata entry: n rubrics and n paired actions (computed once per entry).
* `codec.decode`      per metadata entry: k instructions, k = ceil(budget_pairs / pool size).
* `codec.improve`     rewrite an instruction by one action sampled from its entry's actions.
* `codec.contrastive` strong vs target answer, judged in both orders; keep when |G| > θ, else improve and retry.
* `codec.select`      trim the kept pairs to exactly `budget_pairs`, deterministically.

Record conventions. A metadata entry is a record with an empty instruction and `metadata.kind ==
"codec_metadata"`; its id is a stable hash of (use case, sorted skills), also stored as `metadata.entry_id`.
Instructions decoded from an entry carry its whole metadata (use case, skills, provenance, rubrics, actions), so
per-entry work is never repeated per instruction. A kept pair carries `metadata.codec`: the iteration, both answers,
the four raw judge scores, G and the history of every iteration; `metadata.action_chain` lists the actions applied.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datatailor.errors import RecordFailure, Rejected, RunAbort, UserError
from datatailor.scoring.judge import SCORES_ONLY, PairwiseScores, judge_pair
from datatailor.io import read_jsonl_rows, read_yaml, write_jsonl
from datatailor.llm.models import Generation, RoleModel
from datatailor.llm.structured import normalise_label, parse_numbered_list, parse_use_case_skills
from datatailor.prompts import load_prompt
from datatailor.records import LineageEvent, Record, stable_hash
from datatailor.report.codec import run_file_rows, write_codec_report
from datatailor.scoring.text import rouge_l, rouge_tokens
from datatailor.stages.base import BatchResult, BatchStage, MapStage, StageConfig, register

ENTRY_KIND = "codec_metadata"
INSTRUCTION_KIND = "codec_instruction"
METADATA_FILE = "metadata.jsonl"

# ----------------------------------------------------------------------------- metadata helpers


def metadata_id(use_case: str, skills: Sequence[str]) -> str:
    """Id of the metadata entry (use case, skills); the order of the skills does not matter."""
    return stable_hash("codec.metadata", use_case, sorted(skills))


def read_metadata(record: Record) -> tuple[str, list[str]] | None:
    """(use case, skills) of a record that has them, else None."""
    use_case, skills = record.metadata.get("use_case"), record.metadata.get("skills")
    if isinstance(use_case, str) and use_case and isinstance(skills, list) and skills:
        return use_case, [str(s) for s in skills]
    return None


def require_metadata(record: Record, stage: str) -> tuple[str, list[str]]:
    found = read_metadata(record)
    if found is None:
        raise Rejected(
            f"{stage}: record has no metadata.use_case/metadata.skills; run codec.encode or codec.metadata first",
            kind="missing_metadata",
        )
    return found


def entry_key(record: Record) -> str:
    """The metadata entry a record belongs to (itself, for an entry)."""
    if isinstance(record.metadata.get("entry_id"), str):
        return record.metadata["entry_id"]
    found = read_metadata(record)
    return metadata_id(*found) if found else record.id


_SKILL_NOISE = re.compile(r"^(?:skills?|knowledge)\s+(?:of|in)\s+|\s+(?:skills?|knowledge)$")


def clean_skill(skill: str) -> str:
    """Drop the words "skill(s)"/"knowledge" at either end, which the encoder is told not to use."""
    cleaned = _SKILL_NOISE.sub("", normalise_label(skill)).strip()
    return cleaned or normalise_label(skill)


def _dedup(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


def entry_record(
    use_case: str,
    skills: list[str],
    origin: str,
    seeds: list[str],
    use_case_seeds: list[str],
    skill_seeds: dict[str, list[str]],
    lineage: list[LineageEvent],
) -> Record:
    key = metadata_id(use_case, skills)
    return Record(
        id=key,
        instruction="",
        metadata={
            "kind": ENTRY_KIND,
            "entry_id": key,
            "use_case": use_case,
            "skills": list(skills),
            "origin": origin,
            "seeds": list(seeds),
            "use_case_seeds": list(use_case_seeds),
            "skill_seeds": {s: list(ids) for s, ids in skill_seeds.items()},
        },
        parents=list(seeds),
        lineage=list(lineage),
    )


def pool_row(record: Record) -> dict[str, Any]:
    """One line of metadata.jsonl."""
    md = record.metadata
    return {
        "id": record.id,
        "use_case": md["use_case"],
        "skills": md["skills"],
        "origin": md.get("origin", "seed"),
        "seeds": md.get("seeds", []),
        "use_case_seeds": md.get("use_case_seeds", []),
        "skill_seeds": md.get("skill_seeds", {}),
    }


def write_pool(out_dir: Path, records: list[Record]) -> None:
    rows = [pool_row(r) for r in records if r.metadata.get("kind") == ENTRY_KIND]
    write_jsonl(out_dir / METADATA_FILE, rows)


# ----------------------------------------------------------------------------- parsers


_RUBRICS_HEAD = re.compile(r"^\s*[#*\s]*rubrics?\s*[*]*\s*:?\s*[*]*\s*$", re.IGNORECASE)
_ACTIONS_HEAD = re.compile(r"^\s*[#*\s]*actions?\s*[*]*\s*:?\s*[*]*\s*$", re.IGNORECASE)
_LABELLED = re.compile(
    r"^\s*(?:[-*\u2022]|\d+[.):])?\s*[*_]*\s*(rubric|action)\s*\d*\s*[*_]*\s*[:\-]\s*[*_]*\s*(.+?)\s*[*_]*\s*$", re.IGNORECASE
)


def clean_item(text: str) -> str:
    """A list item without markdown emphasis or wrapping quotes ("**Add a step**: …" → "Add a step: …")."""
    cleaned = re.sub(r"\*\*|__", "", text).strip().strip("*").strip()
    if len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'":
        cleaned = cleaned[1:-1].strip()
    return cleaned


def _items(lines: list[str]) -> list[str]:
    items = (clean_item(i) for i in parse_numbered_list("\n".join(lines), min_items=0))
    return [i for i in items if i]


def parse_rubrics_actions(text: str, n: int) -> tuple[list[str], list[str]]:
    """Rubrics and their paired actions from a Self-Rubrics reply.

    Accepts "Rubrics:" / "Actions:" sections of numbered items (the asked-for layout), lines labelled
    "Rubric: …" / "Action: …", or one numbered list of 2n items (rubrics first). Raises ValueError when no
    action can be found. Returns at most n of each.
    """
    lines = text.strip().splitlines()
    head_r = next((i for i, line in enumerate(lines) if _RUBRICS_HEAD.match(line)), None)
    head_a = next((i for i, line in enumerate(lines) if _ACTIONS_HEAD.match(line)), None)
    rubrics: list[str] = []
    actions: list[str] = []
    if head_a is not None:
        start = head_r + 1 if head_r is not None and head_r < head_a else 0
        rubrics, actions = _items(lines[start:head_a]), _items(lines[head_a + 1 :])
    else:
        for line in lines:
            if m := _LABELLED.match(line):
                (rubrics if m.group(1).lower() == "rubric" else actions).append(m.group(2).strip())
        if not actions:
            items = _items(lines[head_r + 1 :] if head_r is not None else lines)
            if len(items) >= 2 * n:
                rubrics, actions = items[:n], items[n : 2 * n]
    if not actions:
        raise ValueError(f"no actions found: expected 'Rubrics:' and 'Actions:' sections with {n} numbered items each")
    return rubrics[:n], actions[:n]


_IMPROVED_LABEL = re.compile(
    r"^\s*[*#]*\s*(?:new|improved|rewritten|harder)\s+(?:request|instruction|prompt)\s*[*#]*\s*:\s*[*#]*\s*", re.IGNORECASE
)


def parse_rewritten(text: str) -> str:
    """The rewritten instruction alone: a leading answer label and wrapping quotes are removed."""
    cleaned = _IMPROVED_LABEL.sub("", text.strip()).strip()
    if len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'":
        cleaned = cleaned[1:-1].strip()
    if not cleaned:
        raise ValueError("the reply holds no instruction")
    return cleaned


# ----------------------------------------------------------------------------- codec.encode


class EncodeConfig(StageConfig):
    type: Literal["codec.encode"] = "codec.encode"
    role: str = Field("strong", description="Model role that encodes seeds (the paper: the strong model).")
    template: str = Field("codec/encode.j2", description="Few-shot encoder prompt.")
    max_skills: int = Field(3, ge=1, description="Most skills per seed (paper: 3).")
    temperature: float | None = Field(0.7, description="Sampling temperature (paper: 0.7).")
    max_tokens: int | None = Field(None, description="Override the model's max_tokens.")


@register("codec.encode")
class Encode(MapStage[EncodeConfig]):
    """Seed instruction → the same record with `metadata.use_case` and `metadata.skills`."""

    Config = EncodeConfig

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        n = cfg.max_skills
        gen = await self.ctx.model(cfg.role).generate(
            load_prompt(cfg.template, self.ctx.base_dir),
            {"instruction": record.prompt, "max_skills": n},
            parse=lambda text: parse_use_case_skills(text, n),
            seed_key=(self.name, record.id),
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
        )
        use_case, raw_skills = gen.value
        skills = _dedup([clean_skill(s) for s in raw_skills])[:n]
        event = gen.event(self.name, decision="encoded", use_case=use_case, skills=skills, reply=gen.text)
        return [record.with_event(event, metadata={**record.metadata, "use_case": use_case, "skills": skills})]


# ----------------------------------------------------------------------------- codec.metadata


class GivenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_case: str = Field(min_length=1)
    skills: list[str] = Field(min_length=1)


class MetadataConfig(StageConfig):
    type: Literal["codec.metadata"] = "codec.metadata"
    entries: list[GivenEntry] = Field(default_factory=list, description="Metadata written by hand.")
    file: str | None = Field(
        None,
        description=(
            "A YAML/JSON file holding a list of {use_case, skills} (or {entries: [...]}), or a metadata.jsonl written "
            "by an earlier run; relative to the recipe."
        ),
    )

    @model_validator(mode="after")
    def _some_metadata(self) -> "MetadataConfig":
        if not self.entries and not self.file:
            raise ValueError("give `entries` (a list of {use_case, skills}) or `file`")
        return self


def load_given_entries(path: Path) -> list[GivenEntry]:
    """Read hand-written metadata; every mistake names the file and the entry."""
    if not path.is_file():
        raise UserError(f"codec.metadata: file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        # A pool written by an earlier run (metadata.jsonl), e.g. after removing unreasonable entries by hand,
        # the paper's manual sanity check. Only the use case and the skills are read.
        rows = [row for _, row in read_jsonl_rows(path)]  # a bad line is a UserError naming file and line
        if not rows:
            raise UserError(f"{path}: no entries")
        return [_given_entry(path, i, {"use_case": r.get("use_case"), "skills": r.get("skills")}) for i, r in enumerate(rows)]
    data = read_yaml(path, "codec.metadata file")
    if isinstance(data, dict) and "entries" in data:
        data = data["entries"]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty list of entries, each with `use_case` and `skills`")
    return [_given_entry(path, i, item) for i, item in enumerate(data)]


def _given_entry(path: Path, index: int, item: Any) -> GivenEntry:
    try:
        return GivenEntry.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(entry)"
        raise UserError(f"{path}: entry {index + 1}: {loc}: {first['msg']}") from None


@register("codec.metadata")
class GivenMetadata(BatchStage[MetadataConfig]):
    """Metadata-only mode: turn hand-written use cases and skills into metadata entries (no encoder).

    Input records that already carry metadata (encoded seeds, entries) pass through, so hand-written metadata
    can also be added to encoded seeds; other inputs are rejected as `missing_metadata`.
    """

    Config = MetadataConfig

    async def process_all(self, records: list[Record]) -> BatchResult:
        given = list(self.config.entries)
        if self.config.file:
            given += load_given_entries(self.ctx.base_dir / self.config.file)
        outputs: list[Record] = []
        rejected: dict[str, tuple[str, str]] = {}
        for r in records:
            if read_metadata(r) is None:
                rejected[r.id] = ("missing_metadata", "codec.metadata: input record has no use_case/skills")
            else:
                outputs.append(r)
        seen = {r.id for r in outputs}
        for spec in given:
            use_case = normalise_label(spec.use_case)
            skills = _dedup([normalise_label(s) for s in spec.skills])
            key = metadata_id(use_case, skills)
            if key in seen:
                continue
            seen.add(key)
            event = LineageEvent(stage=self.name, decision="given", reason="metadata written by hand")
            outputs.append(entry_record(use_case, skills, "given", [key], [key], {s: [key] for s in skills}, [event]))
        return BatchResult(outputs=outputs, rejected=rejected)

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:
        write_pool(self.ctx.artifacts_dir, outputs)


# ----------------------------------------------------------------------------- codec.augment


class AugmentConfig(StageConfig):
    type: Literal["codec.augment"] = "codec.augment"
    pool_size: int = Field(200, ge=0, description="Entries in the pool after augmentation (paper: 200). Seed entries count.")
    min_skills: int = Field(1, ge=1, description="Fewest skills in an augmented entry.")
    max_skills: int = Field(3, ge=1, description="Most skills in an augmented entry (the paper leaves it open).")
    max_draws_per_entry: int = Field(
        50, ge=1, description="Give up after this many draws per missing entry (a small vocabulary has few combinations)."
    )

    @model_validator(mode="after")
    def _skill_range(self) -> "AugmentConfig":
        if self.min_skills > self.max_skills:
            raise ValueError(f"min_skills ({self.min_skills}) is larger than max_skills ({self.max_skills})")
        return self


@register("codec.augment")
class Augment(BatchStage[AugmentConfig]):
    """Grow the metadata pool by mix-and-match: one use case + 1–3 skills sampled without replacement from the
    union of all skills. Seeds with the same metadata share one entry; exact duplicate draws are dropped.
    Every entry lists the inputs (seeds) that produced it, its use case and each of its skills.
    """

    Config = AugmentConfig

    async def process_all(self, records: list[Record]) -> BatchResult:
        cfg = self.config
        rejected: dict[str, tuple[str, str]] = {}
        use_case_seeds: dict[str, list[str]] = {}
        skill_seeds: dict[str, list[str]] = {}
        # entry id -> (use case, skills, origin, seeds, lineage)
        pool: dict[str, tuple[str, list[str], str, list[str], list[LineageEvent]]] = {}
        for r in records:
            found = read_metadata(r)
            if found is None:
                rejected[r.id] = ("missing_metadata", "codec.augment: input record has no use_case/skills")
                continue
            use_case, skills = found
            is_entry = r.metadata.get("kind") == ENTRY_KIND
            sources = list(r.metadata.get("seeds") or [r.id]) if is_entry else [r.id]
            for s in sources:
                use_case_seeds.setdefault(use_case, [])
                if s not in use_case_seeds[use_case]:
                    use_case_seeds[use_case].append(s)
                for skill in skills:
                    skill_seeds.setdefault(skill, [])
                    if s not in skill_seeds[skill]:
                        skill_seeds[skill].append(s)
            key = metadata_id(use_case, skills)
            if key in pool:
                pool[key][3].extend(s for s in sources if s not in pool[key][3])
            else:
                origin = r.metadata.get("origin", "seed") if is_entry else "seed"
                pool[key] = (use_case, list(skills), origin, list(sources), list(r.lineage))
        use_cases, skills_union = list(use_case_seeds), list(skill_seeds)
        rng = self.ctx.rng("augment")
        draws = 0
        missing = max(0, cfg.pool_size - len(pool))
        max_draws = cfg.max_draws_per_entry * missing
        augmented: set[str] = set()
        while use_cases and len(pool) < cfg.pool_size and draws < max_draws:
            draws += 1
            use_case = rng.choice(use_cases)
            k = rng.randint(min(cfg.min_skills, len(skills_union)), min(cfg.max_skills, len(skills_union)))
            chosen = set(rng.sample(skills_union, k))
            skills = [s for s in skills_union if s in chosen]
            key = metadata_id(use_case, skills)
            if key in pool:
                continue  # an exact duplicate draw
            pool[key] = (use_case, skills, "augmented", [], [])
            augmented.add(key)
        outputs: list[Record] = []
        for key, (use_case, skills, origin, seeds, lineage) in pool.items():
            uc_seeds = use_case_seeds[use_case]
            sk_seeds = {s: skill_seeds[s] for s in skills}
            if key in augmented:
                seeds = _dedup(uc_seeds + [s for ids in sk_seeds.values() for s in ids])
                event = LineageEvent(
                    stage=self.name, decision="augmented", reason="mix-and-match of seed use case and skills",
                    details={"use_case_seeds": uc_seeds, "skill_seeds": sk_seeds},
                )
            else:
                event = LineageEvent(stage=self.name, decision="pooled", reason=f"metadata of {len(seeds)} input(s)")
            outputs.append(entry_record(use_case, skills, origin, seeds, uc_seeds, sk_seeds, [*lineage, event]))
        return BatchResult(outputs=outputs, rejected=rejected)

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:
        write_pool(self.ctx.artifacts_dir, outputs)


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
    instructions; either way one call is made per entry, shared by every record of that entry.
    """

    Config = RubricsConfig

    def __init__(self, config: RubricsConfig, ctx: Any):
        super().__init__(config, ctx)
        self._calls: dict[str, asyncio.Task[Generation[tuple[list[str], list[str]]]]] = {}

    def _rubrics_for(self, key: str, use_case: str, skills: list[str]) -> tuple[asyncio.Task[Any], bool]:
        if key in self._calls:
            return self._calls[key], False
        cfg = self.config
        n = cfg.count
        call: Awaitable[Generation[Any]] = self.ctx.model(cfg.role).generate(
            load_prompt(cfg.template, self.ctx.base_dir),
            {"use_case": use_case, "skills": skills, "n": n},
            parse=lambda text: parse_rubrics_actions(text, n),
            seed_key=(self.name, key),
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
        )
        self._calls[key] = asyncio.ensure_future(call)
        return self._calls[key], True

    async def process(self, record: Record) -> list[Record]:
        use_case, skills = require_metadata(record, self.name)
        key = entry_key(record)
        task, owner = self._rubrics_for(key, use_case, skills)
        gen = await asyncio.shield(task)
        rubrics, actions = gen.value
        event = gen.event(self.name, decision="rubrics", entry_id=key, rubrics=rubrics, actions=actions)
        if not owner:
            # The call is counted once, on the record that made it.
            event.prompt_tokens = event.completion_tokens = 0
            event.details["shared_call"] = True
        return [record.with_event(event, metadata={**record.metadata, "rubrics": rubrics, "actions": actions})]


# ----------------------------------------------------------------------------- codec.decode


class DecodeConfig(StageConfig):
    type: Literal["codec.decode"] = "codec.decode"
    role: str = Field("strong", description="Model role that writes instructions.")
    template: str = "codec/decode.j2"
    instructions_per_entry: int | None = Field(
        None, ge=1, description="k per entry; default ceil(recipe budget_pairs / number of entries)."
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


def _text_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@register("codec.decode")
class Decode(BatchStage[DecodeConfig]):
    """Per metadata entry, the strong model writes k instructions under its use case and skills (no demos).

    A batch stage because k depends on the pool size. Each instruction is a child record of its entry and
    inherits the entry's metadata; an entry whose reply never parses is rejected (`parse_error`).
    """

    Config = DecodeConfig

    def __init__(self, config: DecodeConfig, ctx: Any):
        super().__init__(config, ctx)
        if config.instructions_per_entry is None and ctx.recipe is not None and ctx.recipe.budget_pairs is None:
            raise UserError("codec.decode: set `budget_pairs` in the recipe or `instructions_per_entry` in the stage")

    async def process_all(self, records: list[Record]) -> BatchResult:
        cfg = self.config
        budget = self.ctx.recipe.budget_pairs if self.ctx.recipe is not None else None
        rejected: dict[str, tuple[str, str]] = {}
        entries: list[tuple[Record, str, list[str]]] = []
        for r in records:
            found = read_metadata(r)
            if found is None:
                rejected[r.id] = ("missing_metadata", "codec.decode: record has no use_case/skills")
            else:
                entries.append((r, *found))
        k = instructions_per_entry(budget, len(entries), cfg.instructions_per_entry)
        semaphore = asyncio.Semaphore(cfg.concurrency)
        prompt = load_prompt(cfg.template, self.ctx.base_dir)

        async def decode(entry: Record, use_case: str, skills: list[str]) -> Generation[list[str]]:
            async with semaphore:
                return await self.ctx.model(cfg.role).generate(
                    prompt,
                    {"use_case": use_case, "skills": skills, "n": k},
                    parse=_parse_instruction_list,
                    seed_key=(self.name, entry.id, k),
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                )

        results = await asyncio.gather(*(decode(*e) for e in entries), return_exceptions=True)
        outputs: list[Record] = []
        abort: BaseException | None = None
        for (entry, use_case, skills), result in zip(entries, results):
            if isinstance(result, RunAbort):
                abort = abort or result
                continue
            if isinstance(result, RecordFailure):
                rejected[entry.id] = (result.kind, str(result))
                continue
            if isinstance(result, BaseException):
                raise result
            outputs.extend(self._children(entry, result, k))
        if abort is not None:
            raise abort
        return BatchResult(outputs=outputs, rejected=rejected)

    def _children(self, entry: Record, gen: Generation[list[str]], k: int) -> list[Record]:
        texts: list[str] = []
        seen: set[str] = set()
        for text in gen.value:
            key = _text_key(text)
            if key and key not in seen:
                seen.add(key)
                texts.append(text)
        texts = texts[:k]
        key = entry_key(entry)
        children: list[Record] = []
        for i, text in enumerate(texts):
            event = gen.event(self.name, decision="decoded", entry_id=key, index=i, requested=k, returned=len(gen.value))
            if i:
                event.prompt_tokens = event.completion_tokens = 0
                event.details["shared_call"] = True
            child = entry.child(
                ("codec.decode", _text_key(text)),
                instruction=text,
                input="",
                response=None,
                metadata={**entry.metadata, "kind": INSTRUCTION_KIND, "entry_id": key, "action_chain": []},
            )
            child.lineage.append(event)
            children.append(child)
        return children


def _parse_instruction_list(text: str) -> list[str]:
    items = _items(text.strip().splitlines())
    if not items:
        # A one-item request may come back as bare text.
        stripped = text.strip()
        if stripped and len(stripped.splitlines()) == 1:
            return [parse_rewritten(stripped)]
        raise ValueError("expected a numbered list of instructions, found none")
    return items


# ----------------------------------------------------------------------------- codec.improve


def pick_action(record: Record, rng: Any) -> tuple[int, str, str | None]:
    """One action, uniformly at random (the paper names no distribution), with its paired rubric."""
    actions = record.metadata.get("actions") or []
    if not actions:
        raise RecordFailure(
            "record has no Self-Rubrics actions; run codec.rubrics before improving instructions", kind="missing_actions"
        )
    index = rng.randrange(len(actions))
    rubrics = record.metadata.get("rubrics") or []
    return index, actions[index], rubrics[index] if index < len(rubrics) else None


ACTION_ECHO_ROUGE = 0.7


def parse_improved(text: str, action: str) -> str:
    """The rewritten instruction; a reply that mostly repeats the action (ROUGE-L ≥ 0.7) is re-asked, since the
    improver is told to apply the action, not to quote it."""
    rewritten = parse_rewritten(text)
    if rouge_l(rouge_tokens(rewritten), rouge_tokens(action)) >= ACTION_ECHO_ROUGE:
        raise ValueError("the reply repeats the change description instead of rewriting the request")
    return rewritten


async def improve_instruction(
    model: RoleModel, template: str, instruction: str, action: str, *, seed_key: Any, base_dir: Path | None = None,
    **sampling: Any,
) -> Generation[str]:
    """The strong model rewrites `instruction` to follow `action` (CodecLM's improver)."""
    return await model.generate(
        load_prompt(template, base_dir),
        {"instruction": instruction, "action": action},
        parse=lambda text: parse_improved(text, action),
        seed_key=seed_key,
        **sampling,
    )


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

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        index, action, rubric = pick_action(record, self.ctx.rng(record.id, "action"))
        gen = await improve_instruction(
            self.ctx.model(cfg.role), cfg.template, record.instruction, action,
            seed_key=(self.name, record.id, index), base_dir=self.ctx.base_dir,
            temperature=cfg.temperature, max_tokens=cfg.max_tokens,
        )
        step = {"action": action, "rubric": rubric, "from": record.instruction}
        chain = [*record.metadata.get("action_chain", []), step]
        child = record.child(
            ("codec.improve", index, gen.value),
            instruction=gen.value,
            response=None,
            metadata={**record.metadata, "action_chain": chain},
        )
        child.lineage.append(gen.event(self.name, decision="improved", action=action, rubric=rubric))
        return [child]


# ----------------------------------------------------------------------------- codec.contrastive


class ContrastiveConfig(StageConfig):
    type: Literal["codec.contrastive"] = "codec.contrastive"
    strong_role: str = Field("strong", description="Model whose answers are distilled.")
    target_role: str = Field(
        "target", description="Model that stands for the target (the paper used an instruction-tuned sibling)."
    )
    judge_role: str = Field("strong", description="Scorer S (the paper: the strong model itself).")
    improver_role: str = Field("strong", description="Model that rewrites instructions between iterations.")
    threshold: float = Field(3.0, ge=0, description="Keep when |G| > threshold (paper: 3 on the 1–10 scale).")
    max_iterations: int = Field(4, ge=1, description="Iterations, counting basic generation as the first (paper: 4).")
    keep_below_threshold: bool = Field(
        False, description="Keep what is still within the threshold after the last iteration (flagged) instead of dropping it."
    )
    respond_template: str = "respond.j2"
    judge_template: str = Field(SCORES_ONLY, description="Pairwise scorer prompt; two scores on the first line.")
    improve_template: str = "codec/improve.j2"
    judge_temperature: float | None = Field(0.0, description="Scorer temperature (not given by the paper).")
    improve_temperature: float | None = Field(0.7, description="Improver temperature (paper: 0.7).")
    response_max_tokens: int | None = Field(None, description="Override max_tokens of both answers.")
    report: bool = Field(True, description="Write codec_report.json/.md/.html into the run directory.")


def _named_scores(scores: PairwiseScores) -> dict[str, Any]:
    """The four raw scores with their sides named: strong is side A, target side B."""
    return {
        "strong_shown_first": {"strong": scores.a_first[0], "target": scores.a_first[1]},
        "target_shown_first": {"strong": scores.b_first[0], "target": scores.b_first[1]},
        "mean_strong": scores.mean_a,
        "mean_target": scores.mean_b,
        "position_consistent": scores.position_consistent,
    }


@register("codec.contrastive")
class Contrastive(MapStage[ContrastiveConfig]):
    """Contrastive Filtering with Self-Rubrics improvement (methods.md §1.3 step 6).

    Per iteration: strong and target answer; the judge scores both in both orders; G = S_strong − S_target
    (means over the orders). |G| > θ: keep (I, strong answer) when G > 0, (I, target answer) when G < 0.
    Otherwise rewrite I with a sampled action and try again, up to `max_iterations` (basic generation is the
    first). Still within θ at the end: rejected as `below_threshold`, or, with `keep_below_threshold`, kept
    with the strong answer and flagged (`metadata.codec.below_threshold`).
    """

    Config = ContrastiveConfig

    async def _answer(self, role: str, instruction: str, input: str, seed_key: Any) -> Generation[str]:
        return await self.ctx.model(role).generate(
            load_prompt(self.config.respond_template, self.ctx.base_dir),
            {"instruction": instruction, "input": input},
            seed_key=seed_key,
            max_tokens=self.config.response_max_tokens,
        )

    async def _improve(self, record: Record, instruction: str, iteration: int, events: list[LineageEvent]) -> tuple[str, dict[str, Any]]:
        """Rewrite `instruction` by one action sampled from the entry's actions; returns it and the chain step."""
        cfg = self.config
        index, action, rubric = pick_action(record, self.ctx.rng(record.id, "action", iteration))
        gen = await improve_instruction(
            self.ctx.model(cfg.improver_role), cfg.improve_template, instruction, action,
            seed_key=(self.name, record.id, iteration, index), base_dir=self.ctx.base_dir,
            temperature=cfg.improve_temperature,
        )
        events.append(gen.event(self.name, decision="improved", iteration=iteration, action=action, rubric=rubric))
        return gen.value, {"iteration": iteration, "action": action, "rubric": rubric, "from": instruction}

    async def _score(self, record: Record, instruction: str, iteration: int, events: list[LineageEvent]) -> tuple[str, str, PairwiseScores]:
        """Both answers, judged in both orders: (strong answer, target answer, scores)."""
        cfg = self.config
        key = (self.name, record.id, iteration)
        strong, target = await asyncio.gather(
            self._answer(cfg.strong_role, instruction, record.input, (*key, "strong")),
            self._answer(cfg.target_role, instruction, record.input, (*key, "target")),
        )
        events.append(strong.event(self.name, decision="answered", iteration=iteration, side="strong"))
        events.append(target.event(self.name, decision="answered", iteration=iteration, side="target"))
        strong_text, target_text = strong.text.strip(), target.text.strip()
        if not strong_text:
            raise RecordFailure(f"iteration {iteration}: {cfg.strong_role} returned an empty answer", kind="empty_response")
        question = f"{instruction}\n\n{record.input}" if record.input else instruction
        scores, judged = await judge_pair(
            self.ctx.model(cfg.judge_role), question, strong_text, target_text,
            template=cfg.judge_template, seed_key=key, base_dir=self.ctx.base_dir, temperature=cfg.judge_temperature,
        )
        event = judged[0].event(self.name, decision="scored", iteration=iteration, G=scores.gap, **_named_scores(scores))
        event.prompt_tokens += judged[1].prompt_tokens
        event.completion_tokens += judged[1].completion_tokens
        events.append(event)
        return strong_text, target_text, scores

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        events: list[LineageEvent] = []
        history: list[dict[str, Any]] = []
        chain: list[dict[str, Any]] = list(record.metadata.get("action_chain", []))
        instruction = record.instruction
        strong_text = target_text = ""
        try:
            for iteration in range(1, cfg.max_iterations + 1):
                step: dict[str, Any] = {"iteration": iteration}
                if iteration > 1:
                    instruction, link = await self._improve(record, instruction, iteration, events)
                    chain.append(link)
                    step.update(action=link["action"], rubric=link["rubric"])
                step["instruction"] = instruction
                history.append(step)
                strong_text, target_text, scores = await self._score(record, instruction, iteration, events)
                step.update(scores=_named_scores(scores), G=scores.gap)
                if abs(scores.gap) > cfg.threshold:
                    side = "strong" if scores.gap > 0 else "target"
                    return [self._kept(record, instruction, side, strong_text, target_text, history, chain, events, False)]
        except RecordFailure as failure:
            failure.record = self._trace(record, history, chain, events)
            raise
        if cfg.keep_below_threshold:
            # Within θ neither answer is clearly better; the target's answer is kept only when it clearly wins.
            return [self._kept(record, instruction, "strong", strong_text, target_text, history, chain, events, True)]
        gaps = ", ".join(f"{h['G']:+.2f}" for h in history)
        events.append(LineageEvent(
            stage=self.name, decision="dropped", reason=f"|G| <= {cfg.threshold} after {len(history)} iteration(s)",
            details={"gaps": [h["G"] for h in history]},
        ))
        raise Rejected(
            f"|G| stayed within the threshold {cfg.threshold} for {len(history)} iteration(s): G = {gaps}",
            kind="below_threshold",
            record=self._trace(record, history, chain, events),
        )

    def _summary(self, history: list[dict[str, Any]], kept: str | None, below: bool) -> dict[str, Any]:
        last = history[-1] if history else {}
        return {
            "kept": kept,
            "below_threshold": below,
            "iteration": len(history),
            "G": last.get("G"),
            "scores": last.get("scores"),
            "threshold": self.config.threshold,
            "history": history,
        }

    def _trace(self, record: Record, history: list[dict[str, Any]], chain: list[dict[str, Any]], events: list[LineageEvent]) -> Record:
        """The input record with everything that was tried: what a failure row shows."""
        traced = record.model_copy(deep=True)
        traced.metadata = {**record.metadata, "action_chain": chain, "codec": self._summary(history, None, False)}
        traced.lineage.extend(events)
        return traced

    def _kept(
        self, record: Record, instruction: str, side: str, strong_text: str, target_text: str,
        history: list[dict[str, Any]], chain: list[dict[str, Any]], events: list[LineageEvent], below: bool,
    ) -> Record:
        summary = {
            **self._summary(history, side, below),
            "strong_response": strong_text,
            "target_response": target_text,
            "entry_id": entry_key(record),
        }
        gap = summary["G"]
        reason = (
            f"|G| = {abs(gap):.2f} <= {self.config.threshold} after the last iteration; kept by keep_below_threshold"
            if below else f"G = {gap:+.2f}, |G| > {self.config.threshold}"
        )
        out = record.child(
            ("codec.contrastive", len(history)),
            instruction=instruction,
            response=strong_text if side == "strong" else target_text,
            metadata={**record.metadata, "action_chain": chain, "codec": summary},
        )
        out.lineage.extend(events)
        out.lineage.append(LineageEvent(
            stage=self.name, decision=f"kept:{side}", reason=reason,
            details={"iteration": len(history), "G": gap, "below_threshold": below},
        ))
        return out

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:
        if not self.config.report:
            return
        recipe = self.ctx.recipe
        write_codec_report(
            self.ctx.artifacts_dir,
            kept=outputs,
            dropped=failures,
            pool=run_file_rows(self.ctx.artifacts_dir / METADATA_FILE),
            threshold=self.config.threshold,
            max_iterations=self.config.max_iterations,
            budget_pairs=recipe.budget_pairs if recipe is not None else None,
            pool_requested=_requested_pool_size(recipe),
        )


def _requested_pool_size(recipe: Any) -> int | None:
    for stage in getattr(recipe, "stages", None) or []:
        if isinstance(stage, AugmentConfig):
            return stage.pool_size
    return None


# ----------------------------------------------------------------------------- codec.select


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


def _abs_gap(record: Record) -> float:
    gap = (record.metadata.get("codec") or {}).get("G")
    return abs(gap) if isinstance(gap, (int, float)) else 0.0


@register("codec.select")
class Select(BatchStage[SelectConfig]):
    """Trim to exactly `budget_pairs` when more were kept; the order of the kept records is unchanged."""

    Config = SelectConfig

    async def process_all(self, records: list[Record]) -> BatchResult:
        cfg = self.config
        budget = cfg.budget_pairs or (self.ctx.recipe.budget_pairs if self.ctx.recipe is not None else None)
        if budget is None:
            raise UserError("codec.select: set `budget_pairs` in the recipe or in the stage")
        if len(records) <= budget:
            return BatchResult(outputs=list(records))
        order = list(range(len(records)))
        if cfg.strategy == "gap":
            order.sort(key=lambda i: (-_abs_gap(records[i]), i))
        elif cfg.strategy == "random":
            self.ctx.rng("select").shuffle(order)
        else:
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(records):
                group = r.metadata.get("entry_id") or (r.parents[0] if r.parents else r.id)
                groups.setdefault(group, []).append(i)
            queues = [sorted(ids, key=lambda i: (-_abs_gap(records[i]), i)) for ids in groups.values()]
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
