"""Recipes: YAML files naming models by role, an input, and a list of stages. Validated by pydantic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from datatailor.errors import UserError
from datatailor.io import check_fields, read_yaml
from datatailor.llm.config import BATCH_SETTINGS, ModelConfig
from datatailor.llm.usage import Budget
from datatailor.stages import StageConfig, load_all

ExportFormat = Literal["alpaca", "sharegpt", "openai"]


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A JSONL/JSON/Parquet file or an HF `datasets` folder.")
    format: str | None = Field(None, description="Force a format instead of detecting it.")
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Column names for a layout datatailor does not detect, target: column (matched case-insensitively), "
            "e.g. {instruction: Question, input: Context, response: Answer, category: Topic}. "
            "Targets: instruction, input, response, category, id. Other columns stay in metadata."
        ),
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _check_fields(cls, v: Any) -> dict[str, str]:
        return check_fields(v)

    @model_validator(mode="after")
    def _format_or_mapping(self) -> "InputSpec":
        if self.format is not None and "instruction" in self.fields:
            raise ValueError("give either `format` or `fields.instruction`, not both")
        return self

    @model_serializer(mode="wrap")
    def _drop_empty_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Without a mapping the recipe dumps (and hashes) as before, so existing runs still resume.
        data = handler(self)
        if not self.fields:
            data.pop("fields", None)
        return data


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    formats: list[ExportFormat] = Field(
        default_factory=list, description="Also export data.jsonl as these formats (data.<format>.jsonl)."
    )


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    input: InputSpec | None = None
    stages: list[Any] = Field(min_length=1)
    budget: Budget | None = None
    budget_pairs: int | None = Field(None, ge=1, description="Data budget: how many pairs to aim for.")
    seed: int = Field(0, description="Seeds every random choice and every model call's sampling seed.")
    systematic_failures: int = Field(
        5, ge=0,
        description=(
            "Stop the run (interrupted, exit 2) when a stage's first N finished records all fail with the same "
            "error: a broken template or a wrong model name would fail every record (replies cut off by max_tokens: "
            "the first 4N, since whether a reply runs long depends on the record). 0: never stop."
        ),
    )
    output: OutputSpec = Field(default_factory=OutputSpec)
    cache: str | bool = Field(True, description="true: the user cache; false: none; a path: that SQLite file.")
    # Set by `load_recipe`: the folder relative paths are resolved against. Not part of the YAML.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("input", mode="before")
    @classmethod
    def _input_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_configs(cls, v: Any) -> list[StageConfig]:
        if not isinstance(v, list):
            raise ValueError("`stages` must be a list")
        registry = load_all()
        out: list[StageConfig] = []
        for i, raw in enumerate(v):
            if not isinstance(raw, dict) or "type" not in raw:
                raise ValueError(f"stage {i}: each stage needs a `type`")
            kind = raw["type"]
            if kind not in registry:
                known = ", ".join(sorted(registry))
                raise ValueError(f"stage {i}: unknown type {kind!r} (known: {known})")
            try:
                out.append(registry[kind].Config.model_validate(raw))
            except ValidationError as exc:
                raise ValueError(f"stage {i} ({kind}): {_first_error(exc)}") from None
        return out

    @model_validator(mode="after")
    def _check_refs(self) -> "Recipe":
        names: set[str] = set()
        for i, stage in enumerate(self.stages):
            name = stage.name or stage.type
            if name in names:
                raise ValueError(f"stage {i}: name {name!r} is used twice; give one a `name`")
            names.add(name)
            for fld, role in stage.role_fields().items():
                if role not in self.models:
                    known = ", ".join(sorted(self.models)) or "none"
                    raise ValueError(f"stage {i} ({stage.type}): {fld} {role!r} is not a model in `models` (defined: {known})")
        return self

    def stage_name(self, i: int) -> str:
        s = self.stages[i]
        return s.name or s.type

    def resolve(self, path: str | Path) -> Path:
        from datatailor.storage import is_url

        if is_url(path):
            return path  # type: ignore[return-value]  # an object-store URL (s3://…) stays as it is
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def content_hash(self) -> str:
        """Identity of the work a recipe describes. The budget (and the systematic-failure stop) is left out, so it
        can be changed to continue; so are the batch settings (`--batch`), which change how replies are paid, not them."""
        data = self.model_dump(mode="json", exclude={"budget", "base_dir", "systematic_failures"})
        for model in data.get("models", {}).values():
            for name in BATCH_SETTINGS:
                model.pop(name, None)
        data["stages"] = [s.model_dump(mode="json") for s in self.stages]
        if self.input is not None:
            data["input_sha256"] = file_digest(self.resolve(self.input.path))
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"base_dir"})
        data["stages"] = [s.model_dump(mode="json") for s in self.stages]
        return data


def file_digest(path: Path) -> str:
    from datatailor.storage import is_url, object_identity

    if is_url(path):  # an object's ETag and size stand for its content: no download just to hash it
        return hashlib.sha256(object_identity(str(path)).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    elif path.is_file():
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping with `models`, `input` and `stages`")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None
    recipe.base_dir = base_dir or Path.cwd()
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    return parse_recipe(read_yaml(p, "recipe"), str(p), p.resolve().parent)
