"""`datatailor validate`: check a recipe without spending anything."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from datatailor.errors import UserError
from datatailor.io import read_records
from datatailor.recipe import load_recipe
from datatailor.stages import load_all
from datatailor.stages.contract import check_recipe_order, check_templates, method_title


@dataclass
class ValidationReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _check_model(role: str, config, base_dir: Path, report: ValidationReport) -> None:
    backend = config.backend
    report.lines.append(f"model {role}: {backend} {config.model}")
    if backend == "openai":
        if config.api_key_env and not os.environ.get(config.api_key_env):
            report.problems.append(f"models.{role}: environment variable {config.api_key_env} is not set")
    elif backend in ("llamacpp", "hf") and config.model.startswith("local:"):
        from datatailor.llm.local_models import check_local_model

        problem = check_local_model(config.model)
        if problem:
            report.problems.append(f"models.{role}: {problem}")
    elif backend in ("llamacpp", "hf") and not Path(config.model).expanduser().exists() and backend == "llamacpp":
        report.problems.append(f"models.{role}: model file not found: {config.model}")
    elif backend == "scripted":
        if config.replay and not (base_dir / config.replay).exists() and not Path(config.replay).exists():
            report.problems.append(f"models.{role}: replay file not found: {config.replay}")
        if config.handler:
            from datatailor.llm.scripted import load_handler

            try:
                load_handler(config.handler)
            except UserError as exc:
                report.problems.append(f"models.{role}: {exc}")


def validate_recipe(path: str | Path) -> ValidationReport:
    recipe = load_recipe(path)  # raises UserError on structure problems
    report = ValidationReport()
    for role, config in recipe.models.items():
        _check_model(role, config, recipe.base_dir, report)
    records = None
    if recipe.input is not None:
        try:
            records = read_records(recipe.resolve(recipe.input.path), recipe.input.format, recipe.input.limit, recipe.input.fields)
            report.lines.append(f"input: {len(records)} records from {recipe.input.path}")
        except UserError as exc:
            report.problems.append(str(exc))
    registry = load_all()
    for i, stage in enumerate(recipe.stages):
        method = method_title(registry[stage.type].method)
        report.lines.append(f"stage {i}: {stage.type}" + (f" ({stage.name})" if stage.name else "") + (f" [{method}]" if method else ""))
    if recipe.input is None or records is not None:
        report.problems.extend(check_recipe_order(recipe.stages, records, registry))
    report.problems.extend(check_templates(recipe.stages, registry, recipe.base_dir))
    return report
