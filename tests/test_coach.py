"""CoachLM: the training set from expert revisions (repairs, revision size, α, held-out split), the coach format,
`coach.revise` on a scripted coach (every reason an original is kept, the rating gate, the prompted coach, resume
after kill -9), the report, and the prompt used identically in training and revision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.llm.base import CompletionRequest
from datatailor.prompts import load_prompt
from datatailor.recipe import parse_recipe
from datatailor.records import Record
from datatailor.runner import run_recipe_sync
from datatailor.stages.base import record_variables
from datatailor.stages.coach import Pair, directive, load_expert_pairs, parse_pair, prepare, select_alpha, serialize_pair, split
from datatailor.stages.coach.prepare import ExpertPair
from datatailor.train.sft_data import load_pairs, pair_messages
from tests.conftest import REPO, cli_env
from tests.support import kill_9_when, line_count, read_jsonl, write_rows

# ----------------------------------------------------------------------------- the training set


def fake(i: int, distance: int) -> ExpertPair:
    before = Pair(f"task {i}", "", "x")
    return ExpertPair(id=f"p{i:02d}", before=before, after=Pair(f"task {i}", "", "x" + "y" * distance), stored_distance=distance)


def test_alpha_keeps_the_largest_revisions_or_the_smallest() -> None:
    pairs = [fake(i, d) for i, d in enumerate([5, 50, 10, 40, 20, 30, 60, 1, 2, 3])]
    top = select_alpha(pairs, 0.3, "descending")
    assert [p.distance for p in top] == [60, 50, 40]  # ceil(0.3 × 10) = 3, largest first (the CoachLM README)
    assert [p.distance for p in select_alpha(pairs, 0.3, "ascending")] == [1, 2, 3]
    assert len(select_alpha(pairs, 0.25, "descending")) == 3  # ceil(2.5)
    with pytest.raises(Exception, match="alpha"):
        select_alpha(pairs, 0.0, "descending")


def test_the_held_out_split_never_enters_training(tmp_path: Path) -> None:
    report = prepare("coachlm", tmp_path, alpha=0.3, holdout=50, seed=3)
    train = read_jsonl(tmp_path / "train.jsonl")
    held = read_jsonl(tmp_path / "heldout.jsonl")
    assert (report["pairs"], report["heldout"], len(held)) == (2301, 50, 50)
    assert len(train) == report["train"] == 676  # ceil(0.3 × 2,251)
    held_pairs = {serialize_pair(h["Raw Instruction"], h["Raw Input"], h["Raw Response"]) for h in held}
    assert not held_pairs & {t["input"] for t in train}
    assert [r["Raw Instruction"] for r in read_jsonl(tmp_path / "shots.jsonl")] == [parse_pair(t["input"]).instruction for t in train]
    # the split is the seed's
    other = prepare("coachlm", tmp_path / "other", holdout=50, seed=4)
    assert other["heldout"] == 50 and read_jsonl(tmp_path / "other" / "heldout.jsonl") != held
    assert min(t["distance"] for t in train) >= report["train_distance"]["min"] >= 401


def test_input_embedded_in_the_input_field_is_re_split_on_the_real_rows() -> None:
    pairs = load_expert_pairs("coachlm")
    resplit = [p for p in pairs if "input_resplit" in p.repairs]
    assert len(resplit) == 22
    poem = next(p for p in resplit if p.before.instruction.startswith("Given the compose"))
    assert (poem.before.instruction, poem.before.input) == ("Given the compose a poem.", "A river flows gracefully through the town.")
    assert all("Input:" not in p.before.input + p.after.input + p.before.instruction + p.after.instruction for p in pairs)
    # rows 1250 and 1364 of the file: an empty instruction whose input (with "Input:" inside) became the instruction
    energy, repair = (pairs[i] for i in (1250, 1364))
    assert energy.before.input == "Question: How can we save energy in our homes?" and energy.before.instruction.endswith("5 sentences.")
    assert (repair.before.instruction, repair.before.input) == (
        "a list of repair items and output the total cost.", "Muffler - $50, Brakes pads - $30, Tire rotation - $40")
    assert {"empty_instruction", "input_resplit"} <= set(energy.repairs) & set(repair.repairs)
    assert sum(1 for p in pairs if "empty_instruction" in p.repairs) == 2
    # the revision size is the stored Distance for the rows the file's layout reproduces
    assert sum(1 for p in pairs if p.as_stored_distance == p.stored_distance) >= 2000


def test_training_rows_use_the_coach_format() -> None:
    pairs = load_expert_pairs("coachlm")
    rest, held = split(pairs, 10, 0)
    assert len(rest) == 2291 and not {p.id for p in held} & {p.id for p in rest}


# ----------------------------------------------------------------------------- the coach format


def test_serialization_round_trips() -> None:
    pair = Pair("Summarise:\n- one\n- two", "", "A summary\n\nwith two paragraphs.")
    assert parse_pair(serialize_pair(**pair.fields())) == pair
    with_input = Pair("Translate", "Bonjour [[ not a marker ]]", "Hello")
    assert parse_pair(serialize_pair(**with_input.fields())) == with_input


def test_the_parser_cleans_up_or_refuses() -> None:
    text = "Sure! Here is the revision:\n[[INSTRUCTION]]\nDo X.\n[[INPUT]]\n\n[[RESPONSE]]\nStep 1.\nStep 1.\nStep 2.\n[[INSTRUCTION]]\nrepeated"
    assert parse_pair(text) == Pair("Do X.", "", "Step 1.\nStep 2.")  # preamble dropped, repeats collapsed, repeat ignored
    assert parse_pair("[[instruction]]\nA\n[[ RESPONSE ]]\nB") == Pair("A", "", "B")  # marker case and spaces
    with pytest.raises(ValueError, match="no response section"):
        parse_pair("[[INSTRUCTION]]\nDo X.\n[[INPUT]]\nsomething that was cut off")  # truncated
    assert parse_pair("[[INSTRUCTION]]\nDo X.\n[[RESPONSE]]\n   ") == Pair("Do X.", "", "")  # empty: the stage decides
    with pytest.raises(ValueError):
        parse_pair("I improved it: do X better.")


def test_training_and_revision_render_the_same_prompt(tmp_path: Path) -> None:
    prepare("coachlm", tmp_path, holdout=10)
    (row,) = [r for r, _ in zip(read_jsonl(tmp_path / "train.jsonl"), range(1))]
    records, _ = load_pairs(tmp_path / "train.jsonl", limit=1)
    trained = pair_messages(records[0], load_prompt("respond.j2"))
    revision_request = Record(id="x", instruction=directive(), input=row["input"])
    assert load_prompt("respond.j2").render(**record_variables(revision_request)) == trained


# ----------------------------------------------------------------------------- coach.revise


SEEN: list[CompletionRequest] = []


def coach(request: CompletionRequest) -> str:
    """Revises according to a keyword in the pair: GOOD, PROSE, EMPTY, SHORT, LONG, ECHO, SAME, CUT."""
    SEEN.append(request)
    v = request.variables
    pair = parse_pair(v["input"] if request.template == "respond.j2" else v["pair"])
    text = pair.instruction
    if "PROSE" in text:
        return "I think this pair is fine, but the answer could be longer."
    if "EMPTY" in text:
        return serialize_pair(pair.instruction, pair.input, " ")
    if "SHORT" in text:
        return serialize_pair(pair.instruction, pair.input, "No.")
    if "LONG" in text:
        return serialize_pair(pair.instruction, pair.input, pair.response * 10)
    if "ECHO" in text:
        return serialize_pair(directive(), pair.input, directive())
    if "SAME" in text:
        return serialize_pair(**pair.fields())
    if "CUT" in text:
        return serialize_pair(pair.instruction, pair.input, pair.response + " more " * 400)
    if "PARROT" in text:  # the instruction is the directive itself, the response a plausible revision
        return serialize_pair(directive(), pair.input, pair.response + " Here is one more step and an example.")
    if "HALF" in text:  # exactly half the original response's length: at min_length_ratio 0.5, not below it
        return serialize_pair(pair.instruction + " Be brief.", pair.input, pair.response[: len(pair.response) // 2])
    if "FOREIGN" in text:  # a Chinese phrase and a full-width comma slip into the revision
        return serialize_pair(pair.instruction + " Be specific.", pair.input,
                              pair.response + " 这是答案。 Then it rains again， and the cycle repeats.")
    if "EXPERT" in text:
        return EXPERT_REVISIONS[serialize_pair(**pair.fields())]
    return serialize_pair(pair.instruction + " Be specific.", pair.input, pair.response + " Here is one more step and an example.")


EXPERT_REVISIONS: dict[str, str] = {}  # serialized raw pair -> the expert's serialized revision (the EXPERT coach)

ROWS = [{"instruction": f"{kw} task: explain the water cycle", "input": "", "output": "Water evaporates, condenses and falls as rain."}
        for kw in ("GOOD", "PROSE", "EMPTY", "SHORT", "LONG", "ECHO", "SAME", "CUT")]
COACH = {"backend": "scripted", "model": "coach", "handler": "tests.test_coach:coach", "max_tokens": 200}


def revise(tmp_path: Path, stages: list[dict[str, Any]], rows: list[dict[str, Any]] = ROWS, name: str = "out", **models: Any):
    recipe = parse_recipe({"models": {"coach": COACH, **models}, "input": str(write_rows(tmp_path / "pairs.jsonl", rows)),
                           "stages": stages, "cache": False}, "test-coach", tmp_path)
    return run_recipe_sync(recipe, tmp_path / name, show_progress=False)


def test_a_bad_revision_never_replaces_the_pair(tmp_path: Path) -> None:
    SEEN.clear()  # other test files reuse this coach
    result = revise(tmp_path, [{"type": "coach.revise"}])
    assert result.status == "complete" and result.records == len(ROWS) and result.failures == 0  # nothing dropped
    data = {r["instruction"].split()[0]: r for r in read_jsonl(tmp_path / "out" / "data.jsonl")}
    reasons = {k: r["metadata"]["coach"]["kept_original"] for k, r in data.items()}
    assert reasons == {"GOOD": None, "PROSE": "unparsable", "EMPTY": "empty_field", "SHORT": "too_short",
                       "LONG": "too_long", "ECHO": "copies_prompt", "SAME": "unchanged", "CUT": "truncated"}
    good = data["GOOD"]
    assert good["instruction"].endswith("Be specific.") and good["response"].endswith("an example.")
    assert good["metadata"]["coach"]["changed"] == ["instruction", "response"] and good["metadata"]["coach"]["edit_distance"] == 51
    for key, r in data.items():
        if key != "GOOD":  # the original pair is kept as it was, with the reason
            assert r["response"] == ROWS[0]["output"] and r["instruction"] == f"{key} task: explain the water cycle"
            assert r["metadata"]["coach"]["reason"]
    assert data["PROSE"]["metadata"]["coach"]["revision"] is None and data["SHORT"]["metadata"]["coach"]["revision"]["response"] == "No."
    assert SEEN and all(r.sampling.temperature == 0.0 for r in SEEN)  # greedy, as the paper's coach
    report = json.loads((tmp_path / "out" / "reports" / "coachlm_report.json").read_text())
    assert (report["pairs"], report["revised"]) == (8, 1)
    assert report["kept_original"] == {"unparsable": 1, "empty_field": 1, "too_short": 1, "too_long": 1, "copies_prompt": 1,
                                       "unchanged": 1, "truncated": 1}
    assert report["fields_changed"] == {"instruction": 1, "response": 1}


def test_the_cleanup_refuses_a_copied_directive_keeps_half_length_and_removes_other_scripts(tmp_path: Path) -> None:
    rows = [{"instruction": f"{kw} task: explain the water cycle", "input": "", "output": "Water evaporates, condenses and falls as rain."}
            for kw in ("PARROT", "HALF", "FOREIGN")]
    # a pair that is not English keeps what the coach wrote in its script
    rows.append({"instruction": "FOREIGN task: translate into Chinese", "input": "Rain is part of the water cycle.",
                 "output": "雨是水循环的一部分，它从云中落下。"})
    revise(tmp_path, [{"type": "coach.revise"}], rows)
    data = {(r["instruction"].split()[0], r["metadata"]["coach"]["original"]["response"]): r
            for r in read_jsonl(tmp_path / "out" / "data.jsonl")}
    echo = data["PARROT", rows[0]["output"]]["metadata"]["coach"]
    assert echo["kept_original"] == "copies_prompt" and echo["revision"]["instruction"] == directive()
    assert echo["revision"]["response"].endswith("one more step and an example.")  # only the instruction copies it
    half = data["HALF", rows[1]["output"]]
    assert half["metadata"]["coach"]["revised"] and half["response"] == rows[1]["output"][:23]  # ratio exactly 0.5
    english = data["FOREIGN", rows[2]["output"]]
    assert english["response"] == rows[2]["output"] + " Then it rains again, and the cycle repeats."
    assert english["metadata"]["coach"]["non_english_removed"] == 6 and english["metadata"]["coach"]["revised"]
    chinese = data["FOREIGN", rows[3]["output"]]
    assert chinese["metadata"]["coach"]["revised"] and chinese["metadata"]["coach"]["non_english_removed"] == 0
    assert chinese["response"].endswith("这是答案。 Then it rains again， and the cycle repeats.")
    report = json.loads((tmp_path / "out" / "reports" / "coachlm_report.json").read_text())
    assert report["non_english_removed"] == {"pairs": 1, "characters": 6}
    # configurable: off, the characters stay
    revise(tmp_path, [{"type": "coach.revise", "remove_non_english": False}], rows[2:3], name="kept")
    (kept,) = read_jsonl(tmp_path / "kept" / "data.jsonl")
    assert "这是答案。" in kept["response"] and kept["metadata"]["coach"]["non_english_removed"] == 0


def test_remove_foreign_keeps_english_punctuation_symbols_and_greek() -> None:
    from datatailor.stages.coach.format import is_english, remove_foreign

    text = "Heat it to 100 °C — “boiling”, then α·β ≈ 2² €5 😀 café.\n这是答案。\nDone， Привет friend！"
    assert remove_foreign(text) == ("Heat it to 100 °C — “boiling”, then α·β ≈ 2² €5 😀 café.\nDone, friend!", 13)
    assert remove_foreign("  indented code\nunchanged") == ("indented code\nunchanged", 0)
    assert is_english("naïve café α 😀") and not is_english("Привет") and not is_english("١٢")


def vague(request: CompletionRequest) -> str:
    """A judge that never gives a number, in words that differ per pair (so no systematic-failure stop)."""
    v = request.variables
    if "HIGH" in v["instruction"]:
        return "Score: 5"
    return f"I would need to look at this pair more closely before rating it: {v['instruction'][:60]}"


VAGUE = {"backend": "scripted", "model": "vague", "handler": "tests.test_coach:vague"}


def test_a_rating_that_does_not_parse_loses_no_pair(tmp_path: Path) -> None:
    """examples/coachlm_prompted.yaml with a judge whose replies never hold a score (each reply different, so no
    systematic stop): every pair is still revised by the coach and comes out, unrated, and the report counts them."""
    recipe_data = yaml.safe_load((REPO / "examples" / "coachlm_prompted.yaml").read_text())
    recipe_data["models"] = {"coach": {**COACH, "max_tokens": 2048},
                             "judge": VAGUE}
    recipe_data["cache"] = False
    SEEN.clear()
    result = run_recipe_sync(parse_recipe(recipe_data, "coachlm_prompted", REPO / "examples"), tmp_path / "out", show_progress=False)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert (result.status, result.records, result.failures, len(data)) == ("complete", 12, 0, 12)
    assert len(SEEN) == 12  # the coach saw every pair: no rating says any of them is good
    for r in data:
        assert r["metadata"]["quality"] is None and r["metadata"]["quality_after"] is None
        assert r["metadata"]["coach"]["unrated"] and r["metadata"]["coach"]["kept_original"] != "rated_high"
        unrated = [e for e in r["lineage"] if e["decision"] == "unrated"]
        assert len(unrated) == 2 and all("did not parse" in e["reason"] for e in unrated)
    report = json.loads((tmp_path / "out" / "reports" / "coachlm_report.json").read_text())
    assert report["unrated"] == {"before": 12, "after": 12, "revised_without_rating": 12}
    assert report["pairs"] == 12 and report["quality_before"] is None
    assert "Unrated (the judge's rating did not parse; kept, not dropped): 12 before" in \
        (tmp_path / "out" / "reports" / "coachlm_report.md").read_text()
    # `unparsable: drop` is the other choice: then the pair is a parse_error failure, and the coach never sees it
    recipe_data["stages"][0]["unparsable"] = "drop"
    dropped = run_recipe_sync(parse_recipe(recipe_data, "coachlm_prompted", REPO / "examples"), tmp_path / "drop", show_progress=False)
    assert (dropped.status, dropped.records, dropped.failures) == ("complete", 0, 12)
    assert {row["kind"] for row in read_jsonl(tmp_path / "drop" / "failures.jsonl")} == {"parse_error"}


def test_a_rated_pair_and_an_unrated_one_at_the_gate(tmp_path: Path) -> None:
    rows = [{"instruction": f"{kw} task {i}: explain tides", "input": "", "output": "The moon pulls the oceans."}
            for i, kw in enumerate(["HIGH GOOD", "VAGUE GOOD"])]
    SEEN.clear()
    revise(tmp_path, [{"type": "quality.rate", "role": "judge"}, {"type": "coach.revise", "revise_below": 4.5}], rows, judge=VAGUE)
    high, vague = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert high["metadata"]["coach"]["kept_original"] == "rated_high" and not high["metadata"]["coach"]["unrated"]
    assert vague["metadata"]["coach"]["revised"] and vague["metadata"]["coach"]["unrated"] and len(SEEN) == 1


def rater(request: CompletionRequest) -> str:
    """Rates 3 a pair not yet revised (except those marked HIGH, rated 5) and 5 a revised one."""
    v = request.variables
    return "Score: 5" if "HIGH" in v["instruction"] or "Be specific" in v["instruction"] else "Score: 3"


def test_the_rating_gate_revises_only_low_rated_pairs_then_re_rates(tmp_path: Path) -> None:
    rows = [{"instruction": f"{kw} task {i}: explain tides", "input": "", "output": "The moon pulls the oceans."}
            for i, kw in enumerate(["GOOD", "HIGH GOOD", "GOOD", "HIGH GOOD"])]
    judge = {"backend": "scripted", "model": "rater", "handler": "tests.test_coach:rater"}
    # revise_below 5: the pairs rated exactly 5 are at the threshold, so they are left alone (below means below)
    stages = [{"type": "quality.rate", "role": "judge"}, {"type": "coach.revise", "revise_below": 5.0},
              {"type": "quality.rate", "name": "rate-after", "role": "judge", "key": "quality_after"}]
    SEEN.clear()
    revise(tmp_path, stages, rows, judge=judge)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert [r["metadata"]["coach"]["revised"] for r in data] == [True, False, True, False]
    assert [r["metadata"]["coach"]["kept_original"] for r in data] == [None, "rated_high", None, "rated_high"]
    assert len(SEEN) == 2  # the highly rated pairs were not sent to the coach
    report = json.loads((tmp_path / "out" / "reports" / "coachlm_report.json").read_text())
    assert report["quality_before"]["high_quality_share"] == 0.5 and report["quality_after"]["high_quality_share"] == 1.0
    # the gate needs a rating: without a quality.rate stage the recipe is refused
    from datatailor.errors import UserError

    with pytest.raises(UserError, match="needs `metadata.quality`"):
        revise(tmp_path, [{"type": "coach.revise", "revise_below": 4.5}], rows, name="no-rating")


def test_the_prompted_coach_shows_expert_revisions(tmp_path: Path) -> None:
    SEEN.clear()
    revise(tmp_path, [{"type": "coach.revise", "mode": "prompted", "shots": 2}], ROWS[:1])
    (request,) = SEEN
    assert request.template == "coach/prompted.j2" and len(request.variables["examples"]) == 2
    assert all(parse_pair(e["before"]) and parse_pair(e["after"]) for e in request.variables["examples"])
    assert request.variables["directive"] == directive()
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert data[0]["metadata"]["coach"]["mode"] == "prompted" and data[0]["metadata"]["coach"]["revised"]


def test_closeness_to_the_expert_revision_is_reported(tmp_path: Path) -> None:
    prepare("coachlm", tmp_path / "prep", holdout=5)
    heldout = tmp_path / "prep" / "heldout.jsonl"
    recipe = parse_recipe({"models": {"coach": COACH}, "input": str(heldout), "stages": [{"type": "coach.revise"}], "cache": False},
                          "t", tmp_path)
    run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    report = json.loads((tmp_path / "out" / "reports" / "coachlm_report.json").read_text())
    c = report["closeness_to_expert"]
    assert c["pairs"] == 5 and 0 < c["rouge_l"] <= 1 and 0 < c["edit_similarity_original"] <= 1


def test_closeness_is_measured_on_the_revised_pair(tmp_path: Path) -> None:
    """A coach that writes exactly the experts' revision: where its revision is used, the pair is the expert's (ROUGE-L
    and edit similarity 1), so the figures must rise above the unrevised pair's, to the means over the final rows."""
    from rapidfuzz.distance import Levenshtein

    from datatailor.scoring.text import rouge_l_text

    prepare("coachlm", tmp_path / "prep", holdout=8)
    held = read_jsonl(tmp_path / "prep" / "heldout.jsonl")
    for h in held:
        raw = serialize_pair(h["Raw Instruction"], h["Raw Input"], h["Raw Response"])
        EXPERT_REVISIONS[raw] = serialize_pair(h["Revised Instruction"], h["Revised Input"], h["Revised Response"])
    rows = [{**h, "Raw Instruction": "EXPERT " + h["Raw Instruction"]} for h in held]
    for h, row in zip(held, rows):  # the marked instruction must still map to the expert's revision
        EXPERT_REVISIONS[serialize_pair(row["Raw Instruction"], h["Raw Input"], h["Raw Response"])] = EXPERT_REVISIONS[
            serialize_pair(h["Raw Instruction"], h["Raw Input"], h["Raw Response"])]
    revise(tmp_path, [{"type": "coach.revise", "max_length_ratio": 100.0}], rows)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    revised = [r for r in data if r["metadata"]["coach"]["revised"]]
    assert len(revised) >= 6 and all(r["response"] == r["metadata"]["revised_response"].strip() for r in revised)
    c = json.loads((tmp_path / "out" / "reports" / "coachlm_report.json").read_text())["closeness_to_expert"]
    expected_rouge = sum(rouge_l_text(r["response"], r["metadata"]["revised_response"]) for r in data) / len(data)
    expert = ["\n".join(str(r["metadata"][k] or "") for k in ("revised_instruction", "revised_input", "revised_response")) for r in data]
    final = ["\n".join([r["instruction"], r["input"], r["response"]]) for r in data]
    expected_edit = sum(Levenshtein.normalized_similarity(f, e) for f, e in zip(final, expert)) / len(data)
    assert c["rouge_l"] == pytest.approx(expected_rouge, abs=1e-4) and c["edit_similarity"] == pytest.approx(expected_edit, abs=1e-4)
    assert c["rouge_l"] > c["rouge_l_original"] + 0.2 and c["edit_similarity"] > c["edit_similarity_original"] + 0.2


