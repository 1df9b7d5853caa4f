"""CodecLM stages on scripted models: every branch of Contrastive Filtering, metadata-only mode, budget sizing,
determinism, lineage and the report.

The scripted world: a seed "[uc=<use case>|sk=<a>,<b>] …" encodes to that use case and those skills. Use cases
steer the outcome of the contrastive loop because decoded instructions mention their use case:

* hard      the target answers badly: G = +7 at iteration 1 → kept with the strong answer;
* flip      the strong model answers badly: G = −7 → kept with the target answer;
* late      both answer well until the instruction is improved once: kept at iteration 2;
* easy      both always answer well: G = 0 → below threshold after every iteration;
* judgefail the judge never gives two numbers → parse_error after the re-asks.

A seed containing GARBLE never encodes (parse_error at codec.encode).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from datatailor.errors import UserError
from datatailor.llm.base import CompletionRequest
from datatailor.recipe import Recipe, parse_recipe
from datatailor.records import Record
from datatailor.runner import RunResult, run_recipe_sync
from datatailor.stages.codec import (
    CodecData,
    clean_item,
    clean_skill,
    instructions_per_entry,
    load_given_entries,
    metadata_id,
    parse_improved,
    parse_rewritten,
    parse_rubrics_actions,
)

# ----------------------------------------------------------------------------- the scripted world
#
# Handlers route by the prompt template's name and read the variables it was rendered with, so rewording a
# template cannot silently change which branch answers.

ENCODE, DECODE, RUBRICS, IMPROVE, RESPOND, JUDGE = (
    "codec/encode.j2", "codec/decode.j2", "codec/rubrics.j2", "codec/improve.j2", "respond.j2", "judge/pairwise_scores.j2",
)
CALLS: list[CompletionRequest] = []  # every request the scripted models saw (tests that inspect them clear it)


def _quality(answer: str) -> int:
    m = re.search(r"QUALITY=(\d+)", answer)
    return int(m.group(1)) if m else 5


def strong(request: CompletionRequest) -> str:
    CALLS.append(request)
    t, v = request.template, request.variables or {}
    if t == ENCODE:
        seed = v["instruction"]
        if "GARBLE" in seed:
            return "This request is hard to classify."
        m = re.search(r"\[uc=([^|\]]+)\|sk=([^\]]+)\]", seed)
        assert m, seed
        label = "Task" if "TASKLABEL" in seed else "Use case"
        return f"{label}: {m.group(1)}\nSkills: {m.group(2).replace(',', ', ')}"
    if t == DECODE:
        # The sampling seed differs per call (and per top-up round), so each call writes new instructions.
        tag = request.sampling.seed % 997
        return "\n".join(f"{i + 1}. Task {i + 1}-{tag} about {v['use_case']} needing {', '.join(v['skills'])}." for i in range(v["n"]))
    if t == RUBRICS:
        n = v["n"]
        rubrics = "\n".join(f"{i + 1}. Rubric {i + 1}: depth level {i + 1}" for i in range(n))
        actions = "\n".join(f"{i + 1}. Add requirement {i + 1}" for i in range(n))
        return f"Rubrics:\n{rubrics}\nActions:\n{actions}"
    if t == IMPROVE:
        return f"New request: {v['instruction']} (harder: {v['action'].lower()})"
    if t == JUDGE:
        if "judgefail" in v["question"]:
            return "Both answers have merit."
        return f"{_quality(v['answer_1'])} {_quality(v['answer_2'])}"
    if t == RESPOND:
        return "Strong answer. QUALITY=2" if "flip" in v["instruction"] else "Strong answer. QUALITY=9"
    raise AssertionError(f"strong model: unexpected template {t!r}")


def target(request: CompletionRequest) -> str:
    CALLS.append(request)
    assert request.template == RESPOND, request.template
    prompt = request.variables["instruction"]
    if "flip" in prompt:
        return "Target answer. QUALITY=9"
    if "easy" in prompt or "judgefail" in prompt:
        return "Target answer. QUALITY=9"
    if "late" in prompt:
        return "Target answer. QUALITY=2" if "(harder" in prompt else "Target answer. QUALITY=8"
    return "Target answer. QUALITY=2"


MODELS = {
    "strong": {"backend": "scripted", "model": "scripted-strong", "handler": "tests.test_codec:strong"},
    "target": {"backend": "scripted", "model": "scripted-target", "handler": "tests.test_codec:target"},
}

SEEDS = [
    "[uc=hard|sk=proof writing,algebra] Prove that the sum of two even numbers is even.",
    "[uc=flip|sk=small talk] Say hello to a new colleague.",
    "[uc=late|sk=trip planning,budgeting] Plan a weekend in Lisbon.",
    "[uc=easy|sk=spelling] Spell the word necessary. TASKLABEL",
    "GARBLE seed that the encoder cannot read",
]


def seed_rows(texts: list[str]) -> list[dict[str, str]]:
    return [{"instruction": t} for t in texts]


def make(tmp_path: Path, stages: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None, **fields: Any) -> Recipe:
    data: dict[str, Any] = {"models": MODELS, "stages": stages, **fields}
    if rows is not None:
        path = tmp_path / "seeds.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        data["input"] = str(path)
    return parse_recipe(data, "test-codec", tmp_path)


def run(recipe: Recipe, out: Path) -> RunResult:
    return run_recipe_sync(recipe, out, show_progress=False)


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_rows(out: Path, index: int, name: str, file: str = "outputs.jsonl") -> list[dict[str, Any]]:
    return rows(out / "stages" / f"{index:02d}-{name}" / file)


def ns(r: dict[str, Any]) -> dict[str, Any]:
    """A record's `codec` namespace."""
    return r["metadata"]["codec"]


