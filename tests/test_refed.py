"""REFED on a scripted teacher: exact size, the reference draw, feedback once per drawn reference, the count of new
instructions, one bad reply costing one item, multi-turn references, the ablations' feedback calls, the filters'
keep rules, resume after kill -9, and the report.

The scripted teacher routes by template name and reads the variables it was rendered with:

* instruction feedback → {"subject_areas": "areas of <ref>", "relevant_skills": "skills of <ref>"};
* response feedback    → {"response_feedback": "feedback on <instruction>"};
* synthesis            → exactly n new instructions (a reference containing SHORT gives n − 2, one with EXTRA n + 3;
                         for a reference containing DROPODD, every odd-numbered one carries HALFJUDGE; for one
                         starting ROUGE70, the first is at ROUGE-L exactly 0.7 with it);
* respond              → "Draft answer to: <instruction>";
* improve              → {"analysis": …, "implementation_strategy": …, "improved_response": "Improved: <draft>"};
  for an instruction containing BADIMPROVE, text that is not JSON (every time).
* the judge prefers a response starting with "Improved" (8 vs 5) in both orders; for HALFJUDGE only when shown first.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.errors import RecordFailure
from datatailor.llm.base import CompletionRequest
from datatailor.recipe import parse_recipe
from datatailor.records import Record
from datatailor.runner import RunResult, run_recipe_sync
from datatailor.stages import StageContext
from datatailor.stages.refed import Improve, Instructions, at_least_one, clean_instructions, exactly, per_feature_counts
from datatailor.stages.refed.synthesis import ImproveConfig
from tests.conftest import cli_env
from tests.support import kill_9_when, line_count, read_jsonl

CALLS: list[CompletionRequest] = []


def teacher(request: CompletionRequest) -> str:
    CALLS.append(request)
    t, v = request.template, request.variables or {}
    if t == "refed/instruction_feedback.j2":
        ref = json.loads(v["pair"])["instruction"]
        return json.dumps({"subject_areas": f"areas of {ref}", "relevant_skills": f"skills of {ref}"})
    if t == "refed/response_feedback.j2":
        return json.dumps({"response_feedback": f"feedback on {json.loads(v['pair'])['instruction'][:40]}"})
    if t == "refed/synthesize.j2":
        ref, n = json.loads(v["reference_instruction"]), v["n"]
        count = n - 2 if "SHORT" in ref else n + 3 if "EXTRA" in ref else n
        tag = request.sampling.seed % 997
        bad = ["BADIMPROVE task"] if "BADREF" in ref and v["feature_name"] == "subject areas" else []
        if ref.startswith("ROUGE70"):  # one instruction at ROUGE-L exactly 0.7 with its 10-word reference
            return json.dumps({"instructions": ["ROUGE70 w1 w2 w3 w4 w5 w6 x7 x8 x9"] + [f"Other task {i} {tag}" for i in range(1, n)]})
        odd = "HALFJUDGE " if "DROPODD" in ref else ""
        items = bad + [f"{odd if i % 2 else ''}New task {i} ({v['feature_name']}, {tag}) inspired by {ref[:30]}"
                       for i in range(count - len(bad))]
        return json.dumps({"instructions": items})
    if t == "refed/respond.j2":
        return f"Draft answer to: {v['instruction']}"
    if t == "refed/improve.j2":
        instruction = json.loads(v["instruction"])
        if "BADIMPROVE" in instruction:
            return "I'd rather just chat about it."
        return json.dumps({
            "analysis": {"original_strengths": ["clear"], "improvement_opportunities": ["depth"], "relevant_feedback": ["add detail"]},
            "implementation_strategy": {"planned_changes": ["add an example"], "rationale": "deeper"},
            "improved_response": f"Improved: {json.loads(v['response'])} With an example.",
        })
    if t == "judge/pairwise_scores.j2":
        a, b = v["answer_1"], v["answer_2"]
        if "HALFJUDGE" in v["question"]:
            return "8 5" if a.startswith("Improved") else "5 5"  # improved wins shown first, ties shown second
        return f"{8 if a.startswith('Improved') else 5} {8 if b.startswith('Improved') else 5}"
    raise AssertionError(f"unexpected template {t!r}")


MODELS = {"teacher": {"backend": "scripted", "model": "teacher", "handler": "tests.test_refed:teacher"},
          "judge": {"backend": "scripted", "model": "judge", "handler": "tests.test_refed:teacher"}}

REFERENCES = [
    {"conversations": [f"How do I do thing {i} well?", f"A careful answer about thing {i}."]} for i in range(6)
] + [
    {"conversations": ["Multi question 1?", "Answer 1.", "Follow-up?", "Answer 2."]},
    {"instruction": "A pair without a response"},
]

FULL = [
    {"type": "refed.references", "pairs_per_reference": 6},
    {"type": "refed.feedback"},
    {"type": "refed.synthesize", "per_feature": 3},
    {"type": "refed.respond"},
    {"type": "refed.improve"},
    {"type": "select"},
]


def write_refs(tmp_path: Path, rows: list[dict[str, Any]] = REFERENCES) -> Path:
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path: Path, stages: list[dict[str, Any]], name: str = "out", rows: list[dict[str, Any]] = REFERENCES, **fields: Any) -> RunResult:
    recipe = parse_recipe({"models": MODELS, "input": str(write_refs(tmp_path, rows)), "stages": stages, "cache": False, **fields},
                          "test-refed", tmp_path)
    return run_recipe_sync(recipe, tmp_path / name, show_progress=False)


def ns(r: dict[str, Any]) -> dict[str, Any]:
    return r["metadata"]["refed"]


def stage_usage(tmp_path: Path, name: str = "out") -> dict[str, dict[str, Any]]:
    return json.loads((tmp_path / name / "usage.json").read_text())["total"]["stages"]


# ----------------------------------------------------------------------------- the pipeline


def test_full_refed_delivers_exactly_the_budget_with_evidence(tmp_path: Path) -> None:
    result = run(tmp_path, FULL, budget_pairs=10)
    assert result.status == "complete" and result.records == 10
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    for pair in data:
        d = ns(pair)
        assert pair["response"] == f"Improved: {d['draft']} With an example."  # the improved response is the target
        assert d["draft"] == f"Draft answer to: {pair['instruction']}"
        assert d["feature"] in ("subject_areas", "relevant_skills") and d["feature_text"].startswith(("areas of", "skills of"))
        assert d["analysis"]["relevant_feedback"] == ["add detail"] and d["strategy"]["rationale"] == "deeper"
        assert d["response_feedback"].startswith("feedback on") and d["feedback_applied"] == "reference"
        assert {e["stage"] for e in pair["lineage"]} >= {"refed.feedback", "refed.synthesize", "refed.respond", "refed.improve"}
        assert all("cost_usd" in e for e in pair["lineage"])
    # 10 pairs at 6 per reference: ceil(10 / 6) = 2 references drawn, the second asked for the 4 still needed.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    refs = next(s for s in manifest["stages"] if s["name"] == "refed.references")
    assert refs["outputs"] == 2 and refs["failure_kinds"] == {"multi_turn": 1, "no_response": 1}
    select = next(s for s in manifest["stages"] if s["name"] == "select")
    assert (select["inputs"], select["outputs"]) == (10, 10)
    # one call per step: 2 feedback per reference, 2 synthesis per reference, 1 draft + 1 improvement per pair
    usage = stage_usage(tmp_path)
    assert (usage["refed.feedback"]["requests"], usage["refed.synthesize"]["requests"]) == (4, 4)
    assert (usage["refed.respond"]["requests"], usage["refed.improve"]["requests"]) == (10, 10)


def test_references_are_drawn_without_replacement_and_reused_only_after_all(tmp_path: Path) -> None:
    run(tmp_path, [{"type": "refed.references", "count": 8}])
    drawn = read_jsonl(tmp_path / "out" / "data.jsonl")
    sources = [ns(r)["reference_id"] for r in drawn]
    assert len(set(sources[:6])) == 6  # the first pass uses each of the 6 references once
    assert [ns(r)["draw_pass"] for r in drawn] == [1] * 6 + [2] * 2
    assert set(sources[6:]) <= set(sources[:6]) and len({r["id"] for r in drawn}) == 8  # reused, with their own ids
    # the pool, as the report counts it: 8 rows, 2 rejected, 6 available, 8 draws of 6 distinct, none left undrawn
    report = json.loads((tmp_path / "out" / "reports" / "refed_report.json").read_text())
    assert {k: report["references"][k] for k in ("input_rows", "available", "drawn", "drawn_distinct", "not_drawn", "passes")} == {
        "input_rows": 8, "available": 6, "drawn": 8, "drawn_distinct": 6, "not_drawn": 0, "passes": 2}
    # each pass has its own seeded order: the second one is not the first one again
    run(tmp_path, [{"type": "refed.references", "count": 12}], name="two")
    twice = [ns(r)["reference_id"] for r in read_jsonl(tmp_path / "two" / "data.jsonl")]
    assert sorted(twice[:6]) == sorted(twice[6:]) and twice[:6] != twice[6:]
    # the order is the seed's: the same seed gives it again, another seed another one
    run(tmp_path, [{"type": "refed.references", "count": 8}], name="again")
    run(tmp_path, [{"type": "refed.references", "count": 8}], name="other", seed=1)
    assert [ns(r)["reference_id"] for r in read_jsonl(tmp_path / "again" / "data.jsonl")] == sources
    assert [ns(r)["reference_id"] for r in read_jsonl(tmp_path / "other" / "data.jsonl")] != sources


def test_multi_turn_rows_are_not_references(tmp_path: Path) -> None:
    run(tmp_path, [{"type": "refed.references", "count": 2}])
    failures = {f["kind"]: f for f in read_jsonl(tmp_path / "out" / "failures.jsonl")}
    assert set(failures) == {"multi_turn", "no_response"}
    assert "4 turns" in failures["multi_turn"]["message"] and "single-turn" in failures["multi_turn"]["message"]


def test_feedback_is_collected_once_per_drawn_reference_only(tmp_path: Path) -> None:
    CALLS.clear()
    stages = [{"type": "refed.references", "count": 8}, {"type": "refed.feedback"}]
    run(tmp_path, stages)
    drawn = read_jsonl(tmp_path / "out" / "data.jsonl")
    asked = Counter(json.loads(c.variables["pair"])["instruction"] for c in CALLS)
    assert set(asked) == {ns(r)["reference_instruction"] for r in drawn}  # 6 distinct references drawn
    assert all(count == 2 for count in asked.values())  # instruction + response feedback, once each
    # the two references drawn again in pass 2 reuse their feedback: no call, no tokens counted twice
    assert stage_usage(tmp_path)["refed.feedback"]["requests"] == 12
    reused = [r for r in drawn if ns(r)["draw_pass"] == 2]
    assert all(ns(r)["subject_areas"] and e["details"].get("shared_call") for r in reused for e in r["lineage"] if e["stage"] == "refed.feedback")
    shared = read_jsonl(tmp_path / "out" / "stages" / "01-refed.feedback" / "shared_calls.jsonl")
    assert len(shared) == 12  # checkpointed as collected


def test_an_undrawn_reference_gets_no_feedback(tmp_path: Path) -> None:
    CALLS.clear()
    run(tmp_path, [{"type": "refed.references", "count": 2}, {"type": "refed.feedback"}])
    assert len({json.loads(c.variables["pair"])["instruction"] for c in CALLS}) == 2


def test_the_count_of_new_instructions_is_enforced(tmp_path: Path) -> None:
    rows = [{"instruction": "EXTRA reference task", "output": "answer"}, {"instruction": "SHORT reference task", "output": "answer"}]
    stages = [{"type": "refed.references", "count": 2}, {"type": "refed.feedback"},
              {"type": "refed.synthesize", "per_feature": 5, "features": ["subject_areas"]}]
    run(tmp_path, stages, rows=rows)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    per_ref = Counter(ns(r)["reference_instruction"] for r in data)
    assert per_ref == {"EXTRA reference task": 5, "SHORT reference task": 3}  # 8 cut to 5; 3 after the re-asks
    short = next(r for r in data if ns(r)["reference_instruction"].startswith("SHORT"))
    event = next(e for e in short["lineage"] if e["stage"] == "refed.synthesize")
    assert (event["details"]["requested"], event["details"]["returned"]) == (5, 3)
    assert stage_usage(tmp_path)["refed.synthesize"]["requests"] == 1 + 3  # EXTRA once; SHORT asked and re-asked twice
    obj = Instructions(instructions=["A", "a!", " ", "B", "Ref", 3, {"text": "C"}])
    assert clean_instructions(obj.instructions, "ref") == ["A", "B"]
    assert exactly(Instructions(instructions=["x1", "x2", "x3"]), 2, "r") == ["x1", "x2"]
    with pytest.raises(ValueError, match="1 new, distinct instructions in the list; 2 were asked for"):
        exactly(Instructions(instructions=["x1", "x1"]), 2, "r")
    with pytest.raises(ValueError):
        at_least_one(Instructions(instructions=["r"]), "r")


def test_the_draft_is_asked_with_the_reference_pair_as_the_worked_example(tmp_path: Path) -> None:
    CALLS.clear()
    run(tmp_path, FULL, budget_pairs=6)
    drafts = [c for c in CALLS if c.template == "refed/respond.j2"]
    data = {r["instruction"]: ns(r) for r in read_jsonl(tmp_path / "out" / "data.jsonl")}
    assert len(drafts) == 6
    for call in drafts:
        system, shot_user, shot_assistant, user = call.messages
        d = data[user.content]
        assert (system.role, shot_user.role, shot_assistant.role, user.role) == ("system", "user", "assistant", "user")
        assert (shot_user.content, shot_assistant.content) == (d["reference_instruction"], d["reference_response"])
        assert shot_assistant.content.startswith("A careful answer about thing")


def test_improve_applies_the_reference_feedback_or_in_the_ablation_the_pairs_own(tmp_path: Path) -> None:
    """REFED improves each draft with its reference's response feedback; the sample-level ablation with the feedback
    collected on that pair itself. A pair with no feedback to apply fails rather than being "improved" by nothing."""
    for name in ("refed", "sample_feedback"):
        CALLS.clear()
        run(tmp_path, VARIANTS[name], name=name, budget_pairs=5)
        improve = [c for c in CALLS if c.template == "refed/improve.j2"]
        assert len(improve) == 5
        for call in improve:
            instruction, feedback = json.loads(call.variables["instruction"]), json.loads(call.variables["feedback"])
            about = instruction if name == "sample_feedback" else instruction.split("inspired by ")[1]
            assert feedback == f"feedback on {about[:40]}", (name, instruction, feedback)


def test_improve_refuses_a_pair_without_the_feedback_it_applies(tmp_path: Path) -> None:
    """The contract keeps a recipe from improving without feedback; should a pair still reach refed.improve without
    it, the pair fails (and a stage whose pairs all fail stops the run) instead of being "improved" by nothing."""
    run(tmp_path, VARIANTS["instruction_feedback"], budget_pairs=1)  # a draft, instruction feedback only
    draft = Record.model_validate(read_jsonl(tmp_path / "out" / "data.jsonl")[0])
    ctx = StageContext(models=None, stage_name="refed.improve", seed=0, artifacts_dir=tmp_path, base_dir=tmp_path)  # type: ignore[arg-type]
    for feedback in ("reference", "sample"):
        with pytest.raises(RecordFailure, match=f"no {feedback}-level response feedback"):
            asyncio.run(Improve(ImproveConfig(feedback=feedback), ctx).process(draft))


def test_one_unparsable_improvement_loses_one_item(tmp_path: Path) -> None:
    rows = [{"instruction": "BADREF reference task", "output": "answer"}]
    stages = [s for s in FULL if s["type"] != "select"]
    stages[0] = {"type": "refed.references", "count": 1}
    run(tmp_path, stages, rows=rows, systematic_failures=0)
    failures = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert [(f["stage"], f["kind"]) for f in failures] == [("refed.improve", "parse_error")]
    assert failures[0]["record"]["instruction"] == "BADIMPROVE task"
    assert len(read_jsonl(tmp_path / "out" / "data.jsonl")) == 5  # the other 5 of the 6 pairs


# ----------------------------------------------------------------------------- what the budget needs


def test_per_feature_counts_spread_a_reference_quota_over_the_features() -> None:
    assert per_feature_counts(2, 10, None) == [10, 10] and per_feature_counts(2, 10, 25) == [10, 10]
    assert per_feature_counts(2, 10, 20) == [10, 10] and per_feature_counts(2, 10, 19) == [10, 9]
    assert per_feature_counts(2, 10, 4) == [2, 2] and per_feature_counts(2, 10, 5) == [3, 2]
    assert per_feature_counts(2, 10, 1) == [1, 0] and per_feature_counts(1, 10, 7) == [7]


def test_a_budget_not_a_multiple_of_20_pays_only_for_the_pairs_it_needs(tmp_path: Path) -> None:
    """Budget 24 at the paper's 20 pairs per reference: the second reference is asked for the 4 pairs still needed
    (2 per feature), so nothing is drafted or improved only to be trimmed: 56 calls, 2.33 per pair (was 88: 3.67)."""
    stages = [{"type": t} for t in ("refed.references", "refed.feedback", "refed.synthesize", "refed.respond", "refed.improve", "select")]
    for budget, asked in ((24, [10, 10, 2, 2]), (21, [10, 10, 1])):
        CALLS.clear()
        result = run(tmp_path, stages, name=f"b{budget}", budget_pairs=budget)
        assert result.status == "complete" and result.records == budget
        assert sorted((r.variables["n"] for r in CALLS if r.template == "refed/synthesize.j2"), reverse=True) == asked
        usage = stage_usage(tmp_path, f"b{budget}")
        assert {s: u["requests"] for s, u in usage.items()} == {
            "refed.feedback": 4, "refed.synthesize": len(asked), "refed.respond": budget, "refed.improve": budget}
        manifest = json.loads((tmp_path / f"b{budget}" / "manifest.json").read_text())
        assert next(s for s in manifest["stages"] if s["name"] == "select")["failures"] == 0  # nothing made to be trimmed
        refs = read_jsonl(tmp_path / f"b{budget}" / "stages" / "00-refed.references" / "records.jsonl")
        assert [ns(r)["quota"] for r in refs] == [20, budget - 20]
    report = json.loads((tmp_path / "b24" / "reports" / "refed_report.json").read_text())
    assert report["cost"]["requests"] == 56 and report["cost"]["requests_per_kept_pair"] == round(56 / 24, 6)


# ----------------------------------------------------------------------------- top-up wherever the filters stand


DROPODD = [{"instruction": f"DROPODD reference task {i}", "output": f"answer {i}"} for i in range(6)]
JUDGE = {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft", "rule": "strict", "keep": "a"}
MAKE = [s for s in FULL if s["type"] != "select"]


def test_top_up_delivers_the_budget_with_the_judge_filter_before_or_after_select(tmp_path: Path) -> None:
    """A third of each reference's pairs lose to their draft. With `select` last or first, the run tops up by one
    reference for the 4 missing pairs and delivers exactly 12, with the same data and the same calls: a `select`
    standing before the filter runs after it once the run is short, instead of trimming the larger set to 12
    again before the filter (which drafted, improved and judged pair after pair, and never got past 8)."""
    runs = {"last": [*MAKE, JUDGE, {"type": "select"}], "first": [*MAKE, {"type": "select"}, JUDGE]}
    for name, stages in runs.items():
        result = run(tmp_path, stages, name=name, rows=DROPODD, budget_pairs=12)
        assert (result.status, result.records) == ("complete", 12), (name, result.message)
    assert (tmp_path / "first" / "data.jsonl").read_bytes() == (tmp_path / "last" / "data.jsonl").read_bytes()
    usage = {name: {s: u["requests"] for s, u in stage_usage(tmp_path, name).items()} for name in runs}
    # 2 references (12 pairs, 8 kept), then 1 more for the 4 missing: 18 pairs drafted, improved and judged once each
    assert usage["first"] == usage["last"] == {"refed.feedback": 6, "refed.synthesize": 6, "refed.respond": 18,
                                               "refed.improve": 18, "judge.pairwise": 36}
    manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
    assert manifest["rounds"] == 2
    select = next(s for s in manifest["stages"] if s["name"] == "select")
    assert "ran after them" in select["ran_last"] and (select["inputs"], select["outputs"]) == (12, 12)
    # each finished run, run again (no request cache): it goes on from its last round and order, so no call is made
    # (replaying round 1 used to drop the judge's failure rows of round 2, and judged those pairs again)
    for name, stages in runs.items():
        data = (tmp_path / name / "data.jsonl").read_bytes()
        assert run(tmp_path, stages, name=name, rows=DROPODD, budget_pairs=12).status == "complete"
        assert json.loads((tmp_path / name / "usage.json").read_text())["run"]["all"]["requests"] == 0, name
        assert (tmp_path / name / "data.jsonl").read_bytes() == data


def test_a_trim_that_left_pairs_out_passes_them_to_the_filter_before_any_top_up(tmp_path: Path) -> None:
    """3 references make 18 pairs; select trims them to 12 and the judge keeps 8. The 6 trimmed pairs go through
    the judge next (6 more judged, 12 kept): no reference is drawn and nothing is drafted again."""
    stages = [{"type": "refed.references", "count": 3}, *MAKE[1:], {"type": "select"}, JUDGE]
    result = run(tmp_path, stages, rows=DROPODD, budget_pairs=12)
    assert (result.status, result.records) == ("complete", 12)
    assert {s: u["requests"] for s, u in stage_usage(tmp_path).items()} == {
        "refed.feedback": 6, "refed.synthesize": 6, "refed.respond": 18, "refed.improve": 18, "judge.pairwise": 36}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rounds"] == 1 and manifest["stages"][0]["outputs"] == 3


def test_a_shortfall_names_the_filter_that_dropped_the_pairs_not_select(tmp_path: Path) -> None:
    rows = [{"instruction": f"HALFJUDGE reference task {i}", "output": "a"} for i in range(6)]  # every pair loses
    stages = [dict(MAKE[0], top_up_rounds=1), *MAKE[1:], {"type": "select"}, JUDGE]
    result = run(tmp_path, stages, rows=rows, budget_pairs=6)
    assert result.status == "shortfall" and result.records == 0
    # round 1: 1 reference, 6 pairs; round 2: nothing kept yet, so one reference per missing pair (36 pairs)
    assert result.shortfall["stage"] == "judge.pairwise"
    assert result.message == ("the run delivered 0 of budget_pairs=6 pairs: judge.pairwise dropped 42 of 42 (judge_filter 42), "
                              "after 1 extra round(s) of refed.references")


def test_the_report_counts_instructions_at_rouge_l_0_7_and_states_the_papers_calls(tmp_path: Path) -> None:
    rows = [{"instruction": "ROUGE70 w1 w2 w3 w4 w5 w6 w7 w8 w9", "output": "a"}]
    stages = [{"type": "refed.references", "count": 1}, {"type": "refed.feedback"},
              {"type": "refed.synthesize", "per_feature": 3, "features": ["subject_areas"]}, {"type": "refed.respond"}, {"type": "refed.improve"}]
    run(tmp_path, stages, rows=rows)
    report = json.loads((tmp_path / "out" / "reports" / "refed_report.json").read_text())
    # "ROUGE70 w1 … w6 x7 x8 x9" shares 7 of its reference's 10 words in order: ROUGE-L exactly 0.7, counted
    assert report["diversity"]["instructions"] == 3 and report["diversity"]["rouge_l_to_reference_at_least_0.7"] == 1
    # the paper's pipeline per 20 pairs: 2 feedback + 2 synthesis + 20 drafts + 20 improvements = 44 calls
    assert report["cost"]["paper_calls_per_pair"] == 2.2
    assert "(the paper's pipeline: 2.2 calls per pair" in (tmp_path / "out" / "reports" / "refed_report.md").read_text()


# ----------------------------------------------------------------------------- the ablations


VARIANTS = {
    "no_synthesis": [{"type": "refed.references", "pairs_per_reference": 1}, {"type": "select"}],
    "instruction_feedback": [
        {"type": "refed.references", "pairs_per_reference": 6}, {"type": "refed.feedback", "collect": ["instruction"]},
        {"type": "refed.synthesize", "per_feature": 3}, {"type": "refed.respond"}, {"type": "select"},
    ],
    "sample_feedback": [
        {"type": "refed.references", "pairs_per_reference": 6}, {"type": "refed.feedback", "collect": ["instruction"]},
        {"type": "refed.synthesize", "per_feature": 3}, {"type": "refed.respond"}, {"type": "refed.sample_feedback"},
        {"type": "refed.improve", "feedback": "sample"}, {"type": "select"},
    ],
    "refed": FULL,
}


def test_each_variant_delivers_the_same_size_with_its_own_feedback_calls(tmp_path: Path) -> None:
    feedback: dict[str, int] = {}
    for name, stages in VARIANTS.items():
        result = run(tmp_path, stages, name=name, budget_pairs=5)
        assert result.records == 5, name
        usage = stage_usage(tmp_path, name)
        feedback[name] = sum(u["requests"] for s, u in usage.items() if s in ("refed.feedback", "refed.sample_feedback"))
        report = json.loads((tmp_path / name / "reports" / "refed_report.json").read_text())
        assert report["cost"]["feedback_calls"] == feedback[name] and report["kept_pairs"] == 5
        # drafted is not improved: the ablations without refed.improve report no improved pair
        assert report["improvement"]["improved_pairs"] == (5 if name in ("refed", "sample_feedback") else 0), name
    # 1 reference asked for the 5 pairs of the budget; sample-level feedback is one call per generated pair (5)
    # instead of one per reference
    assert feedback == {"no_synthesis": 0, "instruction_feedback": 1, "sample_feedback": 1 + 5, "refed": 2}
    data = read_jsonl(tmp_path / "sample_feedback" / "data.jsonl")
    assert all(ns(r)["feedback_applied"] == "sample" and ns(r)["sample_feedback"] for r in data)
    plain = read_jsonl(tmp_path / "instruction_feedback" / "data.jsonl")
    assert all(r["response"].startswith("Draft answer") and ns(r)["analysis"] is None for r in plain)


def test_improve_with_sample_feedback_needs_the_sample_feedback_stage(tmp_path: Path) -> None:
    from datatailor.errors import UserError

    stages = [s for s in VARIANTS["sample_feedback"] if s["type"] != "refed.sample_feedback"]
    with pytest.raises(UserError, match=r"refed.improve\) needs sample-level response feedback"):
        run(tmp_path, stages, budget_pairs=5)


# ----------------------------------------------------------------------------- filters


def test_judge_filter_keeps_a_pair_only_when_the_improved_response_wins_both_orders(tmp_path: Path) -> None:
    rows = [{"instruction": "Plain task", "output": "a"}, {"instruction": "HALFJUDGE task", "output": "a"}]
    stages = [s for s in FULL if s["type"] != "select"]
    stages[0] = {"type": "refed.references", "count": 2}
    stages[2] = {"type": "refed.synthesize", "per_feature": 1, "features": ["subject_areas"]}
    judge = {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft", "rule": "strict", "keep": "a"}
    run(tmp_path, [*stages, judge], rows=rows)
    kept = read_jsonl(tmp_path / "out" / "data.jsonl")
    dropped = [f for f in read_jsonl(tmp_path / "out" / "failures.jsonl") if f["kind"] == "judge_filter"]
    assert [ns(r)["reference_instruction"] for r in kept] == ["Plain task"]
    # wins when shown first, ties when shown second: the lenient rule would keep it, the strict rule does not
    assert [ns(f["record"])["reference_instruction"] for f in dropped] == ["HALFJUDGE task"]
    assert dropped[0]["record"]["metadata"]["judge"]["a_first"] == [8.0, 5.0]
    assert kept[0]["metadata"]["judge"]["verdict"] == "a"
    report = json.loads((tmp_path / "out" / "reports" / "refed_report.json").read_text())
    assert (report["judge"]["judged"], report["judge"]["prefers_improved"], report["judge"]["ties"]) == (2, 1, 1)
    assert report["judge"]["position_consistency"] == 0.5


def test_rouge_filter_keeps_only_novel_instructions(tmp_path: Path) -> None:
    base = [f"w{i}" for i in range(10)]
    rows = [{"instruction": " ".join(base)}, {"instruction": " ".join(base[:7] + ["x7", "x8", "x9"])},  # ROUGE-L 0.70
            {"instruction": " ".join(base[:7] + ["y7", "y8", "y9", "y10"])}, {"instruction": "something else entirely"}]
    path = write_refs(tmp_path, rows)
    recipe = parse_recipe({"models": {}, "input": str(path), "stages": [{"type": "filter.rouge", "order": "input"}]}, "t", tmp_path)
    run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    kept = [r["instruction"] for r in read_jsonl(tmp_path / "out" / "data.jsonl")]
    assert kept == [rows[0]["instruction"], rows[2]["instruction"], rows[3]["instruction"]]
    (dropped,) = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert dropped["kind"] == "too_similar" and "0.700" in dropped["message"]


def test_random_subset_is_the_seeds(tmp_path: Path) -> None:
    rows = [{"instruction": f"Task number {i}", "output": "a"} for i in range(12)]
    picks = []
    for seed in (0, 0, 1):
        name = f"s{len(picks)}"
        recipe = parse_recipe({"models": {}, "input": str(write_refs(tmp_path, rows)), "budget_pairs": 4, "seed": seed,
                               "stages": [{"type": "select", "strategy": "random"}]}, "t", tmp_path)
        run_recipe_sync(recipe, tmp_path / name, show_progress=False)
        picks.append([r["instruction"] for r in read_jsonl(tmp_path / name / "data.jsonl")])
    assert len(picks[0]) == 4 and picks[0] == picks[1] and picks[0] != picks[2]


# ----------------------------------------------------------------------------- resume


def test_resume_after_kill_9_during_synthesis(tmp_path: Path) -> None:
    refs = write_refs(tmp_path, [{"instruction": f"Reference task {i}", "output": "a"} for i in range(6)])
    recipe_path = tmp_path / "refed.yaml"
    slow = {**MODELS["teacher"], "latency_s": 0.05}
    recipe_path.write_text(yaml.safe_dump({"models": {"teacher": slow}, "input": str(refs), "budget_pairs": 36,
                                           "stages": [dict(s, concurrency=2) for s in FULL]}), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datatailor", "run", str(recipe_path), "--out", str(out), "--no-progress"]
    checkpoint = out / "stages" / "03-refed.respond" / "outputs.jsonl"
    kill_9_when(cmd, cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c1")), lambda: line_count(checkpoint) >= 6)
    assert not (out / "data.jsonl").exists(), "the process should be killed part-way"
    calls_done = calls_in_checkpoints(out)
    done = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c2")), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    clean = tmp_path / "clean"
    subprocess.run(cmd[:-3] + ["--out", str(clean), "--no-progress"], env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c3")),
                   check=True, capture_output=True, timeout=120)
    assert (out / "data.jsonl").read_bytes() == (clean / "data.jsonl").read_bytes()
    resumed = json.loads((out / "usage.json").read_text())["run"]["all"]["requests"]
    clean_total = json.loads((clean / "usage.json").read_text())["total"]["all"]["requests"]
    # What was checkpointed is not asked again; at most the calls in flight at the kill are (2 records at a time,
    # 2 calls each at most).
    assert clean_total - calls_done <= resumed <= clean_total - calls_done + 4


def calls_in_checkpoints(out: Path) -> int:
    """Model calls whose results a killed run had checkpointed: shared feedback calls, and one call per event of
    the synthesis, draft and improvement stages in the checkpointed records."""
    calls = sum(len(read_jsonl(p)) for p in out.glob("stages/*/shared_calls.jsonl"))
    for stage in ("02-refed.synthesize", "03-refed.respond", "04-refed.improve"):
        path = out / "stages" / stage / "outputs.jsonl"
        if path.exists():
            for row in read_jsonl(path):
                if stage.endswith("synthesize"):
                    calls += len({r["metadata"]["refed"]["feature"] for r in row["records"]})
                else:
                    calls += len(row["records"])
    return calls


def test_defaults_follow_the_papers_code(tmp_path: Path) -> None:
    """With no settings but the budget: every teacher call samples at 1.0 whatever the model's own temperature, and
    each synthesis call asks for 10 new instructions (20 pairs per reference over the two features)."""
    CALLS.clear()
    models = {role: {**cfg, "temperature": 0.2} for role, cfg in MODELS.items()}
    recipe = parse_recipe({"models": models, "input": str(write_refs(tmp_path, REFERENCES[:1])), "budget_pairs": 20, "cache": False,
                           "stages": [{"type": t} for t in ("refed.references", "refed.feedback", "refed.synthesize",
                                                             "refed.respond", "refed.improve", "select")]}, "t", tmp_path)
    assert run_recipe_sync(recipe, tmp_path / "out", show_progress=False).status == "complete"
    temps: dict[str, set[float | None]] = {}
    for request in CALLS:
        temps.setdefault(request.template, set()).add(request.sampling.temperature)
    assert temps == {t: {1.0} for t in ("refed/instruction_feedback.j2", "refed/response_feedback.j2", "refed/synthesize.j2",
                                          "refed/respond.j2", "refed/improve.j2")}
    assert [r.variables["n"] for r in CALLS if r.template == "refed/synthesize.j2"] == [10, 10]
    assert len(read_jsonl(tmp_path / "out" / "data.jsonl")) == 20
