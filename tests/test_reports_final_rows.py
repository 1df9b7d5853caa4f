"""Method reports are computed from the final rows: data.jsonl, failures.jsonl and each stage's final records
(records.jsonl), never from a stage's journal (outputs.jsonl), which still holds what earlier rounds made.

Each run below has a top-up round in which `filter.rouge` (seeded random order over a larger set) drops a pair it
had kept in an earlier round, after the next stage had already judged it: that stage's journal then holds pairs
that are not among its final inputs. Each test first checks that this happened, then compares every figure of
the report with what it recomputes from the final files.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from datatailor.llm.base import CompletionRequest
from datatailor.recipe import parse_recipe
from datatailor.report.compare import collect_run
from datatailor.runner import run_recipe_sync
from tests.support import read_jsonl

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec romeo sierra tango".split()


def teacher(request: CompletionRequest) -> str:
    """REFED's teacher and judge. Every reference's first subject-area instruction is the same poem request (so
    filter.rouge keeps one of them, which one depending on the set it sees); the others are seeded word lists, and
    every odd-numbered one carries LOSES, which makes the judge prefer its draft."""
    t, v = request.template, request.variables or {}
    if t == "refed/instruction_feedback.j2":
        ref = json.loads(v["pair"])["instruction"]
        return json.dumps({"subject_areas": f"areas of {ref}", "relevant_skills": f"skills of {ref}"})
    if t == "refed/response_feedback.j2":
        return json.dumps({"response_feedback": "be concrete"})
    if t == "refed/synthesize.j2":
        items = []
        for i in range(v["n"]):
            if i == 0 and v["feature_name"] == "subject areas":
                items.append("Write a short poem about the sea")
                continue
            h = int(hashlib.sha256(f"{request.sampling.seed}|{i}|{v['feature_name']}".encode()).hexdigest(), 16)
            words = " ".join(WORDS[(h >> (5 * k)) % len(WORDS)] for k in range(6))
            items.append(("LOSES " if i % 2 else "") + f"Tell me about {words}")
        return json.dumps({"instructions": items})
    if t == "refed/respond.j2":
        return f"Draft answer to: {v['instruction']}"
    if t == "refed/improve.j2":
        return json.dumps({"analysis": {"original_strengths": [], "improvement_opportunities": [], "relevant_feedback": []},
                           "implementation_strategy": {"planned_changes": [], "rationale": ""},
                           "improved_response": "Improved: " + json.loads(v["response"]) + " And more."})
    if t == "judge/pairwise_scores.j2":
        def score(answer: str) -> int:
            return (3 if "LOSES" in v["question"] else 8) if answer.startswith("Improved") else 5
        return f"{score(v['answer_1'])} {score(v['answer_2'])}"
    raise AssertionError(f"unexpected template {t!r}")


def journal_only(out: Path, stage: str, before: str) -> set[str]:
    """Ids in `stage`'s journal that are not among its final inputs (the records.jsonl of the stage `before` it)."""
    journal = {row["src"] for row in read_jsonl(out / "stages" / stage / "outputs.jsonl")}
    return journal - {r["id"] for r in read_jsonl(out / "stages" / before / "records.jsonl")}


