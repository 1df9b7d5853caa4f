"""The Python API: what the CLI does, from a notebook or a script.

    import datatailor as dt

    recipe = dt.load_recipe("examples/quickstart.yaml")   # or dt.recipe_from_dict({...})
    run = dt.run(recipe, out="runs/quickstart")           # resumes like `datatailor run`
    print(run.status, len(run.records), run.usage["all"]["cost_usd"])
    df = run.to_pandas()                                  # or run.to_dataset() (HF datasets)

    ev = dt.evaluate("vicuna80", out="runs/eval", candidate="hf:runs/tuned",
                     reference="local:qwen2.5-coder-0.5b-instruct", judge="local:qwen2.5-coder-0.5b-instruct", limit=4)
    dt.compare(["runs/a", "runs/b"], out="report.html")
    dt.train("runs/quickstart", base="local:gemma-3-270m", out="runs/tuned", epochs=1)
    dt.bakeoff("examples/bakeoff/local.yaml", out="runs/bakeoff")

The output folder (or file) is `out` in every function, as `--out` on the command line (`out_dir`, the old name
in `run`, `run_async` and `load_run`, still works for one release and warns). The blocking functions also work
inside a running event loop (a Jupyter cell): they run on a worker thread with a loop of their own.

Every function returns plain Python objects (pydantic records, dicts) and raises `datatailor.UserError` for a
mistake the user can fix (the CLI's exit code 2).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from datatailor.errors import UserError
from datatailor.records import Record
from datatailor.recipe import Recipe, load_recipe, parse_recipe

T = TypeVar("T")
# After Ctrl-C, how long a worker-thread call gets to write its checkpoints and stop.
_INTERRUPT_GRACE_S = 60.0


def _out_folder(function: str, out: str | Path | None, out_dir: str | Path | None, *, url: bool = False) -> Path | str:
    """`out`, or the deprecated `out_dir` keyword (with a DeprecationWarning); exactly one of them. An object-store
    URL (`s3://…`) is kept as a string where `url` is allowed (runs), and refused elsewhere."""
    if out_dir is not None:
        if out is not None:
            raise TypeError(f"{function}() got both `out` and `out_dir`; pass `out` only")
        warnings.warn(f"{function}(out_dir=...) is deprecated and will be removed in the next release; use out=...",
                      DeprecationWarning, stacklevel=3)
        out = out_dir
    if out is None:
        raise TypeError(f"{function}() needs the output folder: out=...")
    return _local_or_url(function, out, url)


def _local_or_url(function: str, out: str | Path, url: bool = False) -> Path | str:
    from datatailor.storage import check_url, is_url

    if not is_url(out):
        return Path(out)
    if not url:
        raise UserError(f"{function}(): out={str(out)!r} is an object-store URL; {function} writes a local folder "
                        "(only runs write to object storage)")
    return check_url(str(out).rstrip("/"))


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _blocking(call: Callable[[], T]) -> T:
    """Run `call` (which may use `asyncio.run`) to completion from synchronous code.

    Where this thread already runs an event loop (a Jupyter cell, an async application), `asyncio.run` would
    refuse, so `call` runs on a worker thread, which gets a loop of its own, while this thread waits. Ctrl-C while
    waiting is passed on to the worker (the run records itself as interrupted and keeps its checkpoints), then
    raised here.
    """
    if not _in_running_loop():
        return call()
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the waiting thread, raised there
            box["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=work, name="datatailor-api", daemon=True)
    worker.start()
    # Waits on an Event, not Thread.join: a join interrupted by Ctrl-C can report a live thread as finished.
    try:
        while not done.wait(0.2):  # short waits keep this thread interruptible
            pass
    except KeyboardInterrupt:
        if worker.ident is not None and not done.is_set():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(KeyboardInterrupt))
        if not done.wait(_INTERRUPT_GRACE_S):
            warnings.warn(f"the interrupted datatailor call did not stop within {_INTERRUPT_GRACE_S:.0f} s; "
                          "it goes on in the background", RuntimeWarning, stacklevel=2)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def recipe_from_dict(data: dict[str, Any], base_dir: str | Path | None = None) -> Recipe:
    """A recipe from a dict shaped like the YAML; relative paths resolve against `base_dir` (default: cwd)."""
    return parse_recipe(data, "<dict recipe>", Path(base_dir) if base_dir is not None else None)


@dataclass
class RunOutput:
    """A run directory's results: the records, the failure rows, usage and the manifest."""

    out: Path | str  # a local folder, or the object-store URL the run was written to
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

    @property
    def out_dir(self) -> Path:
        """Deprecated name of `out`."""
        warnings.warn("RunOutput.out_dir is deprecated and will be removed in the next release; use .out",
                      DeprecationWarning, stacklevel=2)
        return self.out

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


