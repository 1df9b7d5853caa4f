"""Whole recipes with a batched teacher on the mock server: the same records as online, each record's lineage naming
its batch, batched tokens at half the price, a re-run that makes zero requests, and the kill -9 resume.

The mock answers every request (online or in a batch) with `refed_world` or `codec_world` below, which read the
rendered prompt (templates do not travel over HTTP) and reply deterministically, like tests/test_refed.py's and
tests/test_codec.py's scripted teachers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.recipe import parse_recipe
from datatailor.runner import RunResult, run_recipe_sync
from datatailor.testing import MockConfig, MockOpenAIServer
from tests.conftest import cli_env
from tests.support import kill_9_when, read_jsonl
from tests.test_refed import FULL

PRICES = {"price_per_mtok_in": 0.15, "price_per_mtok_out": 0.60}  # gpt-4o-mini
FAST_BATCH = {"batch_collect_s": 0.05, "batch_poll_s": 0.05, "batch_poll_max_s": 0.2}


# ----------------------------------------------------------------------------- the worlds the mock answers with


def _after(text: str, heading: str) -> str:
    """The line after `heading` in a rendered prompt."""
    return text.split(heading, 1)[1].lstrip("\n").split("\n", 1)[0]


def refed_world(body: dict[str, Any]) -> str:
    messages = body["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    first, seed = users[0], body.get("seed", 0)
    if "# Reference pair (JSON)" in first:
        ref = json.loads(_after(first, "# Reference pair (JSON)"))["instruction"]
        return json.dumps({"subject_areas": f"areas of {ref}", "relevant_skills": f"skills of {ref}"})
    if "# Pair (JSON)" in first:
        return json.dumps({"response_feedback": f"feedback on {json.loads(_after(first, '# Pair (JSON)'))['instruction'][:40]}"})
    if "# Reference instruction (JSON string)" in first:
        n = int(re.search(r"Write (\d+) new instructions", first)[1])  # type: ignore[index]
        ref = json.loads(_after(first, "# Reference instruction (JSON string)"))
        feature = re.search(r"# Feature: (.+?) \(JSON string\)", first)[1]  # type: ignore[index]
        return json.dumps({"instructions": [f"New task {i} ({feature}, {seed % 997}) inspired by {ref[:30]}" for i in range(n)]})
    if "# Response to improve (JSON string)" in first:
        draft = json.loads(_after(first, "# Response to improve (JSON string)"))
        return json.dumps({
            "analysis": {"original_strengths": ["clear"], "improvement_opportunities": ["depth"], "relevant_feedback": ["detail"]},
            "implementation_strategy": {"planned_changes": ["add an example"], "rationale": "deeper"},
            "improved_response": f"Improved: {draft} With an example.",
        })
    return f"Draft answer to: {users[-1]}"  # refed.respond: the last user message is the new instruction


def codec_world(body: dict[str, Any]) -> str:
    messages = body["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    user = [m["content"] for m in messages if m["role"] == "user"][-1 if "analyst" in system else 0]
    if "analyst of the requests" in system:  # codec/encode.j2: the seed is in the last user turn
        m = re.search(r"\[uc=([^|\]]+)\|sk=([^\]]+)\]", user)
        assert m, user
        return f"Use case: {m.group(1)}\nSkills: {m.group(2).replace(',', ', ')}"
    if "domain expert in" in system:  # codec/rubrics.j2
        n = int(re.search(r"write (\d+) rubrics", user)[1])  # type: ignore[index]
        rubrics = "\n".join(f"{i + 1}. Rubric {i + 1}: depth level {i + 1}" for i in range(n))
        actions = "\n".join(f"{i + 1}. Add requirement {i + 1}" for i in range(n))
        return f"Rubrics:\n{rubrics}\nActions:\n{actions}"
    if "You write requests" in system:  # codec/decode.j2
        n = int(re.search(r"Write (\d+) different", user)[1])  # type: ignore[index]
        use_case = re.search(r"serve: (.+)", user)[1]  # type: ignore[index]
        skills = re.search(r"answer them: (.+)", user)[1]  # type: ignore[index]
        return "\n".join(f"{i + 1}. Task {i + 1}-{body['seed'] % 997} about {use_case} needing {skills}." for i in range(n))
    if "rewrites requests" in system:  # codec/improve.j2
        action = _after(user, "applying the change described here:")
        instruction = user.split("Request:\n", 1)[1].split("\n\nNew request:", 1)[0]
        return f"New request: {instruction} (harder: {action.lower()})"
    if "exacting reviewer" in system:  # judge/pairwise_scores.j2
        answers = re.findall(r"Answer of Assistant \d >>>\n(.*?)\n<<< End", user, re.DOTALL)
        return " ".join(str(int(q[1]) if (q := re.search(r"QUALITY=(\d+)", a)) else 5) for a in answers)
    if body["model"] == "mock-target":  # respond.j2, answered by the target
        if "late" in user:
            return "Target answer. QUALITY=2" if "(harder" in user else "Target answer. QUALITY=8"
        return "Target answer. QUALITY=9" if "flip" in user or "easy" in user else "Target answer. QUALITY=2"
    return "Strong answer. QUALITY=2" if "flip" in user else "Strong answer. QUALITY=9"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def mock() -> Iterator[MockOpenAIServer]:
    with MockOpenAIServer(MockConfig(handler="tests.test_batch_recipes:refed_world", batch_delay_s=0.1)) as server:
        yield server


def model(url: str, name: str, batch: bool, **extra: Any) -> dict[str, Any]:
    entry = {"backend": "openai", "model": name, "base_url": url, "api_key_env": None, "max_retries": 2, **PRICES, **extra}
    return {**entry, "batch": True, **FAST_BATCH} if batch else entry


def strip_batch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without what only says how they were paid: each event's batch id and $ (half in a batch)."""
    out = json.loads(json.dumps(records))
    for r in out:
        for e in r["lineage"]:
            e["details"].pop("batch_id", None)
            e["cost_usd"] = 0.0
    return out