def result(r: dict[str, Any]) -> dict[str, Any]:
    """What Contrastive Filtering decided for a record."""
    return r["metadata"]["codec"]["contrastive"]


def pool_file(out: Path) -> Path:
    (path,) = list(out.glob("stages/*/metadata.jsonl"))[-1:]
    return path


def report_file(out: Path, name: str = "codec_report.json") -> Path:
    (path,) = out.glob(f"stages/*-codec.contrastive/{name}")
    return path


PIPELINE = [
    {"type": "codec.encode"},
    {"type": "codec.augment", "pool_size": 4},
    {"type": "codec.rubrics"},
    {"type": "codec.decode", "top_up_rounds": 0},
    {"type": "codec.contrastive"},
]


# ----------------------------------------------------------------------------- the full pipeline from seeds


@pytest.fixture
def seeds_run(tmp_path: Path) -> tuple[Path, RunResult]:
    recipe = make(tmp_path, PIPELINE, seed_rows(SEEDS), budget_pairs=8, cache=False)
    out = tmp_path / "out"
    return out, run(recipe, out)


def test_every_branch_of_contrastive_filtering(seeds_run: tuple[Path, RunResult]) -> None:
    out, run_result = seeds_run
    # 6 of the 8 pairs asked for: with top-up rounds switched off the run says it fell short, and why.
    assert run_result.status == "shortfall"
    assert run_result.shortfall["stage"] == "codec.contrastive"
    assert (run_result.shortfall["asked"], run_result.shortfall["delivered"]) == (8, 6)
    assert "below_threshold 2" in run_result.shortfall["why"]
    data = rows(out / "data.jsonl")
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in data:
        by_case.setdefault(ns(r)["use_case"], []).append(r)
    # Four seed entries (hard, flip, late, easy), no room to augment: k = ceil(8 / 4) = 2 per entry.
    assert {k: len(v) for k, v in by_case.items()} == {"hard": 2, "flip": 2, "late": 2}
    for r in by_case["hard"]:
        codec = result(r)
        assert (codec["kept"], codec["iteration"], codec["G"]) == ("strong", 1, 7.0)
        assert r["response"] == "Strong answer. QUALITY=9"
        assert ns(r)["action_chain"] == []
    for r in by_case["flip"]:
        codec = result(r)
        assert (codec["kept"], codec["iteration"], codec["G"]) == ("target", 1, -7.0)
        assert r["response"] == "Target answer. QUALITY=9"
    for r in by_case["late"]:
        codec = result(r)
        assert (codec["kept"], codec["iteration"], codec["G"]) == ("strong", 2, 7.0)
        assert [h["G"] for h in codec["history"]] == [1.0, 7.0]
        assert len(ns(r)["action_chain"]) == 1
        step = ns(r)["action_chain"][0]
        assert step["action"].startswith("Add requirement") and step["rubric"].startswith("Rubric")
        # the action and its paired rubric: "Add requirement i" goes with "Rubric i"
        assert step["rubric"].split(":")[0].split()[-1] == step["action"].split()[-1]
        assert "(harder: add requirement" in r["instruction"]
        assert step["before"] in r["instruction"]

    failures = rows(out / "failures.jsonl")
    kinds = sorted((f["stage"], f["kind"]) for f in failures)
    assert kinds == [("codec.contrastive", "below_threshold")] * 2 + [("codec.encode", "parse_error")]
    for f in failures:
        if f["kind"] == "below_threshold":
            codec = result(f["record"])
            assert [h["G"] for h in codec["history"]] == [0.0, 0.0, 0.0, 0.0]
            assert len(ns(f["record"])["action_chain"]) == 3
            assert "G = +0.00, +0.00, +0.00, +0.00" in f["message"]