def mean1(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


# ----------------------------------------------------------------------------- REFED


def refed_run(tmp_path: Path) -> Path:
    rows = [{"instruction": f"Reference task number {i}", "output": f"answer {i}"} for i in range(8)]
    rows.append({"conversations": ["A question?", "An answer.", "A follow-up?", "Another answer."]})
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = {"backend": "scripted", "model": "teacher", "handler": "tests.test_reports_final_rows:teacher"}
    stages = [{"type": "refed.references", "pairs_per_reference": 6}, {"type": "refed.feedback"},
              {"type": "refed.synthesize", "per_feature": 3}, {"type": "refed.respond"}, {"type": "refed.improve"},
              {"type": "filter.rouge"},
              {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft", "rule": "strict", "keep": "a"},
              {"type": "select"}]
    recipe = parse_recipe({"models": {"teacher": model, "judge": model}, "input": str(tmp_path / "refs.jsonl"), "budget_pairs": 8,
                           "seed": 1, "stages": stages, "cache": False}, "t", tmp_path)
    result = run_recipe_sync(recipe, tmp_path / "refed", show_progress=False)
    assert (result.status, result.records) == ("complete", 8)
    return tmp_path / "refed"


def test_the_refed_report_counts_the_final_rows_not_the_judges_journal(tmp_path: Path) -> None:
    out = refed_run(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rounds"] > 1
    stale = journal_only(out, "06-judge.pairwise", "05-filter.rouge")
    assert stale, "the judge's journal should hold pairs filter.rouge dropped in a later round"

    report = json.loads((out / "reports" / "refed_report.json").read_text())
    data, failures = read_jsonl(out / "data.jsonl"), read_jsonl(out / "failures.jsonl")
    ns = [r["metadata"]["refed"] for r in data]
    assert report["kept_pairs"] == len(data) == 8

    # the judge: what it kept in its last pass (its records.jsonl) and what it dropped (failures.jsonl)
    judged = read_jsonl(out / "stages" / "06-judge.pairwise" / "records.jsonl") + [
        f["record"] for f in failures if f["stage"] == "judge.pairwise" and f["kind"] == "judge_filter"]
    verdicts = Counter(r["metadata"]["judge"]["verdict"] for r in judged)
    consistent = sum(1 for r in judged if r["metadata"]["judge"]["position_consistent"])
    assert report["judge"] == {
        "stage": "judge.pairwise", "judged": len(judged), "prefers_improved": verdicts["a"], "prefers_draft": verdicts["b"],
        "ties": verdicts["tie"], "prefers_improved_share": round(verdicts["a"] / len(judged), 6),
        "position_consistency": round(consistent / len(judged), 6)}
    journal_judged = len(read_jsonl(out / "stages" / "06-judge.pairwise" / "outputs.jsonl")) + sum(
        1 for f in failures if f["stage"] == "judge.pairwise")
    assert journal_judged == len(judged) + len(stale)  # what reading the journal would have counted

    # the reference pool: 9 input rows, 1 multi-turn, 8 available; those drawn are the references stage's final records
    references = read_jsonl(out / "stages" / "00-refed.references" / "records.jsonl")
    distinct = {r["metadata"]["refed"]["reference_id"] for r in references}
    per_reference = Counter(d["reference_id"] for d in ns)
    assert report["references"] == {
        "input_rows": 9, "rejected": {"multi_turn": 1}, "available": 8, "drawn": len(references),
        "drawn_distinct": len(distinct), "not_drawn": 8 - len(distinct), "passes": 1, "yielding_kept_pairs": len(per_reference)}
    assert report["pairs_per_reference"] == {
        "mean": round(statistics.fmean(per_reference.values()), 3), "min": min(per_reference.values()),
        "max": max(per_reference.values()), "histogram": {str(k): v for k, v in sorted(Counter(per_reference.values()).items())}}

    # what the improvement did, over the delivered pairs
    improved = [r for r in data if r["metadata"]["refed"]["analysis"] is not None]
    assert report["improvement"] == {
        "improved_pairs": len(improved),
        "draft_words_mean": mean1([len(r["metadata"]["refed"]["draft"].split()) for r in improved]),
        "improved_words_mean": mean1([len(r["response"].split()) for r in improved])}
    assert report["diversity"]["instructions"] == len(data)

    # the money is what was spent, earlier rounds included
    usage = json.loads((out / "usage.json").read_text())["total"]
    assert report["cost"]["requests"] == usage["all"]["requests"]
    assert report["cost"]["requests_per_kept_pair"] == round(usage["all"]["requests"] / len(data), 6)
    assert report["cost"]["feedback_calls"] == usage["stages"]["refed.feedback"]["requests"]
    markdown = (out / "reports" / "refed_report.md").read_text()
    assert f"prefers the improved response in {verdicts['a']} of {len(judged)}" in markdown
    assert f"drawn {len(references)} ({len(distinct)} distinct, 1 pass(es) over the pool); not drawn {8 - len(distinct)}" in markdown


def test_compare_reads_the_final_rows_of_a_run_with_a_top_up_round(tmp_path: Path) -> None:
    out = refed_run(tmp_path)
    summary = collect_run(out, "refed", None, [])
    usage = json.loads((out / "usage.json").read_text())["total"]["all"]
    assert summary.size == len(read_jsonl(out / "data.jsonl")) == 8
    assert (summary.requests, summary.per_pair(summary.requests)) == (usage["requests"], usage["requests"] / 8)
    assert summary.diversity is not None and summary.diversity.n == 8


# ----------------------------------------------------------------------------- CodecLM


def test_the_codec_report_counts_the_final_rows_not_the_contrastive_journal(tmp_path: Path) -> None:
    from tests.test_codec import MODELS, SEEDS, seed_rows

    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seed_rows(SEEDS)), encoding="utf-8")
    stages = [{"type": "codec.encode"}, {"type": "codec.augment", "pool_size": 4}, {"type": "codec.rubrics"}, {"type": "codec.decode"},
              {"type": "filter.rouge"}, {"type": "codec.contrastive"}, {"type": "codec.select"}]
    recipe = parse_recipe({"models": MODELS, "input": str(tmp_path / "seeds.jsonl"), "stages": stages, "budget_pairs": 8,
                           "cache": False}, "t", tmp_path)
    run_recipe_sync(recipe, tmp_path / "codec", show_progress=False)
    out = tmp_path / "codec"
    assert json.loads((out / "manifest.json").read_text())["rounds"] > 1
    stale = journal_only(out, "05-codec.contrastive", "04-filter.rouge")
    assert stale, "the contrastive stage's journal should hold pairs filter.rouge dropped in a later round"

    report = json.loads((out / "stages" / "05-codec.contrastive" / "codec_report.json").read_text())
    kept = read_jsonl(out / "stages" / "05-codec.contrastive" / "records.jsonl")
    dropped = [f for f in read_jsonl(out / "failures.jsonl") if f["stage"] == "codec.contrastive"]
    result = [r["metadata"]["codec"]["contrastive"] for r in kept]
    passed = [c for c in result if not c.get("below_threshold")]
    histories = [c["history"] for c in result] + [f["record"]["metadata"]["codec"]["contrastive"]["history"] for f in dropped]
    assert (report["instructions"], report["kept"]) == (len(kept) + len(dropped), len(kept))
    assert report["dropped"] == dict(sorted(Counter(f["kind"] for f in dropped).items()))
    assert (report["kept_strong"], report["kept_target"]) == (sum(c["kept"] == "strong" for c in passed), sum(c["kept"] == "target" for c in passed))
    assert report["gap_count"] == {"all_scored": sum(1 for h in histories for step in h if step.get("G") is not None),
                                   "final": sum(1 for h in histories if h and h[-1].get("G") is not None)}
    assert report["iterations"][0]["entered"] == sum(1 for h in histories if h)
    assert report["coverage"]["generated_use_cases"] == dict(Counter(r["metadata"]["codec"]["use_case"] for r in kept))


# ----------------------------------------------------------------------------- compare: which rating is the data's


def rated_run(tmp_path: Path, name: str, stages: list[dict[str, Any]]) -> Path:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Question {i}?"}) + "\n" for i in range(4)), encoding="utf-8")
    models = {"first": {"backend": "scripted", "model": "first", "rules": [{"match": ".*", "reply": "A plain answer."}]},
              "second": {"backend": "scripted", "model": "second", "rules": [{"match": ".*", "reply": "A much better answer."}]},
              "judge": {"backend": "scripted", "model": "rater",
                        "rules": [{"match": "much better", "reply": "Score: 5"}, {"match": ".*", "reply": "Score: 3"}]}}
    recipe = parse_recipe({"name": name, "models": models, "input": str(seeds), "stages": stages}, name, tmp_path)
    assert run_recipe_sync(recipe, tmp_path / name, show_progress=False).status == "complete"
    return tmp_path / name


def test_compare_shows_the_rating_of_the_pairs_as_delivered(tmp_path: Path) -> None:
    """Rated (3), rewritten, rated again as quality_after (5), as a CoachLM run does: the delivered pairs are the
    rewritten ones, so their quality is the second rating, not the first one still stored beside it."""
    first, rewrite = {"type": "respond", "role": "first"}, {"type": "respond", "name": "rewrite", "role": "second"}
    rate, rate_after = {"type": "quality.rate", "role": "judge"}, {"type": "quality.rate", "role": "judge", "name": "after", "key": "quality_after"}
    after = collect_run(rated_run(tmp_path, "after", [first, rate, rewrite, rate_after]), "after", None, [])
    assert after.quality is not None and (after.quality.n, after.quality.mean) == (4, 5.0)
    assert after.quality_source == "metadata.quality_after in data.jsonl"
    stale = collect_run(rated_run(tmp_path, "stale", [first, rate, rewrite]), "stale", None, [])
    assert stale.quality is not None and stale.quality.mean == 3.0
    assert stale.quality_source == ("metadata.quality in data.jsonl (rated before rewrite rewrote pairs: these scores are "
                                    "of the earlier versions)")


def test_compare_does_not_show_a_rating_of_an_earlier_data_file(tmp_path: Path) -> None:
    run = rated_run(tmp_path, "plain", [{"type": "respond", "role": "first"}])
    (run / "rate").mkdir()
    (run / "rate" / "quality.json").write_text(json.dumps({  # as `datatailor rate` wrote it when the run held 3 pairs
        "kind": "datatailor-quality", "n": 3, "mean": 3.0, "histogram": {}, "shares": {}, "high_quality_share": 0.0,
        "unrated": 0, "failures": {}}), encoding="utf-8")
    summary = collect_run(run, "plain", None, [])
    assert summary.quality is None
    assert summary.quality_source == ("rate/quality.json rated 3 pairs but data.jsonl holds 4: it is of an earlier "
                                      "data.jsonl, so it is not shown; rate the run again")
    (run / "rate" / "quality.json").write_text(json.dumps({
        "kind": "datatailor-quality", "n": 3, "mean": 3.0, "histogram": {"[0,3.5)": 3}, "shares": {"[0,3.5)": 1.0},
        "high_quality_share": 0.0, "unrated": 0, "failures": {"parse_error": 1}}), encoding="utf-8")
    assert collect_run(run, "plain", None, []).quality.n == 3  # 3 rated + 1 failed = the 4 pairs: current