REFERENCES = [{"instruction": f"How do I do thing {i} well?", "output": f"A careful answer about thing {i}."} for i in range(4)]
REFED = FULL  # test_refed's pipeline: references, feedback, synthesis, drafts, improvements, select


def refed_recipe(tmp_path: Path, url: str, batch: bool, **fields: Any) -> Any:
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REFERENCES), encoding="utf-8")
    data = {"models": {"teacher": model(url, "mock-teacher", batch)}, "input": str(path), "stages": REFED,
            "budget_pairs": 12, **fields}
    return parse_recipe(data, "refed-batch", tmp_path)


def run(recipe: Any, out: Path) -> RunResult:
    return run_recipe_sync(recipe, out, show_progress=False)


def usage(out: Path, part: str = "run") -> dict[str, Any]:
    return json.loads((out / "usage.json").read_text())[part]["all"]


# ----------------------------------------------------------------------------- REFED


def test_refed_with_a_batched_teacher_gives_the_online_records_at_half_the_price(tmp_path: Path, mock: MockOpenAIServer) -> None:
    online = run(refed_recipe(tmp_path, mock.url, batch=False, cache=False), tmp_path / "online")
    assert online.status == "complete" and online.records == 12
    assert mock.stats["batches_created"] == 0
    chat_requests = mock.stats["requests"]

    batched = run(refed_recipe(tmp_path, mock.url, batch=True, cache=False), tmp_path / "batched")
    assert batched.status == "complete"
    assert mock.stats["requests"] == chat_requests, "a batched run makes no online request"
    on, off = read_jsonl(tmp_path / "online" / "data.jsonl"), read_jsonl(tmp_path / "batched" / "data.jsonl")
    assert strip_batch(off) == strip_batch(on)

    # every teacher event names the batch that answered it, and every batch it names exists on the server
    named = {e["details"]["batch_id"] for r in off for e in r["lineage"] if e["role"] == "teacher"}
    assert all(e["details"].get("batch_id") for r in off for e in r["lineage"] if e["role"] == "teacher")
    assert named <= set(mock.batch_api.batches)
    # feedback → synthesis → response → improvement: at least one batch per step, each answering a whole step at once
    assert 4 <= mock.stats["batches_created"] <= 6
    assert mock.stats["batch_lines"] == usage(tmp_path / "batched")["requests"] == usage(tmp_path / "online")["requests"]

    # same tokens, half the $ (gpt-4o-mini's batch price)
    u_on, u_off = usage(tmp_path / "online"), usage(tmp_path / "batched")
    assert (u_off["prompt_tokens"], u_off["completion_tokens"]) == (u_on["prompt_tokens"], u_on["completion_tokens"])
    assert u_off["cost_usd"] == pytest.approx(u_on["cost_usd"] / 2)
    assert sum(e["cost_usd"] for r in off for e in r["lineage"]) == pytest.approx(sum(e["cost_usd"] for r in on for e in r["lineage"]) / 2)