def test_encoder_accepts_task_label_and_garbled_seed_is_a_parse_failure(seeds_run: tuple[Path, RunResult]) -> None:
    out, _ = seeds_run
    encoded = [r for row in stage_rows(out, 0, "codec.encode") for r in row["records"]]
    easy = next(r for r in encoded if "TASKLABEL" in r["instruction"])
    assert ns(easy)["use_case"] == "easy" and ns(easy)["skills"] == ["spelling"]
    garbled = next(f for f in rows(out / "failures.jsonl") if f["stage"] == "codec.encode")
    assert garbled["kind"] == "parse_error"
    assert "3 attempt(s)" in garbled["message"]  # the first ask and two re-asks


def test_lineage_of_a_kept_pair(seeds_run: tuple[Path, RunResult]) -> None:
    out, _ = seeds_run
    late = next(r for r in rows(out / "data.jsonl") if ns(r)["use_case"] == "late")
    md = ns(late)
    assert md["entry_id"] == metadata_id("late", ["trip planning", "budgeting"])
    assert md["rubrics"] and len(md["actions"]) == 4
    codec = result(late)
    assert codec["scores"] == {
        "strong_shown_first": {"strong": 9.0, "target": 2.0},
        "target_shown_first": {"strong": 9.0, "target": 2.0},
        "mean_strong": 9.0,
        "mean_target": 2.0,
        "position_consistent": True,
    }
    assert codec["strong_response"] == "Strong answer. QUALITY=9"
    assert codec["target_response"] == "Target answer. QUALITY=2"
    stages = [e["stage"] + ":" + (e["decision"] or "") for e in late["lineage"]]
    assert stages[:4] == ["codec.encode:encoded", "codec.augment:pooled", "codec.rubrics:rubrics", "codec.decode:decoded"]
    scored = [e for e in late["lineage"] if e["decision"] == "scored"]
    assert [e["details"]["G"] for e in scored] == [1.0, 7.0]
    assert scored[-1]["details"]["strong_shown_first"] == {"strong": 9.0, "target": 2.0}
    assert any(e["decision"] == "improved" and e["details"]["iteration"] == 2 for e in late["lineage"])
    assert late["lineage"][-1]["decision"] == "kept:strong"


def test_metadata_pool_file_names_the_seeds(seeds_run: tuple[Path, RunResult]) -> None:
    out, _ = seeds_run
    pool = rows(out / "stages/01-codec.augment/metadata.jsonl")
    assert len(pool) == 4 and {p["origin"] for p in pool} == {"seed"}
    assert json.loads((out / "stages/01-codec.augment/pool.json").read_text())["requested"] == 4
    seeds = {r["id"]: r["instruction"] for row in stage_rows(out, 0, "codec.encode") for r in row["records"]}
    for entry in pool:
        (seed_id,) = entry["seeds"]
        assert f"[uc={entry['use_case']}|" in seeds[seed_id]
        assert entry["use_case_seeds"] == [seed_id]
        assert set(entry["skill_seeds"]) == set(entry["skills"])


def test_report_counts(seeds_run: tuple[Path, RunResult]) -> None:
    out, _ = seeds_run
    report = json.loads(report_file(out).read_text())
    assert report_file(out, "codec_report.md").read_text().startswith("# CodecLM report")
    page = report_file(out, "codec_report.html").read_text()
    assert "<html>" in page and "<pre>" not in page  # the summary is HTML, not Markdown text
    assert "<li>Instructions filtered: <strong>8</strong>; kept <strong>6</strong>" in page
    assert report["pool_requested"] == 4
    assert report["position_consistency"] == 1.0 and report["consistency_warning"] is None
    assert report["instructions"] == 8 and report["kept"] == 6
    assert (report["kept_strong"], report["kept_target"], report["kept_below_threshold"]) == (4, 2, 0)
    assert report["dropped"] == {"below_threshold": 2}
    assert report["budget_pairs"] == 8 and report["budget_met"] is False
    it = {i["iteration"]: i for i in report["iterations"]}
    assert (it[1]["entered"], it[1]["kept"], it[1]["data_share"]) == (8, 4, round(4 / 6, 4))
    assert (it[2]["entered"], it[2]["kept"], it[2]["kept_share"]) == (4, 2, 0.5)
    assert (it[3]["entered"], it[4]["entered"], it[4]["kept"]) == (2, 2, 0)
    hist = {b["from"]: b["count"] for b in report["gap_histogram"]["all_scored"]}
    # G: hard 2 × +7; late 2 × (+1, +7); easy 2 × 4 × 0; flip 2 × −7 — 16 scored iterations.
    assert (hist[7], hist[1], hist[0], hist[-7]) == (4, 2, 8, 2)
    assert report["gap_count"] == {"all_scored": 16, "final": 8}
    cov = report["coverage"]
    assert cov["use_cases"]["seed"] == 4 and cov["use_cases"]["missing"] == ["easy"]
    assert cov["generated_use_cases"] == {"hard": 2, "flip": 2, "late": 2}


