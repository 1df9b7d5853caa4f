"""The bake-off's configuration: models by role, the budget, the methods, the test sets, training and evaluation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datatailor.errors import UserError
from datatailor.io import read_yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The method's row in the table (letters, digits, . _ -).")
    recipe: str | None = Field(None, description="The recipe that makes its data; none for the untuned row.")
    untuned: bool = Field(False, description="The target with no tuning at all: a row of the table, no data.")
    input: Literal["seeds", "recipe"] = Field(
        "seeds", description="seeds: the seed part of the test sets is the recipe's input; recipe: keep the recipe's "
        "own input (REFED's references, the raw pairs CoachLM revises).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _recipe_or_untuned(self) -> MethodSpec:
        if self.untuned == (self.recipe is not None):
            raise ValueError(f"method {self.name}: give a `recipe`, or `untuned: true` (not both)")
        return self


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["lora", "full", "external"] = Field(
        "lora", description="lora/full: `datatailor train` on each method's data; external: you train elsewhere and "
        "serve each tuned target as `target` says (the bake-off exports the data and waits for nothing).",
    )
    base: str | None = Field(None, description="The target's base model (lora/full), e.g. local:gemma-3-270m.")
    settings: dict[str, Any] = Field(default_factory=dict, description="`datatailor train` settings: epochs, batch_size, max_length, preset, …")
    target: dict[str, Any] | None = Field(
        None, description="external: the model entry that answers for a tuned target; `{method}` in its strings is "
        "replaced by the method's name (e.g. model: tuned-{method}).",
    )
    untuned: dict[str, Any] | None = Field(None, description="The untuned target's model entry (default: hf `base`, no adapter).")

    @model_validator(mode="after")
    def _complete(self) -> TrainSpec:
        if self.kind == "external" and self.target is None:
            raise ValueError("train.kind external needs `target`: the model entry of a tuned target")
        if self.kind != "external" and not self.base:
            raise ValueError(f"train.kind {self.kind} needs `base`: the model to fine-tune")
        return self


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Field("strong", description="The role whose answers the tuned targets are judged against.")
    judge: str = Field("judge", description="The role that judges, both orders of every pair.")
    rule: Literal["strict", "lenient", "mean"] = Field("strict", description="CodecLM's strict rule by default.")
    answer_max_tokens: int | None = Field(256, ge=1, description="The targets' answers' limit; a cut-off answer is a failed item.")
    reference_max_tokens: int | None = Field(None, ge=1, description="The reference's limit (default: answer_max_tokens); "
                                             "a cut-off reference answer fails the item for every method.")
    respond_template: str = Field("respond.j2", description="The prompt both the tuned targets and the reference answer with.")
    consistency_threshold: float = Field(0.6, ge=0, le=1)
    rate: bool = Field(True, description="Rate every method's data 0-5 with the judge (quality histogram).")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples of the test items for the intervals.")


class BakeoffConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "bakeoff"
    seed: int = Field(0, description="Seeds the split, every method's run, training and evaluation.")
    budget_pairs: int = Field(..., ge=1, description="Every method's data size: the pairs each target is trained on.")
    budget_usd: float | None = Field(None, gt=0, description="Each method's run stops at this spend (its recipe's budget.max_usd).")
    testsets: list[str] = Field(..., min_length=1, description="Test sets by name, alpacaeval:PATH, or a path.")
    seed_share: float = Field(0.2, gt=0, lt=1, description="Share of each test set given to the methods as seeds (CodecLM: 20 %).")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate only the first N of each evaluation part (a quick run; "
                                   "the report says so).")
    models: dict[str, dict[str, Any]] = Field(..., description="Roles shared by every method; they replace the recipes' roles of the same name.")
    methods: list[MethodSpec] = Field(..., min_length=1)
    train: TrainSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> BakeoffConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names repeat: {names}")
        for role in (self.eval.reference, self.eval.judge):
            if role not in self.models:
                raise ValueError(f"eval: role {role!r} is not in `models` (defined: {', '.join(sorted(self.models))})")
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def load_bakeoff(path: Path) -> BakeoffConfig:
    data = read_yaml(path, "bake-off config")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a bake-off config is a YAML mapping")
    try:
        config = BakeoffConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid bake-off config"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc or '(top level)'}: {err['msg'].removeprefix('Value error, ')}")
        raise UserError("\n".join(lines)) from None
    config.base_dir = path.resolve().parent
    return config
