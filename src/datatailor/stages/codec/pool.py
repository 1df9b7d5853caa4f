"""The metadata pool: `codec.encode` (seed → use case and skills), `codec.metadata` (written by hand) and
`codec.augment` (mix-and-match up to the pool size). Both pool stages write `metadata.jsonl` and `pool.json`
into their own folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datatailor.errors import UserError
from datatailor.io import read_jsonl_rows, read_yaml
from datatailor.llm.structured import normalise_label, parse_use_case_skills
from datatailor.records import LineageEvent, Record
from datatailor.stages.base import BatchResult, BatchStage, MapStage, StageConfig, register
from datatailor.stages.codec.data import METADATA_FILE, CodecData, codec_metadata, entry_record, is_entry, metadata_id, write_pool
from datatailor.stages.codec.parsers import clean_skill, dedup

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
    """Seed instruction → the same record with a use case and skills in its `codec` namespace."""

    Config = EncodeConfig
    method = "codec"
    needs = ("instruction",)
    provides = ("codec.metadata",)
    templates = {"template": ("instruction", "max_skills")}

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        n = cfg.max_skills
        gen = await self.call(
            cfg.role, "template", {"instruction": record.prompt, "max_skills": n},
            parse=lambda text: parse_use_case_skills(text, n),
            seed_key=(self.name, record.id), temperature=cfg.temperature, max_tokens=cfg.max_tokens,
        )
        use_case, raw_skills = gen.value
        skills = dedup([clean_skill(s) for s in raw_skills])[:n]
        event = gen.event(self.name, decision="encoded", use_case=use_case, skills=skills, reply=gen.text)
        data = CodecData.get(record).update(use_case=use_case, skills=skills)
        return [record.with_event(event, metadata=data.stored(record))]


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
    method = "codec"
    provides = ("codec.metadata",)

    async def process_all(self, records: list[Record]) -> BatchResult:
        given = list(self.config.entries)
        if self.config.file:
            given += load_given_entries(self.ctx.base_dir / self.config.file)
        outputs: list[Record] = []
        rejected: dict[str, tuple[str, str]] = {}
        for r in records:
            if codec_metadata(r) is None:
                rejected[r.id] = ("missing_metadata", "codec.metadata: input record has no use_case/skills")
            else:
                outputs.append(r)
        seen = {r.id for r in outputs}
        for spec in given:
            use_case = normalise_label(spec.use_case)
            skills = dedup([normalise_label(s) for s in spec.skills])
            key = metadata_id(use_case, skills)
            if key in seen:
                continue
            seen.add(key)
            event = LineageEvent(stage=self.name, decision="given", reason="metadata written by hand")
            outputs.append(entry_record(use_case, skills, "given", [key], [key], {s: [key] for s in skills}, [event]))
        return BatchResult(outputs=outputs, rejected=rejected)

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:
        write_pool(self.ctx.artifact(METADATA_FILE), outputs)


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
    method = "codec"
    needs = ("codec.metadata",)
    provides = ("codec.metadata",)

    async def process_all(self, records: list[Record]) -> BatchResult:
        cfg = self.config
        rejected: dict[str, tuple[str, str]] = {}
        use_case_seeds: dict[str, list[str]] = {}
        skill_seeds: dict[str, list[str]] = {}
        # entry id -> (use case, skills, origin, seeds, lineage)
        pool: dict[str, tuple[str, list[str], Any, list[str], list[LineageEvent]]] = {}
        for r in records:
            found = codec_metadata(r)
            if found is None:
                rejected[r.id] = ("missing_metadata", "codec.augment: input record has no use_case/skills")
                continue
            use_case, skills = found
            entry = is_entry(r)
            data = CodecData.get(r)
            sources = list(data.seeds or [r.id]) if entry else [r.id]
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
                origin = (data.origin or "seed") if entry else "seed"
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
            chosen = set(rng.sample(skills_union, k))  # without replacement: k distinct skills
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
                seeds = dedup(uc_seeds + [s for ids in sk_seeds.values() for s in ids])
                event = LineageEvent(
                    stage=self.name, decision="augmented", reason="mix-and-match of seed use case and skills",
                    details={"use_case_seeds": uc_seeds, "skill_seeds": sk_seeds},
                )
            else:
                event = LineageEvent(stage=self.name, decision="pooled", reason=f"metadata of {len(seeds)} input(s)")
            outputs.append(entry_record(use_case, skills, origin, seeds, uc_seeds, sk_seeds, [*lineage, event]))
        return BatchResult(outputs=outputs, rejected=rejected)

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:
        write_pool(self.ctx.artifact(METADATA_FILE), outputs, requested=self.config.pool_size)