# ----------------------------------------------------------------------------- flags, failures, modes


def test_keep_below_threshold_keeps_the_flagged_pairs(tmp_path: Path) -> None:
    stages = [dict(s) for s in PIPELINE]
    stages[-1] = {"type": "codec.contrastive", "keep_below_threshold": True, "max_iterations": 2}
    recipe = make(tmp_path, stages, seed_rows(SEEDS[3:4]), budget_pairs=2)
    out = tmp_path / "out"
    assert run(recipe, out).status == "complete"
    data = rows(out / "data.jsonl")
    assert len(data) == 2
    for r in data:
        codec = result(r)
        assert codec["below_threshold"] is True and codec["kept"] == "strong" and codec["iteration"] == 2
        assert r["lineage"][-1]["reason"].endswith("kept by keep_below_threshold")
    report = json.loads(report_file(out).read_text())
    assert report["kept_below_threshold"] == 2 and report["kept_above_threshold"] == 0
    assert not (out / "failures.jsonl").read_text().strip()


def test_unparseable_judge_output_is_a_parse_failure_with_its_trace(tmp_path: Path) -> None:
    recipe = make(tmp_path, PIPELINE, seed_rows(["[uc=judgefail|sk=anything] Judge me."]), budget_pairs=1)
    out = tmp_path / "out"
    assert run(recipe, out).status == "shortfall"  # 0 of 1 pair
    assert rows(out / "data.jsonl") == []
    (failure,) = rows(out / "failures.jsonl")
    assert (failure["stage"], failure["kind"]) == ("codec.contrastive", "parse_error")
    assert "did not parse after 3 attempt(s)" in failure["message"]
    # The failure row shows what was tried: both answers were given before the judge failed.
    decisions = [e["decision"] for e in failure["record"]["lineage"] if e["stage"] == "codec.contrastive"]
    assert decisions == ["answered", "answered"]
    usage = json.loads((out / "usage.json").read_text())["run"]["roles"]["strong"]
    # encode 1 + rubrics 1 + decode 1 + strong answer 1 + judge 2 orders × 3 attempts
    assert usage["requests"] == 10


def test_metadata_only_mode(tmp_path: Path) -> None:
    meta_file = tmp_path / "metadata.yaml"
    meta_file.write_text(
        "- use_case: hard\n  skills: [Chess Openings, endgame study]\n"
        "- use_case: Flip\n  skills: [poetry]\n",
        encoding="utf-8",
    )
    stages = [
        {"type": "codec.metadata", "file": "metadata.yaml", "entries": [{"use_case": "late", "skills": ["travel"]}]},
        {"type": "codec.augment", "pool_size": 6},
        {"type": "codec.rubrics"},
        {"type": "codec.decode"},
        {"type": "codec.contrastive"},
    ]
    recipe = make(tmp_path, stages, budget_pairs=6)
    out = tmp_path / "out"
    assert run(recipe, out).status == "complete"
    pool = rows(out / "stages/01-codec.augment/metadata.jsonl")
    assert len(pool) == 6
    given = [p for p in pool if p["origin"] == "given"]
    assert {p["use_case"] for p in given} == {"hard", "flip", "late"}  # labels normalised
    assert any(p["skills"] == ["chess openings", "endgame study"] for p in given)
    for p in pool:
        if p["origin"] == "augmented":
            assert p["use_case_seeds"] and all(p["skill_seeds"][s] for s in p["skills"])
            assert set(p["seeds"]) <= {g["id"] for g in given}
    data = rows(out / "data.jsonl")
    assert len(data) == 6  # k = 1 per entry; hard, flip and late all pass
    assert all(result(r)["kept"] in ("strong", "target") for r in data)


