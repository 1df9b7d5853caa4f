"""Stages: small classes with a typed config that map records to records.

A stage knows nothing about concurrency between records, caching, retries, checkpoints or files. It gets
a `StageContext` (models by role, seeded randomness, the run's data budget, its own artifacts folder) and
either

* maps one record to one or more records (`MapStage.process`), raising `Rejected` (or another
  `RecordFailure`) to drop it with a reason; or
* sees all records at once (`BatchStage.process_all`) for work that needs the whole set: dedup,
  metadata augmentation, novelty filters. It returns the kept/new records and the rejected ids.

Every stage declares its contract (docs/method-contract.md): the `method` it belongs to, what it `needs`
from earlier stages, what it `provides`, what its outputs no longer carry (`clears`), and for each
template field the variables it passes (`templates`). `datatailor validate` and `datatailor run`
check a recipe against these before anything is spent.

The plumbing every method needs lives here once: `call` (render a declared template and call a role),
`answer` (answer an instruction with a role; empty or truncated answers are failures), `gather`
(bounded concurrent calls inside a batch stage, failures sorted out as failure rows) and `shared_call`
(one call shared by many records, made once, checkpointed, paid for once).

Register a stage with `@register("type.name")`; recipes name it in `stages: - type: ...`.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from datatailor.errors import RecordFailure, RunAbort, UserError
from datatailor.llm.base import CALL_OWNER
from datatailor.llm.models import Generation, ModelPool, RoleModel
from datatailor.prompts import Prompt, load_prompt
from datatailor.records import Record, derive_seed
from datatailor.stages.contract import Contract
from datatailor.stages.shared import SharedCalls

if TYPE_CHECKING:
    from datatailor.store import RecordSource

T = TypeVar("T")
R = TypeVar("R")

# What a template that answers or rewrites one record sees of it.
RECORD_VARIABLES = ("id", "instruction", "input", "response", "prompt", "metadata")
# Files of a stage's folder that belong to the runner; a stage's artifacts use other names.
RESERVED_FILES = frozenset({"outputs.jsonl", "failures.jsonl", "done.json", "shared_calls.jsonl", "records.jsonl"})


def record_variables(record: Record) -> dict[str, Any]:
    """What a template sees of a record."""
    return {
        "id": record.id,
        "instruction": record.instruction,
        "input": record.input,
        "response": record.response,
        "prompt": record.prompt,
        "metadata": record.metadata,
    }


class StageConfig(BaseModel):
    """Fields every stage accepts. Subclasses add their own; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = Field(None, description="Unique name in the recipe (defaults to `type`).")
    concurrency: int = Field(16, ge=1, description="Records (or, in a batch stage, calls) processed at once by this stage.")

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
    artifacts_dir: Path  # this stage's own folder in the run directory
    base_dir: Path  # the recipe's folder: relative paths in the config resolve against it
    budget_pairs: int | None = None  # the run's data budget (recipe `budget_pairs`)
    earlier_dirs: list[Path] = field(default_factory=list)  # folders of the stages before this one, in order
    shared: SharedCalls = field(default_factory=lambda: SharedCalls(None))

    def model(self, role: str) -> RoleModel:
        return self.models.role(role)

    def rng(self, *key: Any) -> random.Random:
        """A random generator seeded by the recipe seed, this stage and `key` (e.g. a record id)."""
        return random.Random(derive_seed(self.seed, self.stage_name, *key))

    def artifact(self, name: str) -> Path:
        """Where this stage writes an artifact file `name` (its own folder; runner file names are refused)."""
        if name in RESERVED_FILES or "/" in name:
            raise ValueError(f"{name!r} is not a valid artifact name for stage {self.stage_name}")
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        return self.artifacts_dir / name

    def earlier_artifact(self, name: str) -> Path | None:
        """The artifact `name` written by the nearest earlier stage that wrote one, if any."""
        for folder in reversed(self.earlier_dirs):
            if (folder / name).is_file():
                return folder / name
        return None


@dataclass
class Delivery:
    """What a stage with its own target delivered; the runner reports a shortfall when `delivered < asked`."""

    asked: int
    delivered: int
    why: str