def test_a_rerun_makes_zero_requests_from_the_cache(tmp_path: Path, mock: MockOpenAIServer) -> None:
    first = run(refed_recipe(tmp_path, mock.url, batch=True), tmp_path / "a")
    assert first.status == "complete"
    created = mock.stats["batches_created"]
    # a new run directory: nothing checkpointed, every call answered by the request cache the batches filled
    second = run(refed_recipe(tmp_path, mock.url, batch=True), tmp_path / "b")
    assert second.status == "complete" and mock.stats["batches_created"] == created
    assert usage(tmp_path / "b")["requests"] == 0 and usage(tmp_path / "b")["cache_hits"] == usage(tmp_path / "a")["requests"]
    assert read_jsonl(tmp_path / "b" / "data.jsonl") == read_jsonl(tmp_path / "a" / "data.jsonl")
    # and the same recipe online finds the batched replies in the cache too
    online = run(refed_recipe(tmp_path, mock.url, batch=False), tmp_path / "c")
    assert usage(tmp_path / "c")["requests"] == 0 and online.records == 12


# ----------------------------------------------------------------------------- CodecLM

SEEDS = [
    "[uc=hard|sk=proof writing,algebra] Prove that the sum of two even numbers is even.",
    "[uc=flip|sk=small talk] Say hello to a new colleague.",
    "[uc=late|sk=trip planning,budgeting] Plan a weekend in Lisbon.",
    "[uc=easy|sk=spelling] Spell the word necessary.",
]
CODEC = [
    {"type": "codec.encode"},
    {"type": "codec.augment", "pool_size": 4},
    {"type": "codec.rubrics"},
    {"type": "codec.decode", "top_up_rounds": 0},
    {"type": "codec.contrastive"},
]


