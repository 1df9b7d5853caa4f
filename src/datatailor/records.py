"""Records: the unit every stage reads and writes, with the lineage of who touched it and why."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short, stable hex digest of JSON-serialisable parts (ids, cache keys, seeds)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed derived from stable parts, so random choices do not depend on scheduling order."""
    return int(stable_hash(*parts, length=8), 16) & 0x7FFFFFFF


class LineageEvent(BaseModel):
    """One stage's touch on a record: which model it used, what it cost and what it decided."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    role: str | None = None
    model: str | None = None
    template_hash: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    decision: str | None = None
    reason: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Record(BaseModel):
    """An instruction-response pair (or a seed, or a metadata entry) moving through a recipe."""

    model_config = ConfigDict(extra="forbid")

    id: str
    instruction: str = ""
    input: str = ""
    response: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list)
    lineage: list[LineageEvent] = Field(default_factory=list)

    @staticmethod
    def make_id(instruction: str, input: str = "", *salt: Any) -> str:
        return stable_hash(instruction, input, *salt)

    @classmethod
    def new(
        cls,
        instruction: str,
        input: str = "",
        response: str | None = None,
        metadata: dict[str, Any] | None = None,
        id: str | None = None,
    ) -> "Record":
        return cls(
            id=id or cls.make_id(instruction, input),
            instruction=instruction,
            input=input,
            response=response,
            metadata=dict(metadata or {}),
        )

    def child(self, key: Any, **changes: Any) -> "Record":
        """A new record derived from this one; its id is a stable hash of the parent id and `key`."""
        data = self.model_dump()
        data.update(changes)
        data["id"] = stable_hash(self.id, key)
        data["parents"] = [self.id]
        data["lineage"] = [e.model_dump() for e in self.lineage]
        return Record.model_validate(data)

    def with_event(self, event: LineageEvent, **changes: Any) -> "Record":
        """A copy of this record with `changes` applied and `event` appended to its lineage."""
        updated = self.model_copy(update=changes, deep=True)
        updated.lineage.append(event)
        return updated

    @property
    def prompt(self) -> str:
        """The instruction and its input as one prompt text, Alpaca style."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, sort_keys=False)


# A field a stage can write: instruction, input, response, or a top-level metadata.<key>.
WRITABLE_FIELD = r"^(instruction|input|response|metadata\.[A-Za-z_][A-Za-z0-9_]*)$"
# A readable field: instruction, input, prompt, response, or metadata.<key>[.<key>…] (e.g. metadata.refed.draft).
FIELD_PATTERN = r"^(instruction|input|prompt|response|metadata(\.[A-Za-z_][A-Za-z0-9_]*)+)$"


def read_field(record: Record, path: str) -> Any:
    """Value of `instruction`, `input`, `prompt`, `response` or `metadata.<key>[.<key>…]` (None where absent)."""
    if path.startswith("metadata."):
        value: Any = record.metadata
        for key in path.split(".")[1:]:
            value = value.get(key) if isinstance(value, dict) else None
        return value
    return getattr(record, path)


def inherit_once(children: list["Record"], parent: "Record") -> None:
    """Children that copy `parent`'s lineage count its calls once: on the first child only.

    A record that fans out (an entry into instructions, a reference into synthesized pairs) hands each
    child a copy of its lineage; summing tokens over the children would count the parent's calls once per
    child. The other children keep the events (what was done) with zero tokens and $, marked shared.
    """
    inherited = len(parent.lineage)
    for child in children[1:]:
        for event in child.lineage[:inherited]:
            if event.prompt_tokens or event.completion_tokens or event.cost_usd:
                event.prompt_tokens = event.completion_tokens = 0
                event.cost_usd = 0.0
                event.details["counted_on"] = children[0].id


def field_update(record: Record, path: str, value: Any) -> dict[str, Any]:
    """The `changes` dict that sets `path` to `value` (for Record.with_event / model_copy); one metadata level."""
    if path.count(".") > 1:
        raise ValueError(f"{path}: only a top-level metadata key can be written")
    if path.startswith("metadata."):
        return {"metadata": {**record.metadata, path.split(".", 1)[1]: value}}
    if path == "prompt":
        raise ValueError("`prompt` is derived from instruction and input; it cannot be written")
    return {path: value}
