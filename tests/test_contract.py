"""The method contract: stage order and template variables are checked before anything is spent, a stage
that fails for every record stops the run, shared calls are made and paid for once, every stage writes its
artifacts into its own folder, and a run that falls short of budget_pairs tops up or says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.cli import main
from datatailor.errors import LLMCallFailure, UserError
from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from datatailor.stages import load_all
from datatailor.stages.contract import METHODS, check_templates
from datatailor.validate import validate_recipe
from tests.support import echo_model, read_jsonl
from tests.test_codec import MODELS, SEEDS, ns, seed_rows

# ----------------------------------------------------------------------------- validate refuses


def write_recipe(tmp_path: Path, stages: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None, **fields: Any) -> Path:
    data: dict[str, Any] = {"models": MODELS, "stages": stages, **fields}
    if rows is not None:
        (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        data["input"] = "seeds.jsonl"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_decode_before_encode_is_refused_naming_both_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, [{"type": "codec.decode"}, {"type": "codec.encode"}], seed_rows(SEEDS), budget_pairs=4)
    report = validate_recipe(path)
    assert report.problems == [
        "stage 0 (codec.decode) needs CodecLM metadata (a use case and skills), which stage 1 (codec.encode) provides "
        "only later: move codec.encode before codec.decode"
    ]
    assert main(["validate", str(path)]) == 2
    assert "move codec.encode before codec.decode" in capsys.readouterr().err
    # `run` refuses it too, before touching --out or calling a model.
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


def test_a_need_nothing_provides_names_the_stages_that_could(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, [{"type": "codec.rubrics"}], seed_rows(SEEDS))
    (problem,) = validate_recipe(path).problems
    assert problem.startswith("stage 0 (codec.rubrics) needs CodecLM metadata")
    assert "add one of codec.augment, codec.encode, codec.metadata before it" in problem


def test_needs_are_read_from_the_input(tmp_path: Path) -> None:
    models = {"judge": MODELS["strong"]}
    no_responses = [{"instruction": "What is 2 + 2?"}]
    with_responses = [{"instruction": "What is 2 + 2?", "output": "4"}]
    path = write_recipe(tmp_path, [{"type": "quality.rate"}], no_responses, models=models)
    assert "needs a response (`response`)" in validate_recipe(path).problems[0]
    path = write_recipe(tmp_path, [{"type": "quality.rate"}], with_responses, models=models)
    assert validate_recipe(path).problems == []
    # input annotated with CodecLM metadata columns counts as encoded
    annotated = [{"instruction": "Plan a trip.", "use_case": "planning", "skills": ["budgeting"]}]
    path = write_recipe(tmp_path, [{"type": "codec.rubrics"}], annotated)
    assert validate_recipe(path).problems == []


def test_a_template_variable_the_stage_does_not_pass_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "answer.j2").write_text("Answer carefully: {{ instrution }}\n", encoding="utf-8")
    path = write_recipe(tmp_path, [{"type": "respond", "template": "answer.j2"}], [{"instruction": "Hi there, how are you?"}])
    (problem,) = validate_recipe(path).problems
    assert "stage 0 (respond): template answer.j2 (template) uses the variable 'instrution'" in problem
    assert "it passes: id, input, instruction, metadata, prompt, response" in problem
    assert main(["validate", str(path)]) == 2
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    assert "instrution" in capsys.readouterr().err and not out.exists()


def test_every_packaged_template_matches_what_its_stage_passes() -> None:
    registry = load_all()
    configs = []
    for type_name, cls in registry.items():
        fields = {"type": type_name}
        if type_name == "codec.metadata":
            fields["entries"] = [{"use_case": "u", "skills": ["s"]}]
        if type_name == "generate":
            fields["template"] = "respond.j2"
        if type_name == "decontam":
            fields["testsets"] = ["vicuna80"]
        if type_name == "filter.flags":
            fields["flags"] = "runs/reviewed"
        configs.append(cls.Config.model_validate(fields))
    assert check_templates(configs, registry, None) == []


def test_every_stage_names_a_known_method_or_none() -> None:
    for type_name, cls in load_all().items():
        assert cls.method is None or cls.method in METHODS, type_name
        prefix = type_name.split(".")[0]
        if prefix == "codec":
            assert cls.method == "codec"


# ----------------------------------------------------------------------------- systematic failures


def test_a_stage_that_fails_every_record_stops_the_run(tmp_path: Path) -> None:
    # Renders only at run time: every record lacks metadata.topic, so every record would fail the same way.
    (tmp_path / "t.j2").write_text("{{ instruction }} ({{ metadata.topic.upper() }})", encoding="utf-8")
    rows = [{"instruction": f"Question number {i}: explain."} for i in range(20)]
    path = write_recipe(tmp_path, [{"type": "respond", "template": "t.j2", "concurrency": 1}], rows, models={"strong": echo_model()})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert "the first 5 records all failed with the same error" in manifest["message"]
    assert "topic" in manifest["message"]
    assert not (out / "data.jsonl").exists()
    # Nothing was written as a failure: after the fix, a re-run retries every record.
    assert read_jsonl(out / "stages/00-respond/failures.jsonl") == []
    (tmp_path / "t.j2").write_text("{{ instruction }} ({{ metadata.get('topic', 'general') }})", encoding="utf-8")
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    assert len(read_jsonl(out / "data.jsonl")) == 20


def model_not_found(request: Any) -> str:
    raise LLMCallFailure("http://127.0.0.1:9/v1: HTTP 404: model 'qwen-typo' does not exist")


def test_same_model_error_for_every_record_stops_the_run(tmp_path: Path) -> None:
    models = {"strong": {"backend": "scripted", "model": "missing", "handler": "tests.test_contract:model_not_found"}}
    rows = [{"instruction": f"Question number {i}: explain."} for i in range(40)]
    recipe = parse_recipe({"models": models, "input": str(write_rows(tmp_path, rows)), "cache": False,
                           "stages": [{"type": "respond", "concurrency": 2}]}, "t", tmp_path)
    result = run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    assert result.status == "interrupted" and "same error" in result.message
    usage = json.loads((tmp_path / "out" / "usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["failed_requests"] <= 6  # the window of 5, plus what was in flight: not 40


def test_failures_that_differ_or_are_decisions_do_not_stop_the_run(tmp_path: Path) -> None:
    rows = [{"instruction": "Write a haiku about rain."}] * 8  # exact duplicates: 7 dedup decisions
    recipe = parse_recipe({"models": {}, "input": str(write_rows(tmp_path, rows)), "stages": [{"type": "dedup"}]}, "t", tmp_path)
    assert run_recipe_sync(recipe, tmp_path / "out", show_progress=False).status == "complete"


def write_rows(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- manifest, artifacts, shared calls


CODEC = [
    {"type": "codec.encode"},
    {"type": "codec.augment", "pool_size": 4},
    {"type": "codec.rubrics"},
    {"type": "codec.decode"},
    {"type": "codec.contrastive"},
    {"type": "codec.select"},
]


def codec_run(tmp_path: Path, stages: list[dict[str, Any]] = CODEC, **fields: Any):
    recipe = parse_recipe({"models": MODELS, "input": str(write_rows(tmp_path, seed_rows(SEEDS))), "stages": stages,
                           **fields}, "t", tmp_path)
    return run_recipe_sync(recipe, tmp_path / "out", show_progress=False)


def test_manifest_records_methods_and_each_stage_keeps_its_artifacts_in_its_folder(tmp_path: Path) -> None:
    codec_run(tmp_path, budget_pairs=8)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["method"] for s in manifest["stages"]] == ["codec"] * 6
    artifacts = {s["name"]: s["artifacts"] for s in manifest["stages"]}
    assert artifacts["codec.augment"] == ["metadata.jsonl", "pool.json"]
    assert artifacts["codec.contrastive"] == ["codec_report.html", "codec_report.json", "codec_report.md"]
    assert all((out / "stages" / f"{i:02d}-{name}" / a).is_file()
               for i, (name, names) in enumerate(artifacts.items()) for a in names)
    at_root = sorted(p.name for p in out.iterdir())
    assert at_root == ["data.jsonl", "failures.jsonl", "manifest.json", "recipe.json", "stages", "usage", "usage.json"]


def test_shared_call_is_made_once_checkpointed_and_paid_for_once(tmp_path: Path) -> None:
    stages = [
        {"type": "codec.metadata", "entries": [{"use_case": "hard", "skills": ["algebra"]}]},
        {"type": "codec.decode", "instructions_per_entry": 3},
        {"type": "codec.rubrics"},
    ]
    assert codec_run(tmp_path, stages, cache=False).status == "complete"
    out = tmp_path / "out"
    shared = read_jsonl(out / "stages/02-codec.rubrics/shared_calls.jsonl")
    assert len(shared) == 1
    data = read_jsonl(out / "data.jsonl")
    rubric_events = [e for r in data for e in r["lineage"] if e["stage"] == "codec.rubrics"]
    assert sum(e["prompt_tokens"] + e["completion_tokens"] for e in rubric_events) == shared[0]["prompt_tokens"] + shared[0]["completion_tokens"] > 0
    assert sum(1 for e in rubric_events if e["prompt_tokens"]) == 1
    # A crash after the call but before the records were checkpointed: the call is read back, not made again.
    (out / "stages/02-codec.rubrics/outputs.jsonl").write_text("", encoding="utf-8")
    (out / "stages/02-codec.rubrics/done.json").unlink()
    (out / "data.jsonl").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    recipe = parse_recipe({"models": MODELS, "input": str(tmp_path / "rows.jsonl"), "stages": stages, "cache": False}, "t", tmp_path)
    assert run_recipe_sync(recipe, out, show_progress=False).status == "complete"
    usage = json.loads((out / "usage.json").read_text())["run"]["all"]
    assert usage["requests"] == 0
    assert len(read_jsonl(out / "data.jsonl")) == 3 and manifest["recipe_hash"]


# ----------------------------------------------------------------------------- exact size: top-up rounds


def test_codec_tops_up_to_deliver_exactly_budget_pairs(tmp_path: Path) -> None:
    # 8 pairs asked; the easy entry never passes Contrastive Filtering (6 of 8 after the first round).
    result = codec_run(tmp_path, budget_pairs=8)
    assert result.status == "complete" and result.records == 8
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rounds"] == 2 and manifest["shortfall"] is None
    decode = next(s for s in manifest["stages"] if s["name"] == "codec.decode")
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert {ns(r)["decode_round"] for r in data} == {1, 2}
    assert decode["outputs"] > 8
    # Resuming the finished run recomputes nothing.
    again = codec_run(tmp_path, budget_pairs=8)
    assert again.status == "complete"
    assert json.loads((tmp_path / "out" / "usage.json").read_text())["run"]["all"]["requests"] == 0


def test_top_up_stops_at_its_cap_and_reports_the_shortfall(tmp_path: Path) -> None:
    stages = [dict(s) for s in CODEC]
    stages[3] = {"type": "codec.decode", "top_up_rounds": 2}
    recipe = parse_recipe({"models": MODELS, "input": str(write_rows(tmp_path, seed_rows(SEEDS[3:4]))),  # easy only
                           "stages": stages, "budget_pairs": 3}, "t", tmp_path)
    result = run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    assert result.status == "shortfall" and result.records == 0
    assert result.shortfall["stage"] == "codec.contrastive"
    assert "after 2 extra round(s) of codec.decode" in result.shortfall["why"]
    assert main(["run", str(write_recipe(tmp_path, stages, seed_rows(SEEDS[3:4]), budget_pairs=3)),
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 4


def test_run_refuses_before_touching_out_when_a_stage_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="budget_pairs"):
        codec_run(tmp_path, [{"type": "codec.metadata", "entries": [{"use_case": "u", "skills": ["s"]}]},
                             {"type": "codec.decode"}])

    assert not (tmp_path / "out").exists()


def test_tokens_in_lineage_add_up_to_usage(tmp_path: Path) -> None:
    """Every call's tokens appear once across the final records and failure rows: fan-out never double counts."""
    recipe = parse_recipe({"models": MODELS, "input": str(write_rows(tmp_path, seed_rows(SEEDS[:4]))), "stages": CODEC,
                           "budget_pairs": 6, "cache": False}, "t", tmp_path)
    run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    out = tmp_path / "out"
    records = read_jsonl(out / "data.jsonl") + [f["record"] for f in read_jsonl(out / "failures.jsonl")]
    in_lineage = sum(e["prompt_tokens"] + e["completion_tokens"] for r in records for e in r["lineage"])
    usage = json.loads((out / "usage.json").read_text())["total"]["all"]
    assert in_lineage == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    stages = json.loads((out / "usage.json").read_text())["total"]["stages"]
    assert sum(s["requests"] for s in stages.values()) == usage["requests"]
    assert set(stages) == {"codec.encode", "codec.rubrics", "codec.decode", "codec.contrastive"}