def test_metadata_file_errors_name_file_and_entry(tmp_path: Path) -> None:
    bad = tmp_path / "meta.yaml"
    bad.write_text("- use_case: x\n  skills: []\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"meta.yaml: entry 1: skills"):
        load_given_entries(bad)
    with pytest.raises(UserError, match="file not found"):
        load_given_entries(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="entries"):
        make(tmp_path, [{"type": "codec.metadata"}])
    bad_jsonl = tmp_path / "pool.jsonl"
    bad_jsonl.write_text('{"id": "x", "use_case": "qa", "skills": ["a"]}\n{"id": "y", "use_case": "qa"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"pool.jsonl: entry 2: skills"):
        load_given_entries(bad_jsonl)


def test_a_curated_pool_file_from_an_earlier_run_is_read_back(seeds_run: tuple[Path, RunResult], tmp_path: Path) -> None:
    out, _ = seeds_run
    pool = rows(pool_file(out))
    curated = tmp_path / "curated.jsonl"
    curated.write_text("".join(json.dumps(p) + "\n" for p in pool if p["use_case"] != "easy"), encoding="utf-8")
    entries = load_given_entries(curated)
    assert sorted(e.use_case for e in entries) == ["flip", "hard", "late"]


def test_budget_sizing_gives_an_equal_k_per_entry(tmp_path: Path) -> None:
    assert instructions_per_entry(2000, 200, None) == 10
    assert instructions_per_entry(7, 3, None) == 3
    assert instructions_per_entry(2, 5, None) == 1
    assert instructions_per_entry(None, 5, 4) == 4
    with pytest.raises(UserError, match="budget_pairs"):
        instructions_per_entry(None, 5, None)
    stages = [
        {"type": "codec.metadata", "entries": [{"use_case": "hard", "skills": ["a", "b", "c"]}]},
        {"type": "codec.augment", "pool_size": 3, "max_skills": 2},
        {"type": "codec.decode"},
    ]
    out = tmp_path / "out"
    assert run(make(tmp_path, stages, budget_pairs=7), out).status == "complete"
    data = rows(out / "data.jsonl")
    per_entry: dict[str, int] = {}
    for r in data:
        per_entry[ns(r)["entry_id"]] = per_entry.get(ns(r)["entry_id"], 0) + 1
    assert sorted(per_entry.values()) == [3, 3, 3]
    assert {r["lineage"][-1]["details"]["requested"] for r in data} == {3}
    overridden = [dict(s) for s in stages]
    overridden[-1] = {"type": "codec.decode", "instructions_per_entry": 2}
    out2 = tmp_path / "out2"
    assert run(make(tmp_path, overridden, budget_pairs=6), out2).status == "complete"
    assert len(rows(out2 / "data.jsonl")) == 6
    with pytest.raises(UserError, match="budget_pairs"):
        run(make(tmp_path, stages), tmp_path / "out3")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    stages = [dict(s) for s in PIPELINE]
    stages[1] = {"type": "codec.augment", "pool_size": 10}
    seeds = seed_rows(SEEDS[:4])

    def data_bytes(seed: int, name: str) -> bytes:
        folder = tmp_path / name
        folder.mkdir()
        out = folder / "out"
        assert run(make(folder, stages, seeds, budget_pairs=10, seed=seed, cache=False), out).status in ("complete", "shortfall")
        return (out / "data.jsonl").read_bytes() + pool_file(out).read_bytes()

    first, again, other = data_bytes(1, "a"), data_bytes(1, "b"), data_bytes(2, "c")
    assert first == again
    assert first != other


def test_augment_mixes_and_matches_without_duplicates(tmp_path: Path) -> None:
    stages = [
        {"type": "codec.metadata", "entries": [
            {"use_case": "u1", "skills": ["s1", "s2"]},
            {"use_case": "u2", "skills": ["s3"]},
        ]},
        {"type": "codec.augment", "pool_size": 100},
    ]
    out = tmp_path / "out"
    assert run(make(tmp_path, stages), out).status == "complete"
    pool = rows(pool_file(out))
    # 2 use cases × (3 + 3 + 1) non-empty subsets of ≤ 3 of the 3 skills = 14 distinct entries at most.
    assert len(pool) == 14
    assert len({p["id"] for p in pool}) == 14
    assert all(1 <= len(p["skills"]) <= 3 and len(set(p["skills"])) == len(p["skills"]) for p in pool)
    assert [p["origin"] for p in pool[:2]] == ["given", "given"]


def test_improve_stage_follows_a_sampled_action(tmp_path: Path) -> None:
    stages = [
        {"type": "codec.metadata", "entries": [{"use_case": "hard", "skills": ["algebra"]}]},
        {"type": "codec.rubrics", "count": 3},
        {"type": "codec.decode", "instructions_per_entry": 2},
        {"type": "codec.improve"},
    ]
    out = tmp_path / "out"
    assert run(make(tmp_path, stages), out).status == "complete"
    data = rows(out / "data.jsonl")
    assert len(data) == 2
    for r in data:
        (step,) = ns(r)["action_chain"]
        assert step["action"] in ns(r)["actions"] and len(ns(r)["actions"]) == 3
        assert r["instruction"].startswith(step["before"]) and "(harder:" in r["instruction"]
        assert r["lineage"][-1]["decision"] == "improved"
    usage = json.loads((out / "usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["requests"] == 1 + 1 + 2  # rubrics once per entry, decode once, two rewrites


def test_rubrics_are_computed_once_per_entry_even_on_instructions(tmp_path: Path) -> None:
    stages = [
        {"type": "codec.metadata", "entries": [{"use_case": "hard", "skills": ["algebra"]}]},
        {"type": "codec.decode", "instructions_per_entry": 3},
        {"type": "codec.rubrics"},
    ]
    out = tmp_path / "out"
    assert run(make(tmp_path, stages, cache=False), out).status == "complete"
    data = rows(out / "data.jsonl")
    assert len(data) == 3 and all(len(ns(r)["actions"]) == 4 for r in data)
    usage = json.loads((out / "usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["requests"] == 2  # one decode, one rubric call shared by the three instructions
    assert sum(1 for r in data if r["lineage"][-1]["details"].get("shared_call")) == 2


def test_select_trims_to_exactly_the_budget(tmp_path: Path) -> None:
    stages = [
        {"type": "codec.metadata", "entries": [
            {"use_case": "hard", "skills": ["algebra"]},
            {"use_case": "flip", "skills": ["poetry"]},
        ]},
        {"type": "codec.rubrics"},
        {"type": "codec.decode", "instructions_per_entry": 3},
        {"type": "codec.contrastive"},
        {"type": "codec.select"},
    ]
    out = tmp_path / "out"
    assert run(make(tmp_path, stages, budget_pairs=3), out).status == "complete"
    data = rows(out / "data.jsonl")
    assert len(data) == 3
    assert {ns(r)["use_case"] for r in data} == {"hard", "flip"}  # spread keeps both entries
    trimmed = [f for f in rows(out / "failures.jsonl") if f["kind"] == "over_budget"]
    assert len(trimmed) == 3


def test_spread_takes_the_largest_gap_of_each_entry_first() -> None:
    import asyncio

    from datatailor.stages import StageContext
    from datatailor.stages.codec.select import CodecSelect, SelectConfig

    def pair(entry: str, gap: float) -> Record:
        return Record(id=f"{entry}{gap:+}", instruction=f"{entry} {gap}", response="a",
                      metadata={"codec": {"entry_id": entry, "contrastive": {"G": gap, "threshold": 3.0}}})

    records = [pair("A", 4.0), pair("A", -8.0), pair("A", 6.0), pair("B", 5.0), pair("B", 9.0)]
    ctx = StageContext(models=None, stage_name="codec.select", seed=0, artifacts_dir=Path("."), base_dir=Path("."), budget_pairs=3)  # type: ignore[arg-type]
    result = asyncio.run(CodecSelect(SelectConfig(strategy="spread"), ctx).process_all(records))
    # round-robin over the entries, each entry's largest |G| first: A −8, B +9, then A +6
    assert [r.id for r in result.outputs] == ["A-8.0", "A+6.0", "B+9.0"]
    assert sorted(result.rejected) == ["A+4.0", "B+5.0"]


def test_a_top_up_after_a_round_that_kept_nothing_asks_for_four_times_the_deficit(tmp_path: Path) -> None:
    """The easy entry never passes Contrastive Filtering: round 1 decodes the 3 instructions the budget needs and keeps
    none; the keep rate is then floored at 1/4, so round 2 decodes 3 / (1/4) = 12."""
    stages = [{"type": "codec.metadata", "entries": [{"use_case": "easy", "skills": ["spelling"]}]}, {"type": "codec.rubrics"},
              {"type": "codec.decode", "top_up_rounds": 1}, {"type": "codec.contrastive"}, {"type": "codec.select"}]
    out = tmp_path / "out"
    assert run(make(tmp_path, stages, budget_pairs=3), out).status == "shortfall"
    decoded = Counter(ns(r)["decode_round"] for r in rows(out / "stages" / "02-codec.decode" / "records.jsonl"))
    assert decoded == {1: 3, 2: 12}


def test_report_kept_share_is_of_the_instructions_scored_at_each_iteration(tmp_path: Path) -> None:
    """An instruction whose judge reply never parses entered iteration 1 but was not scored there: the kept share
    divides by the scored ones."""
    out = tmp_path / "out"
    run(make(tmp_path, PIPELINE, seed_rows([*SEEDS[:4], "[uc=judgefail|sk=anything] Judge me."]), budget_pairs=8), out)
    first = json.loads(report_file(out).read_text())["iterations"][0]
    assert first["entered"] == first["scored"] + 2  # the judgefail entry's 2 instructions
    assert first["kept_share"] == round(first["kept"] / first["scored"], 4) and first["kept"] > 0


# ----------------------------------------------------------------------------- parsers


def test_parse_rubrics_actions_layouts() -> None:
    sections = "Rubrics:\n1. r one\n2. r two\n3. r three\n\nActions:\n1. a one\n2. a two\n3. a three"
    assert parse_rubrics_actions(sections, 2) == (["r one", "r two"], ["a one", "a two"])  # extra pairs are cut
    labelled = "1. Rubric: clarity\n   Action: add a constraint\n2. Rubric: depth\n   Action: ask for proof"
    assert parse_rubrics_actions(labelled, 2) == (["clarity", "depth"], ["add a constraint", "ask for proof"])
    flat = "1. r1\n2. r2\n3. a1\n4. a2"
    assert parse_rubrics_actions(flat, 2) == (["r1", "r2"], ["a1", "a2"])
    bold = "**Rubrics:**\n- r1\n**Actions:**\n- a1"
    assert parse_rubrics_actions(bold, 1) == (["r1"], ["a1"])
    # Exactly n of each, paired by position: fewer, or unequal counts, are re-asked.
    with pytest.raises(ValueError, match="1 rubric/action pairs, 4 were asked"):
        parse_rubrics_actions(bold, 4)
    with pytest.raises(ValueError, match="2 rubrics but 3 actions"):
        parse_rubrics_actions("Rubrics:\n1. r1\n2. r2\nActions:\n1. a1\n2. a2\n3. a3", 2)
    with pytest.raises(ValueError):
        parse_rubrics_actions("1. r1\n2. r2\n3. a1", 2)  # 3 items cannot be 2 rubrics + 2 actions
    # A small model's nested markdown: numbered headings with bulleted, bold-labelled rubric/action lines.
    nested = (
        "RUBRICS: Nutrition, Cooking\n\n1. **Request Complexity:**\n   - **Rubric:** Nutrition\n   - **Actions:**\n"
        "     - **Action:** Add more recipes.\n   - **Reasoning:** It is harder.\n\n2. **Request Difficulty:**\n"
        "   - **Rubric:** Cooking\n   - **Actions:**\n     - **Action:** Ask for new techniques.\n"
    )
    assert parse_rubrics_actions(nested, 2) == (["Nutrition", "Cooking"], ["Add more recipes.", "Ask for new techniques."])
    with pytest.raises(ValueError, match="no actions"):
        parse_rubrics_actions("I think these are hard.", 4)


def test_small_parsers() -> None:
    assert clean_item("**Increase complexity**: ask for two cases") == "Increase complexity: ask for two cases"
    assert clean_item('"Write a poem about rain."') == "Write a poem about rain."
    assert clean_skill("Python knowledge") == "python"
    assert clean_skill("writing skills") == "writing"
    assert clean_skill("knowledge") == "knowledge"
    assert parse_rewritten('New request: "Do X twice."') == "Do X twice."
    assert parse_rewritten("**Improved instruction:** Do Y") == "Do Y"
    with pytest.raises(ValueError):
        parse_rewritten("New request:   ")
    action = "Add a requirement to compare two competitors"
    assert parse_improved("Write a business plan that compares two competitors.", action)
    with pytest.raises(ValueError, match="repeats the change description"):
        parse_improved("Add a requirement to compare the two competitors.", action)


def test_contrastive_without_actions_is_refused_before_anything_runs(tmp_path: Path) -> None:
    rows_ = [{"instruction": "easy question", "use_case": "easy", "skills": ["x"]}]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"stage 0 \(codec.contrastive\) needs Self-Rubrics actions.*add one of codec.rubrics"):
        run(make(tmp_path, [{"type": "codec.contrastive"}], rows_), out)
    assert not out.exists()
    # One iteration needs no action: basic generation only.
    assert run(make(tmp_path, [{"type": "codec.contrastive", "max_iterations": 1}], rows_), out).status == "complete"


def test_record_ids_are_stable_and_distinct(seeds_run: tuple[Path, RunResult]) -> None:
    out, _ = seeds_run
    data = [Record.model_validate(r) for r in rows(out / "data.jsonl")]
    assert len({r.id for r in data}) == len(data)
    assert all(r.parents for r in data)


# ----------------------------------------------------------------------------- the method's rules


def edge_target(request: CompletionRequest) -> str:
    """For the threshold test: the target's quality is written into the instruction ("T=5" → QUALITY=5)."""
    m = re.search(r"T=(\d+(?:\.\d+)?)", request.variables["instruction"])
    return f"Target answer. QUALITY={m.group(1)}"


def edge_strong(request: CompletionRequest) -> str:
    if request.template == RESPOND:
        return "Strong answer. QUALITY=8"
    if request.template == JUDGE:
        def q(a: str) -> str:
            return re.search(r"QUALITY=(\d+(?:\.\d+)?)", a).group(1)
        return f"{q(request.variables['answer_1'])} {q(request.variables['answer_2'])}"
    if request.template == IMPROVE:
        return f"New request: {request.variables['instruction']} and more"
    raise AssertionError(request.template)


def test_keep_only_when_the_gap_is_strictly_above_the_threshold(tmp_path: Path) -> None:
    """|G| > 3, not ≥: strong scores 8, so a target at 5 gives G = 3 (dropped) and one at 4.5 gives 3.5 (kept)."""
    rows_ = [{"instruction": "Edge case T=5"}, {"instruction": "Just over T=4.5"}]
    models = {"strong": {"backend": "scripted", "model": "edge-s", "handler": "tests.test_codec:edge_strong"},
              "target": {"backend": "scripted", "model": "edge-t", "handler": "tests.test_codec:edge_target"}}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    recipe = parse_recipe({"models": models, "input": str(path), "cache": False,
                           "stages": [{"type": "codec.contrastive", "max_iterations": 1}]}, "t", tmp_path)
    out = tmp_path / "out"
    run(recipe, out)
    (kept,) = rows(out / "data.jsonl")
    assert kept["instruction"] == "Just over T=4.5" and result(kept)["G"] == 3.5
    (dropped,) = rows(out / "failures.jsonl")
    assert dropped["kind"] == "below_threshold" and result(dropped["record"])["G"] == 3.0


def test_temperatures_follow_the_paper(tmp_path: Path) -> None:
    """Generation (encode, decode, rubrics, improve) samples at 0.7 whatever the model's default; the scorer at 0;
    answers at the model's own temperature."""
    models = {role: {**cfg, "temperature": 0.2} for role, cfg in MODELS.items()}
    CALLS.clear()
    recipe = parse_recipe({"models": models, "input": str(_write(tmp_path, seed_rows(SEEDS[:3]))), "budget_pairs": 3,
                           "cache": False, "stages": PIPELINE}, "t", tmp_path)
    run(recipe, tmp_path / "out")
    temps: dict[str, set[float]] = {}
    for request in CALLS:
        temps.setdefault(request.template, set()).add(request.sampling.temperature)
    assert temps[ENCODE] == temps[DECODE] == temps[RUBRICS] == temps[IMPROVE] == {0.7}
    assert temps[JUDGE] == {0.0}
    assert temps[RESPOND] == {0.2}


def _write(tmp_path: Path, rows_: list[dict[str, Any]]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    return path


def test_actions_are_drawn_uniformly_with_their_paired_rubric() -> None:
    from collections import Counter

    from datatailor.records import derive_seed
    from datatailor.stages.codec import pick_action

    record = Record(id="x", instruction="i")
    record.metadata = CodecData(use_case="u", skills=["s"], rubrics=[f"rubric {i}" for i in range(4)],
                                actions=[f"action {i}" for i in range(4)]).stored(record)
    counts: Counter[int] = Counter()
    for n in range(800):
        index, action, rubric = pick_action(record, __import__("random").Random(derive_seed(0, "c", n, "action", 2)))
        assert action == f"action {index}" and rubric == f"rubric {index}"  # the i-th action with the i-th rubric
        counts[index] += 1
    assert set(counts) == {0, 1, 2, 3}
    assert all(150 <= c <= 250 for c in counts.values()), counts  # 200 expected each


def test_augmented_skills_are_drawn_without_replacement(tmp_path: Path) -> None:
    stages = [
        {"type": "codec.metadata", "entries": [{"use_case": "u1", "skills": ["s1", "s2"]}, {"use_case": "u2", "skills": ["s3", "s4"]}]},
        {"type": "codec.augment", "pool_size": 12, "min_skills": 3, "max_skills": 3},
    ]
    out = tmp_path / "out"
    run(make(tmp_path, stages), out)
    augmented = [p for p in rows(pool_file(out)) if p["origin"] == "augmented"]
    # 2 use cases × C(4, 3) = 8 possible entries of exactly three distinct skills.
    assert len(augmented) == 8
    assert all(len(set(p["skills"])) == 3 for p in augmented)


def test_the_report_says_when_the_judge_is_dominated_by_answer_order() -> None:
    from datatailor.report.codec import build_codec_report, render_markdown

    def kept(n: int, consistent: bool) -> Record:
        history = [{"iteration": 1, "G": 0.0, "scores": {"position_consistent": consistent}}]
        r = Record(id=f"r{n}", instruction="i", response="a")
        r.metadata = CodecData(contrastive={"kept": "strong", "below_threshold": True, "iteration": 1, "G": 0.0,
                                            "threshold": 3.0, "history": history}).stored(r)
        return r

    lazy = build_codec_report([kept(i, i == 0) for i in range(4)], [], [], threshold=3, max_iterations=1, budget_pairs=4)
    assert lazy["position_consistency"] == 0.25
    assert "dominated by which answer it sees first" in lazy["consistency_warning"]
    assert "**Warning:**" in render_markdown(lazy)
    from datatailor.report.codec import render_html

    page = render_html(lazy, render_markdown(lazy))
    assert page.count("dominated by which answer it sees first") == 1 and 'class="warning"' in page  # a banner, once
    fine = build_codec_report([kept(i, i != 0) for i in range(4)], [], [], threshold=3, max_iterations=1, budget_pairs=4)
    assert fine["position_consistency"] == 0.75 and fine["consistency_warning"] is None
    strict = build_codec_report([kept(i, i != 0) for i in range(4)], [], [], threshold=3, max_iterations=1, budget_pairs=4,
                                consistency_threshold=0.8)
    assert strict["consistency_warning"]
