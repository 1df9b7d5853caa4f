"""CodecLM's per-record data: the `codec` namespace, metadata entries, and the capabilities its stages
declare (`codec.metadata`, `codec.actions`).

A metadata entry is a record with an empty instruction and `codec.kind == "entry"`; its id is a stable hash of
(use case, sorted skills), also stored as `codec.entry_id`. Instructions decoded from an entry carry its whole
namespace (use case, skills, provenance, rubrics, actions), so per-entry work is never repeated per instruction.
A kept pair carries `codec.contrastive`: the iteration, both answers, the four raw judge scores, G and the history
of every iteration; `codec.action_chain` lists the actions applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from datatailor.io import write_json, write_jsonl
from datatailor.records import LineageEvent, Record, stable_hash
from datatailor.stages.contract import register_capability
from datatailor.stages.namespace import Namespace

METADATA_FILE = "metadata.jsonl"  # the pool, written by codec.metadata and codec.augment
POOL_FILE = "pool.json"  # the pool's size, what was requested, and where its entries came from


class ActionStep(BaseModel):
    """One Self-Rubrics action applied to an instruction."""

    model_config = ConfigDict(extra="forbid")

    action: str
    rubric: str | None = None
    before: str = Field(description="The instruction the action was applied to.")
    iteration: int | None = None  # the contrastive iteration it led to (None: a codec.improve stage)


class ContrastiveResult(BaseModel):
    """What Contrastive Filtering decided for one instruction, with everything that was tried."""

    model_config = ConfigDict(extra="forbid")

    kept: Literal["strong", "target"] | None = None
    below_threshold: bool = False
    iteration: int = 0
    G: float | None = None
    scores: dict[str, Any] | None = None
    threshold: float
    history: list[dict[str, Any]] = Field(default_factory=list)
    strong_response: str | None = None
    target_response: str | None = None


class CodecData(Namespace):
    key = "codec"

    kind: Literal["entry", "instruction"] | None = None
    entry_id: str | None = None
    use_case: str | None = None
    skills: list[str] = Field(default_factory=list)
    origin: Literal["seed", "given", "augmented"] | None = None
    seeds: list[str] = Field(default_factory=list)
    use_case_seeds: list[str] = Field(default_factory=list)
    skill_seeds: dict[str, list[str]] = Field(default_factory=dict)
    rubrics: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    action_chain: list[ActionStep] = Field(default_factory=list)
    decode_round: int | None = None  # the decode round that wrote this instruction (1, or a top-up round)
    contrastive: ContrastiveResult | None = None


def metadata_id(use_case: str, skills: Sequence[str]) -> str:
    """Id of the metadata entry (use case, skills); the order of the skills does not matter."""
    return stable_hash("codec.metadata", use_case, sorted(skills))


def codec_metadata(record: Record) -> tuple[str, list[str]] | None:
    """(use case, skills) of a record: from its `codec` namespace, else from `use_case`/`skills` columns of
    the input file (a user's own annotated seeds); None when it has neither."""
    data = CodecData.of(record)
    if data is not None and data.use_case and data.skills:
        return data.use_case, list(data.skills)
    use_case, skills = record.metadata.get("use_case"), record.metadata.get("skills")
    if isinstance(use_case, str) and use_case and isinstance(skills, list) and skills:
        return use_case, [str(s) for s in skills]
    return None


def entry_key(record: Record) -> str:
    """The metadata entry a record belongs to (itself, for an entry)."""
    data = CodecData.of(record)
    if data is not None and data.entry_id:
        return data.entry_id
    found = codec_metadata(record)
    return metadata_id(*found) if found else record.id


def is_entry(record: Record) -> bool:
    data = CodecData.of(record)
    return data is not None and data.kind == "entry"


def entry_record(
    use_case: str,
    skills: list[str],
    origin: Literal["seed", "given", "augmented"],
    seeds: list[str],
    use_case_seeds: list[str],
    skill_seeds: dict[str, list[str]],
    lineage: list[LineageEvent],
) -> Record:
    key = metadata_id(use_case, skills)
    data = CodecData(
        kind="entry", entry_id=key, use_case=use_case, skills=list(skills), origin=origin, seeds=list(seeds),
        use_case_seeds=list(use_case_seeds), skill_seeds={s: list(ids) for s, ids in skill_seeds.items()},
    )
    record = Record(id=key, instruction="", parents=list(seeds), lineage=list(lineage))
    record.metadata = data.stored(record)
    return record


def pool_row(record: Record) -> dict[str, Any]:
    """One line of metadata.jsonl."""
    data = CodecData.get(record)
    return {
        "id": record.id,
        "use_case": data.use_case,
        "skills": data.skills,
        "origin": data.origin or "seed",
        "seeds": data.seeds,
        "use_case_seeds": data.use_case_seeds,
        "skill_seeds": data.skill_seeds,
    }


def write_pool(folder_file: Path, records: list[Record], requested: int | None = None) -> None:
    """metadata.jsonl (the entries) and pool.json (size, request, origins) beside it."""
    rows = [pool_row(r) for r in records if is_entry(r)]
    write_jsonl(folder_file, rows)
    origins: dict[str, int] = {}
    for row in rows:
        origins[row["origin"]] = origins.get(row["origin"], 0) + 1
    write_json(folder_file.with_name(POOL_FILE), {"size": len(rows), "requested": requested, "origins": origins})


register_capability("codec.metadata", "CodecLM metadata (a use case and skills)", lambda r: codec_metadata(r) is not None)
register_capability(
    "codec.actions", "Self-Rubrics actions (codec.rubrics)",
    lambda r: bool((d := CodecData.of(r)) is not None and d.actions),
)