def test_coach_prepare_cli_defaults_to_the_largest_revisions_and_keeps_coachlms_distance(tmp_path: Path) -> None:
    from datatailor.cli import main

    assert main(["coach", "prepare", "--out", str(tmp_path), "--holdout", "100"]) == 0
    report = json.loads((tmp_path / "prepare.json").read_text())
    assert report["direction"] == "descending" and report["train_distance"]["min"] >= 401  # the top 30 %: Distance ≥ 401
    # heldout.jsonl: `Distance` is the source's own value, as stored; ours (over the repaired pair) is `Recomputed Distance`
    pairs = {(*p.before.fields().values(), *p.after.fields().values()): p for p in load_expert_pairs("coachlm")}
    differs = 0
    for h in read_jsonl(tmp_path / "heldout.jsonl"):
        p = pairs[h["Raw Instruction"], h["Raw Input"], h["Raw Response"], h["Revised Instruction"], h["Revised Input"], h["Revised Response"]]
        assert (h["Distance"], h["Recomputed Distance"]) == (p.stored_distance, p.distance)
        differs += p.distance != p.stored_distance
    assert differs >= 1  # on these rows the two differ, so the test tells them apart


def test_resume_after_kill_9_mid_revision(tmp_path: Path) -> None:
    rows = [{"instruction": f"GOOD task {i}: explain", "input": "", "output": "An answer."} for i in range(40)]
    recipe_path = tmp_path / "coach.yaml"
    recipe_path.write_text(yaml.safe_dump({"models": {"coach": {**COACH, "latency_s": 0.05}},
                                           "input": str(write_rows(tmp_path / "pairs.jsonl", rows)),
                                           "stages": [{"type": "coach.revise", "concurrency": 2}]}), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datatailor", "run", str(recipe_path), "--out", str(out), "--no-progress"]
    checkpoint = out / "stages" / "00-coach.revise" / "outputs.jsonl"
    kill_9_when(cmd, cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c1")), lambda: line_count(checkpoint) >= 8)
    done_before = len(read_jsonl(checkpoint))
    assert 8 <= done_before < 40
    resumed = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c2")), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "usage.json").read_text())["run"]["all"]["requests"] == 40 - done_before
    assert len(read_jsonl(out / "data.jsonl")) == 40
