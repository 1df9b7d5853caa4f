"""Stages: small classes with a typed config that map records to records.

A stage knows nothing about concurrency, caching, retries, checkpoints or files. It gets a
`StageContext` (models by role, seeded randomness, a folder for its artifacts) and either

* maps one record to one or more records (`MapStage.process`), raising `Rejected` (or another
  `RecordFailure`) to drop it with a reason; or
* sees all records at once (`BatchStage.process_all`) for work that needs the whole set: dedup,
  metadata augmentation, novelty filters. It returns the kept/new records and the rejected ids.

Register a stage with `@register("type.name")`; recipes name it in `stages: - type: ...`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from datatailor.llm.models import ModelPool, RoleModel
from datatailor.records import Record, derive_seed


class StageConfig(BaseModel):
    """Fields every stage accepts. Subclasses add their own; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = Field(None, description="Unique name in the recipe (defaults to `type`).")
    concurrency: int = Field(16, ge=1, description="Records processed at once by this stage.")

    def role_fields(self) -> dict[str, str]:
        """Every model role this stage uses: fields named `role` or ending in `_role`."""
        out: dict[str, str] = {}
        for name, value in self:
            if (name == "role" or name.endswith("_role")) and isinstance(value, str):
                out[name] = value
        return out


C = TypeVar("C", bound=StageConfig)


@dataclass
class StageContext:
    """What a stage may use while it runs."""

    models: ModelPool
    stage_name: str
    seed: int
    artifacts_dir: Path
    base_dir: Path
    recipe: Any = None

    def model(self, role: str) -> RoleModel:
        return self.models.role(role)

    def rng(self, *key: Any) -> random.Random:
        """A random generator seeded by the recipe seed, this stage and `key` (e.g. a record id)."""
        return random.Random(derive_seed(self.seed, self.stage_name, *key))


class Stage(ABC, Generic[C]):
    type_name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: C, ctx: StageContext):
        self.config = config
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.config.name or self.config.type

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:  # noqa: B027 - optional hook
        """Called once the stage has finished over every record: write reports/artifacts here.

        `failures` are this stage's failure rows (as in failures.jsonl), in input order, including
        those of earlier invocations when the run was resumed.
        """


class MapStage(Stage[C]):
    @abstractmethod
    async def process(self, record: Record) -> list[Record]:
        """Return the records that replace `record` (at least one), or raise a RecordFailure."""


@dataclass
class BatchResult:
    outputs: list[Record]
    # input id -> (kind, message) for inputs that were dropped
    rejected: dict[str, tuple[str, str]] = field(default_factory=dict)


class BatchStage(Stage[C]):
    @abstractmethod
    async def process_all(self, records: list[Record]) -> BatchResult:
        """Turn the whole set into a new set. Inputs not in `rejected` count as used."""


STAGES: dict[str, type[Stage[Any]]] = {}


def register(type_name: str):
    """Class decorator: make a stage available to recipes under `type_name`."""

    def deco(cls: type[Stage[Any]]) -> type[Stage[Any]]:
        if type_name in STAGES and STAGES[type_name] is not cls:
            raise RuntimeError(f"stage type {type_name!r} registered twice")
        cls.type_name = type_name
        STAGES[type_name] = cls
        return cls

    return deco