class Stage(ABC, Generic[C]):
    type_name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    # The contract (docs/method-contract.md). `method` is a key of stages.contract.METHODS, None for generic stages.
    method: ClassVar[str | None] = None
    needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    clears: ClassVar[tuple[str, ...]] = ()
    # Config field holding a template name -> the variables the stage passes when rendering it.
    templates: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Whether `--executor ray` may spread it over workers: a map stage whose records are independent. Whole-set
    # stages, and map stages whose records share calls (each shared call has one owner), run on the driver.
    distributed: ClassVar[bool] = False
    # Whether it trims the run to `budget_pairs` (`select`, `codec.select`): the runner moves such a trim after the
    # stages that drop pairs once the run is short (runner/rounds.py).
    trims_to_budget: ClassVar[bool] = False

    def __init__(self, config: C, ctx: StageContext):
        self.config = config
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.config.name or self.config.type

    @classmethod
    def contract(cls, config: StageConfig) -> Contract:
        """What this stage needs and provides with `config` (override when it depends on the config)."""
        return Contract.of(cls.needs, cls.provides, cls.clears)

    @classmethod
    def template_variables(cls, config: StageConfig) -> dict[str, tuple[str, ...]]:
        return dict(cls.templates)

    def finalize(self, outputs: list[Record], failures: list[dict[str, Any]]) -> None:  # noqa: B027 - optional hook
        """Called once the stage has finished over every record: write reports/artifacts here.

        `failures` are this stage's failure rows (as in failures.jsonl), in input order, including
        those of earlier invocations when the run was resumed.
        """

    def delivery(self, outputs: list[Record], failures: list[dict[str, Any]]) -> Delivery | None:
        """A stage with its own target says what it delivered of it (None: no target)."""
        return None

    # -- plumbing shared by every method ---------------------------------------------------------

    def prompt(self, template_field: str) -> Prompt:
        return load_prompt(getattr(self.config, template_field), self.ctx.base_dir)

    async def call(
        self, role: str, template_field: str, variables: dict[str, Any], *, seed_key: Any, **options: Any
    ) -> Generation[Any]:
        """Render the template named by `template_field` with `variables` and call `role`.

        The variables must be exactly those the stage declares for that field in `templates`, so what
        `validate` checks user templates against is what the stage really passes.
        """
        declared = self.template_variables(self.config).get(template_field)
        if declared is None or set(variables) != set(declared):
            raise RuntimeError(
                f"{type(self).__name__} passes {sorted(variables)} to {template_field}, but declares {declared}"
            )
        return await self.ctx.model(role).generate(
            self.prompt(template_field), variables, seed_key=seed_key, stage=self.name, **options
        )

    async def answer(
        self, role: str, record: Record, *, template_field: str = "respond_template", seed_key: Any,
        keep_truncated: bool = False, **sampling: Any,
    ) -> Generation[str]:
        """Answer `record` (its instruction and input) with `role`.

        An empty answer is an `empty_response` failure; an answer cut off by max_tokens is a `truncated`
        failure unless `keep_truncated` (a truncated answer is not used as a training target by default).
        """
        gen = await self.call(role, template_field, record_variables(record), seed_key=seed_key, **sampling)
        if not gen.text.strip():
            raise RecordFailure(f"{role} ({gen.model}) returned an empty answer", kind="empty_response")
        if gen.truncated and not keep_truncated:
            raise RecordFailure(
                f"{role} ({gen.model})'s answer was cut off by max_tokens after {gen.completion_tokens} tokens; "
                "raise max_tokens (or set keep_truncated: true to keep cut answers)",
                kind="truncated",
            )
        return gen

    async def gather(self, items: Sequence[T], call: Callable[[T], Awaitable[R]]) -> list[R | RecordFailure]:
        """Run `call` over `items`, `config.concurrency` at a time (with a batched role, its `batch_records_in_flight`,
        so that one provider batch gathers them); results in item order.

        A `RecordFailure` is returned in the item's place (for the caller to turn into a failure row); a bug
        in `call` becomes a `stage_error` failure; a run-level stop (budget, dead server) or a user error is
        raised once every started call has finished.
        """
        semaphore = asyncio.Semaphore(self.ctx.models.records_in_flight(self.config.role_fields().values(), self.config.concurrency))

        async def one(item: T) -> R:
            record = item[0] if isinstance(item, tuple) and item else item
            if isinstance(record, Record):
                CALL_OWNER.set(f"{self.name}:{record.id}")  # this task's own context: named in a batch journal
            async with semaphore:
                try:
                    return await call(item)
                except (RecordFailure, RunAbort, UserError):
                    raise
                except Exception as exc:
                    raise RecordFailure(f"{type(exc).__name__}: {exc}", kind="stage_error") from exc

        results = await asyncio.gather(*(one(i) for i in items), return_exceptions=True)
        for result in results:
            if isinstance(result, (RunAbort, UserError)):
                raise result
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, RecordFailure):
                raise result
        return results  # type: ignore[return-value]

    async def shared_call(
        self, key: str, owner: str, make: Callable[[], Awaitable[Generation[T]]], parse: Callable[[str], T] | None = None
    ) -> tuple[Generation[T], bool]:
        """A call many records use (see `stages.shared`): made once by `owner`'s record, checkpointed, paid for once.

        Returns the generation as seen by `owner` (zero tokens unless it owns the call) and whether it does.
        """
        return await self.ctx.shared.get(key, owner, make, parse)


class MapStage(Stage[C]):
    distributed: ClassVar[bool] = True

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

    def top_up_rounds(self) -> int:
        """How many extra rounds this stage may write when the run delivers fewer than `budget_pairs` (0: none)."""
        return 0

    async def top_up(self, records: list[Record], produced: list[Record], deficit: int, round: int) -> list[Record]:
        """Write more records for round `round` (≥ 2): the run ended `deficit` short of `budget_pairs`.

        `records` are this stage's inputs, `produced` everything it wrote in earlier rounds. Returns the new
        records only (ids distinct from `produced`); the runner sends them through the later stages.
        """
        raise NotImplementedError


# (input, the record kept in its place or None, (kind, message) when dropped)
Decision = tuple[Record, "Record | None", "tuple[str, str] | None"]


class FilterStage(BatchStage[C]):
    """A whole-set stage that only keeps or drops records and decides from compact keys of them (hashes,
    signatures, short texts), so the runner can stream it over millions of records: `decide` reads the
    input as often as it needs and yields one decision per input, in input order."""

    @abstractmethod
    def decide(self, records: "RecordSource") -> Iterator[Decision]:
        """For each input in order: (input, the record to keep, None) or (input, None, (kind, message))."""

    async def process_all(self, records: list[Record]) -> BatchResult:
        from datatailor.store import ListSource

        outputs: list[Record] = []
        rejected: dict[str, tuple[str, str]] = {}
        for record, kept, why in self.decide(ListSource(records)):
            if kept is not None:
                outputs.append(kept)
            else:
                assert why is not None
                rejected[record.id] = why
        return BatchResult(outputs=outputs, rejected=rejected)


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
