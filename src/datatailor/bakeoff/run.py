"""The bake-off's steps, each an ordinary resumable piece of work in the bake-off folder:

    DIR/bakeoff.json                 the config as run (a different config in the same DIR is refused)
    DIR/split/<testset>.seeds.jsonl  the seed part of each test set; .eval.jsonl the evaluation part
    DIR/seeds.jsonl                  every seed part together: the methods' input
    DIR/methods/<name>/run/          the method's run (its recipe with decontamination against the evaluation
                                     parts before its final selection, then a seeded trim to budget_pairs)
    DIR/methods/<name>/rate/         its data rated 0-5 by the judge
    DIR/methods/<name>/tuned/        the target fine-tuned on its data (train_report.json)
    DIR/methods/<name>/eval/<ts>/    the tuned target against the reference on the evaluation part, judged
                                     both orders (eval.json)
    DIR/bakeoff_report.{json,md,html}

Killing it and running the same command again continues where it stopped (the runs resume from their
checkpoints, a finished training is reused); a finished bake-off runs again with zero model calls.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import TypeAdapter, ValidationError

from datatailor.bakeoff.config import BakeoffConfig, MethodSpec
from datatailor.bakeoff.split import Split, as_seed, split_testset
from datatailor.errors import UserError
from datatailor.evaluate.testsets import TestSet, resolve_testset
from datatailor.io import read_yaml, write_json, write_records
from datatailor.llm.config import ModelConfig
from datatailor.recipe import Recipe, parse_recipe
from datatailor.runner import STATUS_COMPLETE, STATUS_SHORTFALL, contract_problems, recipe_input, run_recipe_sync
from datatailor.store import ListSource

MODEL = TypeAdapter(ModelConfig)
DECONTAM = "bakeoff.decontam"
TRIM = "bakeoff.trim"
SELECTION_STAGES = ("select", "codec.select")  # a recipe's final trim to its budget


@dataclass
class MethodPlan:
    spec: MethodSpec
    recipe: Recipe | None  # None: the untuned row

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Plan:
    config: BakeoffConfig
    out: Path
    splits: list[Split]
    methods: list[MethodPlan]
    models: dict[str, Any] = field(default_factory=dict)

    def folder(self, method: str) -> Path:
        return self.out / "methods" / method

    def eval_file(self, split: Split) -> Path:
        return self.out / "split" / f"{split.name}.eval.jsonl"


def _model(entry: dict[str, Any], where: str) -> Any:
    try:
        return MODEL.validate_python(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"{where}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def config_hash(config: BakeoffConfig) -> str:
    """What the bake-off is: its config and every method recipe's content (a changed recipe is a new bake-off)."""
    data = config.model_dump(mode="json")
    data["recipes"] = {m.name: hashlib.sha256(config.resolve(m.recipe).read_bytes()).hexdigest()[:16]
                       for m in config.methods if m.recipe and config.resolve(m.recipe).is_file()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: BakeoffConfig, out: Path, *, force: bool = False) -> Plan:
    """Everything that can be checked before anything is spent: the folder, the test sets and their split, every
    method's recipe as it will run (models, input, budget, the stage order and templates), the eval roles."""
    out = out.resolve()  # the method recipes resolve paths against their own folder: give them absolute ones
    marker = out / "bakeoff.json"
    digest = config_hash(config)
    if marker.exists() and not force:
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous.get("hash") != digest:
            raise UserError(f"{out} holds a bake-off of another config (or other recipes); use another --out, or --force")
    elif out.exists() and any(out.iterdir()) and not marker.exists() and not force:
        raise UserError(f"{out} exists and is not a bake-off folder; choose another --out")
    models = {role: _model(entry, f"models.{role}") for role, entry in config.models.items()}
    splits = []
    for name in config.testsets:
        testset = resolve_testset(name)
        if len(testset.records) < 2:
            raise UserError(f"test set {name}: {len(testset.records)} item(s); a split needs at least 2")
        splits.append(split_testset(testset, config.seed_share, config.seed))
    if any(m.untuned for m in config.methods) and config.train.kind == "external" and config.train.untuned is None:
        raise UserError("train.kind external with an untuned row needs train.untuned: the untuned target's model entry")
    plan = Plan(config, out, splits, [], models)
    seeds_path = out / "seeds.jsonl"
    for spec in config.methods:
        if spec.untuned:
            plan.methods.append(MethodPlan(spec, None))
            continue
        recipe = method_recipe(plan, spec, seeds_path)
        # the records the run will read: the seeds (written when the bake-off starts), or the recipe's own input
        records = ListSource([as_seed(r, s.name) for s in splits for r in s.seeds]) if spec.input == "seeds" else recipe_input(recipe)
        problems = contract_problems(recipe, records)
        if problems:
            raise UserError(f"method {spec.name} ({spec.recipe}) cannot work; nothing was run:\n  " + "\n  ".join(problems))
        plan.methods.append(MethodPlan(spec, recipe))
    return plan


