"""The Python API: what the CLI does, from a notebook or a script.

    import datatailor as dt

    recipe = dt.load_recipe("examples/quickstart.yaml")   # or dt.recipe_from_dict({...})
    run = dt.run(recipe, "runs/quickstart")               # resumes like `datatailor run`
    print(run.status, len(run.records), run.usage["all"]["cost_usd"])
    df = run.to_pandas()                                  # or run.to_dataset() (HF datasets)

    ev = dt.evaluate("vicuna80", out="runs/eval", candidate="hf:runs/tuned",
                     reference="local:qwen2.5-coder-0.5b-instruct", judge="local:qwen2.5-coder-0.5b-instruct", limit=4)
    dt.compare(["runs/a", "runs/b"], out="report.html")
    dt.train("runs/quickstart", base="local:gemma-3-270m", out="runs/tuned", epochs=1)

Every function returns plain Python objects (pydantic records, dicts) and raises `datatailor.UserError` for a
mistake the user can fix (the CLI's exit code 2).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatailor.errors import UserError
from datatailor.records import Record
from datatailor.recipe import Recipe, load_recipe, parse_recipe


def recipe_from_dict(data: dict[str, Any], base_dir: str | Path | None = None) -> Recipe:
    """A recipe from a dict shaped like the YAML; relative paths resolve against `base_dir` (default: cwd)."""
    return parse_recipe(data, "<dict recipe>", Path(base_dir) if base_dir is not None else None)


@dataclass
class RunOutput:
    """A run directory's results: the records, the failure rows, usage and the manifest."""

    out_dir: Path
    status: str
    message: str = ""
    records: list[Record] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)  # this invocation's usage: {"roles": {...}, "all": {...}}
    manifest: dict[str, Any] = field(default_factory=dict)
    shortfall: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per record: instruction, input, response, id, and the metadata as a column."""
        return [
            {"id": r.id, "instruction": r.instruction, "input": r.input, "response": r.response, "metadata": r.metadata}
            for r in self.records
        ]

    def to_pandas(self) -> Any:
        """The records as a pandas DataFrame (columns id, instruction, input, response, metadata)."""
        try:
            import pandas as pd
        except ImportError:
            raise UserError("to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows(), columns=["id", "instruction", "input", "response", "metadata"])

    def to_dataset(self) -> Any:
        """The records as an HF `datasets.Dataset` (metadata JSON-encoded, since its keys vary by method)."""
        try:
            from datasets import Dataset
        except ImportError:
            raise UserError("to_dataset() needs the `datasets` package: pip install 'datatailor[hf]'") from None
        rows = [{**row, "metadata": json.dumps(row["metadata"], ensure_ascii=False)} for row in self.rows()]
        return Dataset.from_list(rows) if rows else Dataset.from_dict({k: [] for k in ("id", "instruction", "input", "response", "metadata")})


def load_run(out_dir: str | Path) -> RunOutput:
    """Read a run directory written by `datatailor run` or `dt.run`."""
    from datatailor.io import read_jsonl_rows, read_records

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{out} is not a datatailor run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    records = read_records(out / "data.jsonl") if (out / "data.jsonl").is_file() else []
    failures = [row for _, row in read_jsonl_rows(out / "failures.jsonl")] if (out / "failures.jsonl").is_file() else []
    usage = json.loads((out / "usage.json").read_text(encoding="utf-8")).get("run", {}) if (out / "usage.json").is_file() else {}
    return RunOutput(out, manifest.get("status", "?"), manifest.get("message", ""), records, failures, usage, manifest,
                     manifest.get("shortfall"))


def run(
    recipe: Recipe | str | Path | dict[str, Any],
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = False,
    cache: bool = True,
) -> RunOutput:
    """Run (or resume) a recipe into `out_dir`, as `datatailor run` does, and return what it wrote.

    `recipe` is a Recipe, a YAML path or a dict. `cache=False` neither reads nor writes the request cache.
    A run stopped by its budget, a dead server or a broken stage returns with that `status` (and `message`);
    its checkpoints are kept and calling `run` again resumes it. Inside a running event loop (Jupyter),
    use `await run_async(...)` instead.
    """
    return asyncio.run(run_async(recipe, out_dir, force=force, progress=progress, cache=cache))


async def run_async(
    recipe: Recipe | str | Path | dict[str, Any], out_dir: str | Path, *, force: bool = False, progress: bool = False,
    cache: bool = True,
) -> RunOutput:
    """`run` for code that already runs an event loop (e.g. a Jupyter cell: `await dt.run_async(...)`)."""
    from datatailor.runner import run_recipe

    r = _as_recipe(recipe)
    if not cache:
        r.cache = False
    result = await run_recipe(r, out_dir, force=force, show_progress=progress)
    return load_run(result.out_dir)


def _as_recipe(recipe: Recipe | str | Path | dict[str, Any]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe.model_copy(deep=True)
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def evaluate(
    testset: str,
    out: str | Path,
    *,
    candidate: Any,
    judge: Any,
    reference: Any = "stored",
    limit: int | None = None,
    rule: str = "strict",
    seed: int = 0,
    scoring: str = "sampled",
    max_tokens: int | None = None,
    cache: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Answer `testset` with `candidate` and `reference`, judge both orders, and return eval.json's content.

    Models are shorthands as on the command line ("local:gemma-3-270m", "hf:runs/tuned", "openai:gpt-4o-mini")
    or model configs (e.g. `recipe.models["strong"]`); `reference="stored"` uses the test set's answers.
    """
    from datatailor.evaluate.evaluation import EvalPlan, run_eval
    from datatailor.evaluate.testsets import resolve_testset

    plan = EvalPlan(
        testset=resolve_testset(testset), candidate=_model(candidate), judge=_model(judge),
        reference=None if reference == "stored" else _model(reference), rule=rule, limit=limit,  # type: ignore[arg-type]
        seed=seed, answer_max_tokens=max_tokens, base_dir=Path.cwd(), cache=cache, scoring=scoring,
    )
    result, summary = run_eval(plan, Path(out), force=force, show_progress=False)
    if summary is None:
        raise UserError(f"evaluation stopped ({result.status}): {result.message}; call evaluate() again to resume")
    return summary


def _model(spec: Any) -> Any:
    if isinstance(spec, str):
        from datatailor.evaluate.modelspec import parse_model_spec

        return parse_model_spec(spec, base_dir=Path.cwd())
    return spec


def compare(runs: list[str | Path], out: str | Path = "report.html", *, embeddings: bool = True, title: str | None = None) -> Path:
    """Write the comparison report of `runs` (run directories or dataset files) to `out`; returns its path."""
    from datatailor.report.compare import build_compare_report

    build_compare_report([Path(r) for r in runs], Path(out), embeddings=embeddings, title=title)
    return Path(out)


def train(data: str | Path, *, base: str, out: str | Path, force: bool = False, limit: int | None = None,
          progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Fine-tune `base` on `data` (a run directory or dataset file) into `out`, as `datatailor train` does.

    `settings` are TrainConfig fields (preset, method, epochs, max_steps, learning_rate, batch_size, max_length,
    lora_r, lora_alpha, …). Returns the training report (loss curve, steps, how to load the result: `use_as`).
    """
    import sys

    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import load_train_config

    config = load_train_config(None, settings)
    report = train_sft(Path(data), base, Path(out), config, force=force, limit=limit, progress=sys.stderr if progress else None)
    return report.model_dump(mode="json")