def load_run(out: str | Path | None = None, *, out_dir: str | Path | None = None) -> RunOutput:
    """Read a run directory written by `datatailor run` or `dt.run`."""
    from datatailor.io import read_jsonl_rows, read_records

    location = _out_folder("load_run", out, out_dir, url=True)
    if isinstance(location, str):  # a run in object storage: read its local mirror, brought up to date first
        from datatailor.runner.remote import StagedRun

        staged = StagedRun(location)
        staged.pull()
        out = staged.local
    else:
        out = location
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{out} is not a datatailor run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    records = read_records(out / "data.jsonl") if (out / "data.jsonl").is_file() else []
    failures = [row for _, row in read_jsonl_rows(out / "failures.jsonl")] if (out / "failures.jsonl").is_file() else []
    usage = json.loads((out / "usage.json").read_text(encoding="utf-8")).get("run", {}) if (out / "usage.json").is_file() else {}
    return RunOutput(location, manifest.get("status", "?"), manifest.get("message", ""), records, failures, usage, manifest,
                     manifest.get("shortfall"))


def run(
    recipe: Recipe | str | Path | dict[str, Any],
    out: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    cache: bool = True,
    out_dir: str | Path | None = None,
) -> RunOutput:
    """Run (or resume) a recipe into the folder `out`, as `datatailor run --out` does, and return what it wrote.

    `recipe` is a Recipe, a YAML path or a dict. `cache=False` neither reads nor writes the request cache.
    A run stopped by its budget, a dead server or a broken stage returns with that `status` (and `message`);
    its checkpoints are kept and calling `run` again resumes it. Works in a Jupyter cell too (it then runs on a
    worker thread); `await run_async(...)` is the non-blocking form. `out_dir` is the deprecated name of `out`.
    """
    folder = _out_folder("run", out, out_dir, url=True)
    return _blocking(lambda: asyncio.run(run_async(recipe, folder, force=force, progress=progress, cache=cache)))


async def run_async(
    recipe: Recipe | str | Path | dict[str, Any], out: str | Path | None = None, *, force: bool = False,
    progress: bool = False, cache: bool = True, out_dir: str | Path | None = None,
) -> RunOutput:
    """`run` as a coroutine, for code that runs an event loop of its own (`await dt.run_async(recipe, out=...)`)."""
    from datatailor.runner import run_recipe

    folder = _out_folder("run_async", out, out_dir, url=True)
    r = _as_recipe(recipe)
    if not cache:
        r.cache = False
    await run_recipe(r, folder, force=force, show_progress=progress)
    return load_run(folder)


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
    result, summary = _blocking(lambda: run_eval(plan, _local_or_url("evaluate", out), force=force, show_progress=False))
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

    folder = _local_or_url("compare", out)
    build_compare_report([Path(r) for r in runs], folder, embeddings=embeddings, title=title)
    return folder


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
    report = _blocking(lambda: train_sft(Path(data), base, _local_or_url("train", out), config, force=force, limit=limit,
                                         progress=sys.stderr if progress else None))
    return report.model_dump(mode="json")


def bakeoff(config: str | Path, out: str | Path, *, plan: bool = False, force: bool = False,
            progress: bool = False) -> dict[str, Any]:
    """Run (or continue) a bake-off into the folder `out`, as `datatailor bakeoff CONFIG --out OUT` does.

    Returns the report's numbers (also written to `out/bakeoff_report.{json,md,html}`). With `plan=True` nothing
    runs: everything is checked and the projected calls and cost come back instead (`--plan`). A method that fell
    short of `budget_pairs` is marked `short` in the report's `methods`.
    """
    import sys

    from datatailor.bakeoff.config import load_bakeoff
    from datatailor.bakeoff.projection import project
    from datatailor.bakeoff.run import prepare, run_bakeoff

    cfg = load_bakeoff(Path(config))
    if plan:
        return project(prepare(cfg, _local_or_url("bakeoff", out), force=force))
    # one log line per step on stderr, as the command prints (a bake-off runs for tens of minutes)
    return _blocking(lambda: run_bakeoff(cfg, _local_or_url("bakeoff", out), force=force, progress=progress, log_stream=sys.stderr))