def method_recipe(plan: Plan, spec: MethodSpec, seeds_path: Path) -> Recipe:
    """The method's recipe as the bake-off runs it: the shared roles replace its own, the seeds are its input
    (unless it keeps its own), the bake-off's seed and budget, and two stages at the end: decontamination against
    every evaluation part (before the recipe's own final selection, if it ends with one), and a seeded trim to
    exactly budget_pairs at the end."""
    config = plan.config
    path = config.resolve(spec.recipe or "")
    if not path.is_file():
        raise UserError(f"method {spec.name}: recipe not found: {path}")
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping")
    data = dict(data)
    data["models"] = {**(data.get("models") or {}), **config.models}
    data["seed"] = config.seed
    data["budget_pairs"] = config.budget_pairs
    if config.budget_usd is not None:
        data["budget"] = {**(data.get("budget") or {}), "max_usd": config.budget_usd}
    if spec.input == "seeds":
        data["input"] = {"path": str(seeds_path)}
    stages = list(data.get("stages") or [])
    # decontamination goes before the recipe's own final selection, so the method picks among clean pairs and a
    # dropped pair is replaced by another it made, not lost
    at = len(stages)
    while at and isinstance(stages[at - 1], dict) and stages[at - 1].get("type") in SELECTION_STAGES:
        at -= 1
    data["stages"] = [
        *stages[:at],
        {"type": "decontam", "name": DECONTAM, "testsets": [str(plan.eval_file(s)) for s in plan.splits]},
        *stages[at:],
        {"type": "select", "name": TRIM, "strategy": "random", "budget_pairs": config.budget_pairs},
    ]
    data["name"] = f"{config.name}:{spec.name}"
    return parse_recipe(data, f"method {spec.name} ({path})", path.resolve().parent)


def write_split(plan: Plan) -> None:
    (plan.out / "split").mkdir(parents=True, exist_ok=True)
    seeds = []
    for s in plan.splits:
        write_records(plan.out / "split" / f"{s.name}.seeds.jsonl", s.seeds)
        write_records(plan.eval_file(s), s.evaluation)
        seeds += [as_seed(r, s.name) for r in s.seeds]
    write_records(plan.out / "seeds.jsonl", seeds)


def eval_testset(plan: Plan, split: Split) -> TestSet:
    limit = plan.config.eval_limit
    items = split.evaluation[:limit] if limit else split.evaluation
    return TestSet(name=split.name, source=f"{split.testset.source} (evaluation part)", records=items)


# ----------------------------------------------------------------------------- the steps


class Log:
    """One line per step, with the time since the bake-off started (a local bake-off runs for tens of minutes)."""

    def __init__(self, stream: TextIO | None):
        self.stream, self.start = stream, time.monotonic()

    def __call__(self, message: str) -> None:
        if self.stream is not None:
            minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
            print(f"[bakeoff {minutes}:{seconds:02d}] {message}", file=self.stream, flush=True)


def run_method(plan: Plan, m: MethodPlan, log: Log, progress: bool, force: bool = False) -> dict[str, Any]:
    """The method's data: run (or resume) its recipe. Returns its status and size."""
    assert m.recipe is not None
    out = plan.folder(m.name) / "run"
    log(f"{m.name}: data ({m.spec.recipe})")
    result = run_recipe_sync(m.recipe, out, show_progress=progress, force=force)
    if result.status not in (STATUS_COMPLETE, STATUS_SHORTFALL):
        raise UserError(f"method {m.name}: its run stopped ({result.status}: {result.message}); "
                        "fix it or raise the budget, and run the same bake-off command again to continue")
    return {"status": result.status, "pairs": result.records, "message": result.message}


