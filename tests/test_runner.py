"""The runner's contract: accounting, cache, resume, budget, failures, refusal of a changed recipe."""

from __future__ import annotations

from datatailor.llm.base import CompletionRequest

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datatailor.errors import UserError
from datatailor.io import read_records
from datatailor.prompts import load_prompt
from tests.conftest import cli_env
from datatailor.recipe import parse_recipe
from tests.support import echo_model, kill_9_when, line_count, make_recipe, questions, read_jsonl, run, write_rows

RESPOND = [{"type": "respond", "role": "strong"}]


def _ids(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


def test_every_record_is_accounted_for_exactly_once(tmp_path: Path) -> None:
    models = {"strong": {"backend": "scripted", "model": "flaky", "handler": "tests.support:flaky_handler"}}
    recipe = make_recipe(tmp_path, RESPOND, models, rows=questions(10))
    result = run(recipe, tmp_path / "out")
    assert result.status == "complete"
    data, failures = read_jsonl(tmp_path / "out/data.jsonl"), read_jsonl(tmp_path / "out/failures.jsonl")
    input_ids = [r.id for r in read_records(tmp_path / "input.jsonl")]
    data_ids, failed_ids = [r["id"] for r in data], [r["id"] for r in failures]
    assert sorted(data_ids + failed_ids) == sorted(input_ids)
    assert not set(data_ids) & set(failed_ids)
    assert len(failed_ids) == 4  # questions 0, 3, 6, 9
    assert {f["kind"] for f in failures} == {"llm_error"}
    assert all(f["stage"] == "respond" and "injected server error" in f["message"] for f in failures)
    # the failed record itself is kept in the failure row, so nothing is lost
    assert failures[0]["record"]["instruction"].startswith("Question number")
    # output order follows input order, not completion order
    assert data_ids == [i for i in input_ids if i in set(data_ids)]


def test_lineage_and_usage_files(tmp_path: Path) -> None:
    models = {"strong": echo_model(price_per_mtok_in=1.0, price_per_mtok_out=2.0)}
    result = run(make_recipe(tmp_path, RESPOND, models), tmp_path / "out")
    rows = read_jsonl(tmp_path / "out/data.jsonl")
    assert [r["response"] for r in rows] == [f"Answer for {i}." for i in range(5)]
    event = rows[0]["lineage"][0]
    assert event["stage"] == "respond" and event["role"] == "strong" and event["model"] == "echo"
    assert event["template_hash"] == load_prompt("respond.j2").hash
    assert event["prompt_tokens"] > 0 and event["completion_tokens"] == 3
    usage = json.loads((tmp_path / "out/usage.json").read_text())
    strong = usage["run"]["roles"]["strong"]
    assert strong["requests"] == 5 and strong["cache_hits"] == 0
    expected_cost = (strong["prompt_tokens"] * 1.0 + strong["completion_tokens"] * 2.0) / 1e6
    assert strong["cost_usd"] == pytest.approx(expected_cost)
    assert usage["total"]["roles"]["strong"]["requests"] == 5
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["recipe_hash"] == make_recipe(tmp_path, RESPOND, models).content_hash()
    assert result.records == 5


def test_rerun_makes_zero_requests_and_writes_same_bytes(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, RESPOND + [{"type": "dedup"}])
    run(recipe, tmp_path / "a")
    first = (tmp_path / "a/data.jsonl").read_bytes()
    # same --out: nothing is recomputed
    run(recipe, tmp_path / "a")
    usage = json.loads((tmp_path / "a/usage.json").read_text())
    assert usage["run"]["all"]["requests"] == 0
    assert (tmp_path / "a/data.jsonl").read_bytes() == first
    # fresh --out: every call is a cache hit, same bytes
    run(recipe, tmp_path / "b")
    usage = json.loads((tmp_path / "b/usage.json").read_text())
    assert usage["run"]["all"]["requests"] == 0 and usage["run"]["all"]["cache_hits"] == 5
    assert (tmp_path / "b/data.jsonl").read_bytes() == first


def test_editing_a_template_invalidates_exactly_its_calls(tmp_path: Path) -> None:
    (tmp_path / "ask.j2").write_text("{{ instruction }}\nAnswer in one line.")
    (tmp_path / "title.j2").write_text("Give a title for: {{ instruction }}")
    stages = [
        {"type": "respond", "role": "strong", "template": "ask.j2"},
        {"type": "generate", "role": "strong", "template": "title.j2", "output": "metadata.title"},
    ]
    recipe = make_recipe(tmp_path, stages)
    run(recipe, tmp_path / "one")
    (tmp_path / "title.j2").write_text("Suggest a short title for: {{ instruction }}")
    run(make_recipe(tmp_path, stages), tmp_path / "two")
    usage = json.loads((tmp_path / "two/usage.json").read_text())["run"]["all"]
    assert usage["cache_hits"] == 5  # the unchanged respond template
    assert usage["requests"] == 5  # only the edited template's calls
    # a comment-only edit (same rendered messages) still invalidates, via the template hash
    (tmp_path / "ask.j2").write_text("{# reworded #}{{ instruction }}\nAnswer in one line.")
    run(make_recipe(tmp_path, stages), tmp_path / "three")
    usage = json.loads((tmp_path / "three/usage.json").read_text())["run"]["all"]
    assert usage["requests"] == 5 and usage["cache_hits"] == 5


def test_changed_recipe_is_refused_unless_forced(tmp_path: Path) -> None:
    run(make_recipe(tmp_path, RESPOND), tmp_path / "out")
    changed = make_recipe(tmp_path, RESPOND + [{"type": "dedup"}])
    with pytest.raises(UserError, match="different recipe"):
        run(changed, tmp_path / "out")
    assert len(read_jsonl(tmp_path / "out/data.jsonl")) == 5  # untouched
    result = run(changed, tmp_path / "out", force=True)
    assert result.status == "complete"
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["recipe_hash"] == changed.content_hash()


def test_budget_stops_and_a_larger_budget_continues(tmp_path: Path) -> None:
    rows = questions(12)
    stages = [{"type": "respond", "role": "strong", "concurrency": 1}]
    models = {"strong": echo_model(price_per_mtok_in=1000.0, price_per_mtok_out=1000.0)}
    recipe = make_recipe(tmp_path, stages, models, rows=rows, budget={"max_usd": 0.05})
    result = run(recipe, tmp_path / "out")
    assert result.status == "budget_exhausted"
    assert not (tmp_path / "out/data.jsonl").exists()
    done = read_jsonl(next((tmp_path / "out/stages").glob("00-*")) / "outputs.jsonl")
    assert 0 < len(done) < 12
    usage = json.loads((tmp_path / "out/usage.json").read_text())
    assert usage["total"]["all"]["cost_usd"] >= 0.05
    assert json.loads((tmp_path / "out/manifest.json").read_text())["status"] == "budget_exhausted"
    # Same recipe with a larger budget: continues, does not redo finished rows.
    bigger = make_recipe(tmp_path, stages, models, rows=rows, budget={"max_usd": 10.0})
    result = run(bigger, tmp_path / "out")
    assert result.status == "complete"
    usage2 = json.loads((tmp_path / "out/usage.json").read_text())
    assert usage2["run"]["all"]["requests"] == 12 - len(done)
    assert usage2["total"]["all"]["requests"] == 12
    # and the result equals an uninterrupted run
    run(make_recipe(tmp_path, stages, models, rows=rows), tmp_path / "clean")
    assert (tmp_path / "out/data.jsonl").read_bytes() == (tmp_path / "clean/data.jsonl").read_bytes()


def test_token_budget(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, [{"type": "respond", "role": "strong", "concurrency": 1}], budget={"max_tokens": 30})
    result = run(recipe, tmp_path / "out")
    assert result.status == "budget_exhausted" and "tokens" in result.message


@pytest.mark.parametrize(
    ("rules", "kind"),
    [
        ([{"match": ".*", "error": "server_error"}], "llm_error"),
        ([{"match": ".*", "error": "timeout"}], "timeout"),
        ([{"match": "nothing-matches-this"}], "no_rule"),
    ],
)
def test_failure_kinds_from_the_model(tmp_path: Path, rules: list, kind: str) -> None:
    models = {"strong": {"backend": "scripted", "model": "bad", "rules": rules}}
    result = run(make_recipe(tmp_path, RESPOND, models, rows=questions(3)), tmp_path / "out")
    failures = read_jsonl(tmp_path / "out/failures.jsonl")
    assert result.status == "complete" and result.records == 0
    assert [f["kind"] for f in failures] == [kind] * 3


def test_parse_error_after_reasks(tmp_path: Path) -> None:
    models = {"strong": {"backend": "scripted", "model": "chatty", "max_parse_retries": 2,
                         "rules": [{"match": ".*", "reply": "I would rather not give a number."}]}}
    stages = [{"type": "generate", "role": "strong", "template": "t.j2", "output": "metadata.x",
               "schema_fields": {"score": "int"}}]
    (tmp_path / "t.j2").write_text("Rate: {{ instruction }}")
    # Both replies are the same refusal, which would also trip the systematic-failure stop: switched off here.
    run(make_recipe(tmp_path, stages, models, rows=questions(2), systematic_failures=0), tmp_path / "out")
    failures = read_jsonl(tmp_path / "out/failures.jsonl")
    assert [f["kind"] for f in failures] == ["parse_error", "parse_error"]
    assert "after 3 attempt(s)" in failures[0]["message"]
    usage = json.loads((tmp_path / "out/usage.json").read_text())
    assert usage["run"]["all"]["requests"] == 6  # first ask + 2 re-asks, per record


def test_reask_repairs_a_bad_reply(tmp_path: Path) -> None:
    # First reply is prose; the re-ask (which carries the parse error) gets valid JSON.
    models = {"strong": {"backend": "scripted", "model": "m", "handler": "tests.test_runner:json_on_reask"}}
    stages = [{"type": "generate", "role": "strong", "template": "t.j2", "output": "metadata.x",
               "schema_fields": {"score": "int"}}]
    (tmp_path / "t.j2").write_text("Rate: {{ instruction }}")
    result = run(make_recipe(tmp_path, stages, models, rows=questions(2)), tmp_path / "out")
    assert result.records == 2
    assert [r["metadata"]["x"] for r in read_jsonl(tmp_path / "out/data.jsonl")] == [{"score": 7}] * 2


def test_stage_bug_becomes_a_failure_row_not_a_crash(tmp_path: Path) -> None:
    # A template reading a metadata key only some records have fails at render time, for those records only.
    (tmp_path / "broken.j2").write_text("{{ instruction }} {{ metadata.topic }}")
    rows = [{"instruction": f"Question number {i}: explain.", **({"topic": "t"} if i % 2 else {})} for i in range(6)]
    stages = [{"type": "respond", "role": "strong", "template": "broken.j2"}]
    result = run(make_recipe(tmp_path, stages, rows=rows), tmp_path / "out")
    failures = read_jsonl(tmp_path / "out/failures.jsonl")
    assert result.status == "complete"
    assert [f["kind"] for f in failures] == ["stage_error"] * 3
    assert "topic" in failures[0]["message"]
    assert result.records == 3


def test_dedup_drops_duplicates_with_reasons(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Explain how photosynthesis turns sunlight into chemical energy in plants."},
        {"instruction": "explain how photosynthesis turns sunlight into chemical energy in plants!"},
        {"instruction": "Explain how photosynthesis turns sunlight into chemical energy in green plants."},
        {"instruction": "Write a haiku about the sea."},
    ]
    result = run(make_recipe(tmp_path, [{"type": "dedup", "threshold": 0.6}], rows=rows), tmp_path / "out")
    kept = read_jsonl(tmp_path / "out/data.jsonl")
    failures = {f["kind"]: f for f in read_jsonl(tmp_path / "out/failures.jsonl")}
    assert [r["instruction"] for r in kept] == [rows[0]["instruction"], rows[3]["instruction"]]
    assert set(failures) == {"duplicate", "near_duplicate"}
    assert kept[0]["id"] in failures["duplicate"]["message"]
    assert result.records + result.failures == 4


def test_repeated_input_rows_get_distinct_ids(tmp_path: Path) -> None:
    rows = [{"instruction": "Same question."}] * 3
    result = run(make_recipe(tmp_path, RESPOND, rows=rows), tmp_path / "out")
    ids = _ids(tmp_path / "out/data.jsonl")
    assert result.records == 3 and len(set(ids)) == 3


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path: Path) -> None:
    rows = questions(40)
    models = {"strong": echo_model(latency_s=0.05)}
    recipe_path = tmp_path / "recipe.yaml"
    write_rows(tmp_path / "input.jsonl", rows)
    recipe_path.write_text(yaml.safe_dump({
        "models": models,
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong", "concurrency": 2}, {"type": "dedup"}],
    }))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datatailor", "run", str(recipe_path), "--out", str(out), "--no-progress"]
    env = cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "cache-kill"))
    checkpoint = out / "stages" / "00-respond" / "outputs.jsonl"
    kill_9_when(cmd, env, lambda: line_count(checkpoint) >= 10)
    partial = len(checkpoint.read_text().splitlines())
    assert 10 <= partial < 40, "the process should be killed part-way"
    assert not (out / "data.jsonl").exists()
    # resume with a fresh cache: only the missing rows are requested
    env2 = cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "cache-resume"))
    done = subprocess.run(cmd, env=env2, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    usage = json.loads((out / "usage.json").read_text())
    assert usage["run"]["all"]["requests"] == 40 - len(read_jsonl(checkpoint)[:partial])
    clean = tmp_path / "clean"
    subprocess.run(cmd[:-2] + [str(clean), "--no-progress"], env=env2, check=True, capture_output=True, timeout=120)
    assert (out / "data.jsonl").read_bytes() == (clean / "data.jsonl").read_bytes()
    assert len(read_jsonl(out / "data.jsonl")) == 40


def test_a_shortfall_without_losses_says_the_input_was_too_small(tmp_path: Path) -> None:
    write_rows(tmp_path / "input.jsonl", questions(3))
    recipe = parse_recipe({"models": {"strong": echo_model()}, "input": "input.jsonl", "budget_pairs": 5, "stages": RESPOND},
                          "small", tmp_path)
    result = run(recipe, tmp_path / "out")
    assert result.status == "shortfall" and result.records == 3
    assert "no record was dropped; the 3 input record(s) yielded only 3 pairs" in result.shortfall["why"]


def test_server_down_stops_the_run_with_interrupted_status(tmp_path: Path) -> None:
    models = {"strong": {"backend": "scripted", "model": "down", "rules": [{"match": ".*", "error": "unavailable"}]}}
    result = run(make_recipe(tmp_path, RESPOND, models), tmp_path / "out")
    assert result.status == "interrupted" and "unavailable" in result.message
    assert not (tmp_path / "out/failures.jsonl").exists()  # no record was blamed for the outage


def test_user_error_mid_run_leaves_a_resumable_folder(tmp_path: Path) -> None:
    models = {"strong": {"backend": "scripted", "model": "m", "replay": "missing-recording.jsonl"}}
    recipe = make_recipe(tmp_path, RESPOND, models)
    with pytest.raises(UserError, match="replay file not found"):
        run(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "replay file not found" in manifest["message"]
    # once the problem is fixed (the recording appears), the same --out is accepted and completes
    (tmp_path / "missing-recording.jsonl").write_text("")
    result = run(recipe, tmp_path / "out")
    assert result.status == "complete"
    assert {f["kind"] for f in read_jsonl(tmp_path / "out/failures.jsonl")} == {"no_rule"}


def json_on_reask(request: CompletionRequest) -> str:
    """Prose the first time; valid JSON when re-asked (the re-ask adds the reply and the error as turns)."""
    return '{"score": 7}' if len(request.messages) > 1 else "Seven, I think."