def test_codec_with_a_batched_strong_model_and_an_online_target(tmp_path: Path) -> None:
    """Contrastive Filtering's iterations (answer, judge, improve, answer again) each become the next batch; the
    target stays online in the same recipe."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS), encoding="utf-8")
    with MockOpenAIServer(MockConfig(handler="tests.test_batch_recipes:codec_world", batch_delay_s=0.05)) as mock:
        def recipe(batch: bool) -> Any:
            models = {"strong": model(mock.url, "mock-strong", batch, json_mode="none"),
                      "target": model(mock.url, "mock-target", False, json_mode="none")}
            return parse_recipe({"models": models, "input": str(seeds), "stages": CODEC, "budget_pairs": 8, "cache": False},
                                "codec-batch", tmp_path)

        online = run(recipe(False), tmp_path / "online")
        before = mock.stats["requests"]
        batched = run(recipe(True), tmp_path / "batched")
        online_chat_in_batched_run = mock.stats["requests"] - before
        batches = mock.stats["batches_created"]
    assert online.status == batched.status
    on, off = read_jsonl(tmp_path / "online" / "data.jsonl"), read_jsonl(tmp_path / "batched" / "data.jsonl")
    assert on and strip_batch(off) == strip_batch(on)
    kept = {r["metadata"]["codec"]["contrastive"]["kept"] for r in off}
    assert kept == {"strong", "target"}, "both branches of the filter are exercised"
    roles = json.loads((tmp_path / "batched" / "usage.json").read_text())["run"]["roles"]
    # the target's calls went online, every strong call through a batch
    assert online_chat_in_batched_run == roles["target"]["requests"] > 0
    assert mock.stats["batch_lines"] == roles["strong"]["requests"]
    assert batches >= 6  # encode, rubrics, decode, and per contrastive iteration: answer, judge (both orders), improve
    for r in off:
        for e in r["lineage"]:
            assert ("batch_id" in e["details"]) == (e["role"] == "strong"), e


# ----------------------------------------------------------------------------- kill -9 while a batch is pending


def test_kill_9_while_a_batch_is_pending_resumes_without_submitting_it_again(tmp_path: Path) -> None:
    slow = MockConfig(handler="tests.test_batch_recipes:refed_world", batch_delay_s=1.5)
    with MockOpenAIServer(slow) as mock:
        recipe = {"models": {"teacher": model(mock.url, "mock-teacher", batch=True)}, "stages": REFED, "budget_pairs": 12}
        refs = tmp_path / "refs.jsonl"
        refs.write_text("".join(json.dumps(r) + "\n" for r in REFERENCES), encoding="utf-8")
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({**recipe, "input": str(refs)}), encoding="utf-8")
        out, clean = tmp_path / "out", tmp_path / "clean"
        cmd = [sys.executable, "-m", "datatailor", "run", str(path), "--out", str(out), "--no-progress"]
        journal = out / "batches" / "journal.jsonl"

        def respond_batch_pending() -> bool:
            """Batches: feedback, synthesis, responses, improvements; the third is created and still running."""
            rows = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
            return sum(r["event"] == "created" for r in rows) == 3 and sum(r["event"] == "finished" for r in rows) == 2

        kill_9_when(cmd, cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c1")), respond_batch_pending, timeout_s=90)
        created_before = mock.stats["batches_created"]
        lines_before = mock.stats["batch_lines"]
        assert not (out / "data.jsonl").exists()

        done = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c2")), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        resumed_lines = mock.stats["batch_lines"] - lines_before
        resumed_batches = mock.stats["batches_created"] - created_before
        assert mock.stats["batch_answered_again"] == 0, "no request was answered (paid for) twice"

        subprocess.run(cmd[:-3] + ["--out", str(clean), "--no-progress"], env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c3")),
                       check=True, capture_output=True, timeout=120)
        clean_lines = mock.stats["batch_lines"] - lines_before - resumed_lines
    assert strip_batch(read_jsonl(out / "data.jsonl")) == strip_batch(read_jsonl(clean / "data.jsonl"))
    # the pending response batch was polled, not submitted again: the resumed run sent only the improvements
    planned = [r for r in (json.loads(line) for line in journal.read_text().splitlines()) if r["event"] == "planned"]
    assert [{o.split(":")[0] for _, o in r["requests"]} for r in planned] == [
        {"refed.feedback"}, {"refed.synthesize"}, {"refed.respond"}, {"refed.improve"}]
    assert (resumed_batches, resumed_lines) == (1, len(planned[3]["requests"]))
    assert clean_lines == sum(len(r["requests"]) for r in planned)
    # the resumed invocation counts the pending batch's answers once, when it collects them, and its own batch
    assert usage(out)["requests"] == len(planned[2]["requests"]) + len(planned[3]["requests"])
    assert usage(clean, "total")["requests"] == clean_lines


def test_a_map_stage_with_a_batched_role_keeps_enough_records_in_flight_for_one_batch(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """`concurrency: 1` would send ten one-request batches one after the other; the stage takes
    `batch_records_in_flight` records at a time instead."""
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?"}) + "\n" for i in range(10)), encoding="utf-8")
    teacher = model(mock.url, "mock-teacher", batch=True, batch_records_in_flight=6)
    recipe = parse_recipe({"models": {"teacher": teacher}, "input": str(path), "cache": False,
                           "stages": [{"type": "respond", "role": "teacher", "concurrency": 1}]}, "respond", tmp_path)
    assert run(recipe, tmp_path / "out").records == 10
    sizes = [len(json.loads(line)["requests"]) for line in (tmp_path / "out" / "batches" / "journal.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "planned"]
    assert sizes == [6, 4]


def test_the_python_api_runs_a_recipe_with_a_batched_role(tmp_path: Path, mock: MockOpenAIServer) -> None:
    import datatailor as dt

    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?"}) + "\n" for i in range(3)), encoding="utf-8")
    run_output = dt.run({"models": {"teacher": model(mock.url, "mock-teacher", batch=True)}, "input": str(path),
                         "stages": [{"type": "respond", "role": "teacher"}]}, out=tmp_path / "out", cache=False)
    assert run_output.status == "complete" and len(run_output.records) == 3
    assert {r.lineage[-1].details["batch_id"] for r in run_output.records} == {"batch_mock_1"}