def train_method(plan: Plan, m: MethodPlan, log: Log) -> dict[str, Any]:
    """The tuned target's model entry, training it first unless a finished training on the same data exists."""
    spec = plan.config.train
    if m.spec.untuned:
        entry = spec.untuned or {"backend": "hf", "model": spec.base}
        return {"target": entry, "train": None}
    if spec.kind == "external":
        entry = json.loads(json.dumps(spec.target).replace("{method}", m.name))
        return {"target": entry, "train": None}
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import load_train_config

    data = plan.folder(m.name) / "run" / "data.jsonl"
    tuned = plan.folder(m.name) / "tuned"
    report_path, marker = tuned / "train_report.json", plan.folder(m.name) / "trained_on.json"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    if report_path.exists() and marker.exists() and json.loads(marker.read_text(encoding="utf-8")).get("sha256") == digest:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return {"target": report["use_as"], "train": report}
    log(f"{m.name}: training {spec.base} on {data}")
    settings = {"method": spec.kind, "seed": plan.config.seed, **spec.settings}
    trained = train_sft(data, spec.base, tuned, load_train_config(None, settings), force=True, progress=sys.stderr)
    write_json(marker, {"data": str(data), "sha256": digest})
    return {"target": trained.use_as, "train": trained.model_dump(mode="json")}


def eval_method(plan: Plan, m: MethodPlan, target: dict[str, Any], log: Log, progress: bool, force: bool = False) -> dict[str, Any]:
    from datatailor.evaluate.evaluation import EvalPlan, run_eval

    ev = plan.config.eval
    results = {}
    for split in plan.splits:
        testset = eval_testset(plan, split)
        log(f"{m.name}: judging on {split.name} ({len(testset.records)} items)")
        eplan = EvalPlan(testset=testset, candidate=_model(target, f"{m.name} target"), judge=plan.models[ev.judge],
                         reference=plan.models[ev.reference], rule=ev.rule, answer_max_tokens=ev.answer_max_tokens,
                         respond_template=ev.respond_template, reference_max_tokens=ev.reference_max_tokens,
                         seed=plan.config.seed, base_dir=plan.config.base_dir, consistency_threshold=ev.consistency_threshold)
        result, summary = run_eval(eplan, plan.folder(m.name) / "eval" / split.name, show_progress=progress, force=force)
        if summary is None:
            raise UserError(f"method {m.name}: the evaluation on {split.name} stopped ({result.status}: {result.message}); "
                            "run the same bake-off command again to continue")
        results[split.name] = summary
    return results


def rate_method(plan: Plan, m: MethodPlan, log: Log, progress: bool, force: bool = False) -> dict[str, Any] | None:
    if not plan.config.eval.rate or m.spec.untuned:
        return None
    from datatailor.evaluate.evaluation import run_rate

    data = plan.folder(m.name) / "run" / "data.jsonl"
    log(f"{m.name}: rating its data")
    result, summary = run_rate(data, plan.models[plan.config.eval.judge], plan.folder(m.name) / "rate",
                               show_progress=progress, force=force, seed=plan.config.seed, base_dir=plan.config.base_dir)
    if summary is None:
        raise UserError(f"method {m.name}: the rating stopped ({result.status}: {result.message}); run again to continue")
    return summary


def run_bakeoff(config: BakeoffConfig, out: Path, *, force: bool = False, progress: bool = False,
                log_stream: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run (or continue) a bake-off in `out`; returns the report's numbers (also written to out)."""
    from datatailor.bakeoff.report import collect, write_report

    log = Log(log_stream)
    plan = prepare(config, out, force=force)
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bakeoff.json", {"hash": config_hash(config), "config": config.model_dump(mode="json")})
    write_split(plan)
    rows: dict[str, dict[str, Any]] = {}
    for m in plan.methods:
        row: dict[str, Any] = {"name": m.name, "untuned": m.spec.untuned, "recipe": m.spec.recipe}
        if m.recipe is not None:
            row["data"] = run_method(plan, m, log, progress, force)
            if row["data"]["pairs"] == 0:
                log(f"{m.name}: no pairs ({row['data']['message']}): not trained, not judged")
                row["eval"] = None
                rows[m.name] = row
                continue
            row["quality"] = rate_method(plan, m, log, progress, force)
        trained = train_method(plan, m, log)
        row["train"] = trained["train"]
        row["target"] = trained["target"]
        row["eval"] = eval_method(plan, m, trained["target"], log, progress, force)
        rows[m.name] = row
    report = collect(plan, rows)
    write_report(out, report)
    return report
