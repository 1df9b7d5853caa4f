"""The bake-off on scripted models, always over two test sets (a rule that holds for one test set but not for all is
caught): the split, equal sizes, decontamination against every evaluation part, the table's numbers against the
evaluation runs, the bootstrap on known cases, the plan against what the recipes then did, resume after kill -9,
zero calls on a re-run.

The scripted world: each tuned target answers "<method> answer to: <question>"; the judge gives the tuned target
of method `good` 9 against the reference's 5 (a win in both orders), `odd` wins on questions with an odd number
and ties on the others, the untuned target always loses (3 against 7). Test set `alpha` holds questions 0-29
(6 seeds, 24 judged), `beta` questions 100-119 (4 seeds, 16 judged)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from datatailor.bakeoff.config import BakeoffConfig, load_bakeoff
from datatailor.bakeoff.run import prepare, run_bakeoff
from datatailor.bakeoff.split import split_testset
from datatailor.bakeoff.stats import bootstrap
from datatailor.errors import UserError
from datatailor.evaluate.testsets import load_testset_file
from datatailor.llm.base import CompletionRequest
from tests.conftest import cli_env
from tests.support import kill_9_when, read_jsonl, write_rows

SETS = {"alpha": range(0, 30), "beta": range(100, 120)}  # question numbers of each test set
SEEDS = {"alpha": 6, "beta": 4}  # 20 %, rounded half up
JUDGED = {"alpha": 24, "beta": 16}


def question(i: int) -> str:
    return f"Question {i}: describe thing number {i} in a few words, please, for the report."


def number(text: str) -> int:
    return int(re.search(r"Question (\d+)", text)[1])


def judge(request: CompletionRequest) -> str:
    """Scores 'answer_1 answer_2' by who wrote each answer (see the module docstring); the reference scores 5."""

    def score(answer: str) -> int:
        if answer.startswith("good answer"):
            return 9
        if answer.startswith("odd answer"):
            return 9 if int(re.search(r"Question (\d+)", answer)[1]) % 2 else 5
        if answer.startswith("untuned answer"):
            return 3
        if answer.startswith("half answer"):  # wins on odd questions, loses on the others
            return 9 if int(re.search(r"Question (\d+)", answer)[1]) % 2 else 1
        return 5

    if "answer_1" not in (request.variables or {}):  # the 0-5 quality rating of a method's pair: 4.5 for odd questions
        return "4.5" if int(re.search(r"Question (\d+)", request.variables["instruction"])[1]) % 2 else "3"
    return f"{score(request.variables['answer_1'])} {score(request.variables['answer_2'])}"


def world(tmp: Path, *, latency: float = 0.0, methods: list[dict[str, Any]] | None = None, **overrides: Any) -> Path:
    """A bake-off config with its test set and method recipes in `tmp`; returns the config's path."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name, numbers in SETS.items():
        write_rows(tmp / f"{name}.jsonl", [{"instruction": question(i)} for i in numbers])
    # every item of both test sets: the evaluation parts' must be dropped
    write_rows(tmp / "leaky_input.jsonl", [{"instruction": question(i)} for numbers in SETS.values() for i in numbers])
    respond = {"stages": [{"type": "respond", "role": "strong"}]}
    (tmp / "respond.yaml").write_text(yaml.safe_dump({"models": {}, **respond}))
    (tmp / "leaky.yaml").write_text(yaml.safe_dump({"models": {}, "input": "leaky_input.jsonl", **respond}))
    (tmp / "two.yaml").write_text(yaml.safe_dump({"models": {}, "input": {"path": "leaky_input.jsonl", "limit": 2}, **respond}))
    config = {
        "name": "scripted-bakeoff",
        "seed": 0,
        "budget_pairs": 4,
        "testsets": [str(tmp / f"{name}.jsonl") for name in SETS],
        "models": {
            "strong": {"backend": "scripted", "model": "reference", "latency_s": latency,
                       "rules": [{"match": ".*", "reply": "reference answer"}]},
            "judge": {"backend": "scripted", "model": "judge", "handler": "tests.test_bakeoff:judge", "latency_s": latency},
        },
        "methods": methods if methods is not None else [
            {"name": "good", "recipe": "respond.yaml"},
            {"name": "odd", "recipe": "respond.yaml"},
            {"name": "leaky", "recipe": "leaky.yaml", "input": "recipe"},
            {"name": "base", "untuned": True},
        ],
        "train": {"kind": "external",
                  "target": {"backend": "scripted", "model": "tuned-{method}", "latency_s": latency,
                             "rules": [{"match": r"(Question \d+)", "reply": "{method} answer to: {{ m[1] }}"}]},
                  "untuned": {"backend": "scripted", "model": "untuned",
                              "rules": [{"match": r"(Question \d+)", "reply": "untuned answer to: {{ m[1] }}"}]}},
        "eval": {"bootstrap": 500},
        **overrides,
    }
    path = tmp / "bakeoff.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_the_split_is_disjoint_deterministic_and_seeded(tmp_path: Path) -> None:
    world(tmp_path)
    ids = lambda records: [r.id for r in records]  # noqa: E731
    for name, numbers in SETS.items():
        testset = load_testset_file(tmp_path / f"{name}.jsonl")
        a, b, c = (split_testset(testset, 0.2, s) for s in (0, 0, 1))
        assert (len(a.seeds), len(a.evaluation)) == (SEEDS[name], JUDGED[name]), name
        assert not set(ids(a.seeds)) & set(ids(a.evaluation))
        assert sorted(ids(a.seeds) + ids(a.evaluation)) == sorted(ids(testset.records))
        assert ids(a.seeds) == ids(b.seeds) and ids(a.seeds) != ids(c.seeds)
        order = ids(testset.records)
        assert ids(a.evaluation) == [i for i in order if i in set(ids(a.evaluation))]  # test-set order kept
    # the seed part is the nearest whole number of items, half up: 0.25 × 30 = 7.5 → 8, 0.25 × 20 = 5; at least 1
    alpha, beta = (load_testset_file(tmp_path / f"{name}.jsonl") for name in SETS)
    assert [len(split_testset(alpha, share, 0).seeds) for share in (0.25, 0.24, 0.01)] == [8, 7, 1]
    assert [len(split_testset(beta, share, 0).seeds) for share in (0.25, 0.175, 0.01)] == [5, 4, 1]
    # the methods' input: every test set's seed part, each seed tagged with its test set
    plan = prepare(load_bakeoff(tmp_path / "bakeoff.yaml"), tmp_path / "out")
    from datatailor.bakeoff.run import write_split

    write_split(plan)
    seeds = read_jsonl(tmp_path / "out" / "seeds.jsonl")
    assert {name: sum(s["metadata"]["testset"] == name for s in seeds) for name in SETS} == SEEDS
    for name in SETS:
        evaluated = {r["instruction"] for r in read_jsonl(tmp_path / "out" / "split" / f"{name}.eval.jsonl")}
        assert len(evaluated) == JUDGED[name] and not {s["instruction"] for s in seeds} & evaluated


def test_the_bakeoff_table_equals_its_evaluation_runs(tmp_path: Path) -> None:
    report = run_bakeoff(load_bakeoff(world(tmp_path)), tmp_path / "out", log_stream=None)
    methods = report["methods"]
    # equal sizes: every method's data is exactly budget_pairs, trimmed by the bake-off's own stage
    assert {n: m["data"]["pairs"] for n, m in methods.items() if "data" in m} == {"good": 4, "odd": 4, "leaky": 4}
    assert methods["good"]["data"]["trimmed"] == 10 - 4  # both test sets' seeds answered, 6 trimmed
    # decontamination against every evaluation part: of the 50 test items the leaky method read, all 24 + 16 judged ones
    assert methods["leaky"]["data"]["contamination_dropped"] == sum(JUDGED.values())
    pooled: dict[str, list[int]] = {}
    for name, m in methods.items():
        assert set(m["testsets"]) == set(SETS)
        for ts in SETS:
            summary = json.loads((tmp_path / "out" / "methods" / name / "eval" / ts / "eval.json").read_text())
            row = m["testsets"][ts]
            assert {k: row[k] for k in ("wins", "ties", "losses", "n", "crr", "wr1", "wr2", "qs")} == \
                   {k: summary["metrics"][k] for k in ("wins", "ties", "losses", "n", "crr", "wr1", "wr2", "qs")}
            pooled.setdefault(name, [0, 0])
            pooled[name][0] += row["wins"] + row["ties"]
            pooled[name][1] += row["n"]
        # the ranking's CRR is over every judged item of every test set
        assert report["ranking"]["methods"][name]["crr"] == pytest.approx(pooled[name][0] / pooled[name][1])
    assert report["ranking"]["items"] == sum(JUDGED.values())
    for ts in SETS:
        evaluated = read_jsonl(tmp_path / "out/split" / f"{ts}.eval.jsonl")
        assert (methods["good"]["testsets"][ts]["wins"], methods["good"]["testsets"][ts]["n"]) == (JUDGED[ts], JUDGED[ts])
        odd = methods["odd"]["testsets"][ts]
        assert odd["wins"] + odd["ties"] == JUDGED[ts] and odd["wins"] == sum(number(r["instruction"]) % 2 for r in evaluated)
        assert methods["base"]["testsets"][ts]["losses"] == JUDGED[ts] and "data" not in methods["base"]
    assert report["ranking"]["ranking"][-1] == "base"
    last = report["ranking"]["differences"][-1]
    assert last["lower"] == "base" and last["differs"] and last["low"] > 0.5
    md = (tmp_path / "out" / "bakeoff_report.md").read_text()
    assert "| good | 100.0 (24/0/0) | 100.0 (16/0/0) | **100.0**" in md and "base (untuned)" in md
    # the quality histogram and high-quality share are those of the method's own rating run
    for name in ("good", "leaky"):
        quality = json.loads((tmp_path / "out" / "methods" / name / "rate" / "quality.json").read_text())
        trained = read_jsonl(tmp_path / "out" / "methods" / name / "run" / "data.jsonl")
        odd_share = sum(number(r["instruction"]) % 2 for r in trained) / len(trained)
        assert quality["high_quality_share"] == methods[name]["quality"]["high_quality_share"] == odd_share
        assert list(quality["histogram"].values()) == [round(4 * (1 - odd_share)), 0, 0, round(4 * odd_share)]
        assert f"| {' / '.join(map(str, quality['histogram'].values()))} | {100 * odd_share:.1f} % |" in md.split(f"| {name} | 4 of 4", 1)[1].split("\n")[0]
    # the judge's consistency is given per test set
    assert "alpha 100.0 %, beta 100.0 %" in md


def test_the_report_draws_each_interval_as_an_error_bar_on_its_estimate(tmp_path: Path) -> None:
    """One bar per method (the CRR over both test sets), and on it a whisker from the interval's low to its high end,
    placed on the bar's scale: never the interval's ends as bars of their own."""
    import xml.etree.ElementTree as ET

    methods = [{"name": "good", "recipe": "respond.yaml"}, {"name": "half", "recipe": "respond.yaml"}, {"name": "base", "untuned": True}]
    report = run_bakeoff(load_bakeoff(world(tmp_path, methods=methods)), tmp_path / "out", log_stream=None)
    html = (tmp_path / "out" / "bakeoff_report.html").read_text()
    svg = ET.fromstring(re.search(r'<figure id="fig-crr".*?(<svg.*?</svg>)', html, re.S)[1])
    ns = {"s": "http://www.w3.org/2000/svg"}
    bars = [r for r in svg.iterfind(".//s:rect", ns) if r.find("s:title", ns) is not None]
    whiskers = svg.findall(".//s:g[@class='interval']", ns)
    names = report["ranking"]["ranking"]
    assert [b.find("s:title", ns).text.split(" / ")[0] for b in bars] == names  # one bar per method, nothing else
    assert len(whiskers) == len(names) and "interval low" not in html
    bottom = max(float(b.get("y")) + float(b.get("height")) for b in bars)  # the axis: a CRR of 0
    scale = bottom - min(float(b.get("y")) for b, n in zip(bars, names) if report["ranking"]["methods"][n]["crr"] == 1.0)
    for bar, whisker, name in zip(bars, whiskers, names):
        c = report["ranking"]["methods"][name]
        stem = whisker.findall("s:line", ns)[0]
        assert float(stem.get("x1")) == float(stem.get("x2"))
        assert float(bar.get("x")) < float(stem.get("x1")) < float(bar.get("x")) + float(bar.get("width"))  # on its bar
        ends = sorted((float(stem.get("y1")), float(stem.get("y2"))))
        assert ends == pytest.approx(sorted([bottom - scale * c["high"], bottom - scale * c["low"]]), abs=0.11)
        assert ends[0] - 0.11 <= float(bar.get("y")) <= ends[1] + 0.11  # the estimate lies within its interval
        assert f"{100 * c['low']:.0f}% to {100 * c['high']:.0f}%" in whisker.find("s:title", ns).text
    half = report["ranking"]["methods"]["half"]
    assert half["low"] < half["crr"] - 0.05 and half["high"] > half["crr"] + 0.05  # a whisker that shows
    # the quality chart's axis: one label per tick, none repeated (counts of 2 gave ticks "0 0 1 1 2 2")
    quality = ET.fromstring(re.search(r'<figure id="fig-quality".*?(<svg.*?</svg>)', html, re.S)[1])
    ticks = [t.text for t in quality.iterfind(".//s:text[@text-anchor='end']", ns)]
    assert len(ticks) == 6 and len(set(ticks)) == 6, ticks


def test_decontamination_comes_before_the_recipes_own_selection(tmp_path: Path) -> None:
    """A recipe that ends by trimming to its budget chooses among clean pairs: the 24 + 16 evaluation items it read are
    dropped first, so its 4 pairs come from the 10 seed items and it is not short."""
    path = world(tmp_path, methods=[{"name": "picky", "recipe": "picky.yaml", "input": "recipe"}])
    (tmp_path / "picky.yaml").write_text(yaml.safe_dump({"models": {}, "input": "leaky_input.jsonl", "stages": [
        {"type": "respond", "role": "strong"}, {"type": "select", "strategy": "random"}]}))
    report = run_bakeoff(load_bakeoff(path), tmp_path / "out", log_stream=None)
    data = report["methods"]["picky"]["data"]
    assert (data["pairs"], data["short"], data["contamination_dropped"]) == (4, False, sum(JUDGED.values()))
    run = tmp_path / "out" / "methods" / "picky" / "run"
    assert [s["name"] for s in json.loads((run / "manifest.json").read_text())["stages"]] == ["respond", "bakeoff.decontam", "select", "bakeoff.trim"]
    kept = {r["instruction"] for r in read_jsonl(run / "data.jsonl")}
    for ts in SETS:
        assert not kept & {r["instruction"] for r in read_jsonl(tmp_path / "out" / "split" / f"{ts}.eval.jsonl")}


def first_judge(request: CompletionRequest) -> str:
    """Prefers whichever answer it sees first when one of them is the odd method's; otherwise the fair judge."""
    v = request.variables or {}
    if "answer_1" in v and "odd answer" in v["answer_1"] + v["answer_2"]:
        return "9 5"
    return judge(request)


def always_first(request: CompletionRequest) -> str:
    return "9 5" if "answer_1" in (request.variables or {}) else judge(request)


@pytest.mark.parametrize("handler", ["first_judge", "always_first"])
def test_a_position_biased_judge_is_named_once(handler: str, tmp_path: Path) -> None:
    """One method judged inconsistently: a warning for it on each test set. Every method: one warning about the judge."""
    models = {"strong": {"backend": "scripted", "model": "reference", "rules": [{"match": ".*", "reply": "reference answer"}]},
              "judge": {"backend": "scripted", "model": handler, "handler": f"tests.test_bakeoff:{handler}"}}
    report = run_bakeoff(load_bakeoff(world(tmp_path, models=models)), tmp_path / "out", log_stream=None)
    consistency = {(n, ts): m["testsets"][ts]["position_consistency"] for n, m in report["methods"].items() for ts in SETS}
    if handler == "first_judge":
        assert {ts: consistency[("odd", ts)] for ts in SETS} == {"alpha": 0.0, "beta": 0.0}
        assert {consistency[("good", ts)] for ts in SETS} == {1.0}
        assert [w.split(":")[0] for w in report["warnings"]] == ["odd on alpha", "odd on beta"]
    else:
        assert set(consistency.values()) == {0.0}
        assert report["warnings"] == [report["warnings"][0]] and "for every method and test set" in report["warnings"][0]
        assert "only 0.0 % of the judged items (below 60 %)" in report["warnings"][0]


def test_a_short_method_is_reported_as_short_and_the_cli_says_so(tmp_path: Path) -> None:
    path = world(tmp_path, methods=[{"name": "good", "recipe": "respond.yaml"}, {"name": "tiny", "recipe": "two.yaml", "input": "recipe"},
                                    {"name": "none", "recipe": "nothing.yaml"}])
    # every seed is a test item, so a decontamination against both whole test sets leaves no pair at all
    (tmp_path / "nothing.yaml").write_text(yaml.safe_dump({"models": {}, "stages": [
        {"type": "respond", "role": "strong"}, {"type": "decontam", "testsets": [str(tmp_path / f"{ts}.jsonl") for ts in SETS]}]}))
    done = subprocess.run([sys.executable, "-m", "datatailor", "bakeoff", str(path), "--out", "out"],  # relative to cwd
                          env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c")), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    report = json.loads((tmp_path / "out" / "bakeoff_report.json").read_text())
    tiny = report["methods"]["tiny"]["data"]
    assert tiny["short"] and tiny["pairs"] <= 2
    none = report["methods"]["none"]
    assert none["data"]["pairs"] == 0 and none["testsets"] == {} and "none" not in report["ranking"]["ranking"]
    assert not (tmp_path / "out" / "methods" / "none" / "tuned").exists() and "(not trained, not judged)" in done.stdout
    assert "tiny (short)" in done.stdout and "fewer pairs than budget_pairs=4" in done.stdout
    assert "projected cost" in done.stdout
    # the plan said so before anything was spent: two.yaml reads 2 records, one pair each
    assert "warning: tiny can make at most 2 pairs from its 2 input records, below budget_pairs=4" in done.stdout
    assert "warning: good" not in done.stdout
    assert re.search(r"^\[bakeoff 0:\d\d\] good: data \(respond.yaml\)$", done.stderr, re.M)  # each step, timed


def test_a_method_that_cannot_work_fails_before_anything_is_spent(tmp_path: Path) -> None:
    path = world(tmp_path)
    (tmp_path / "respond.yaml").write_text(yaml.safe_dump({"models": {}, "stages": [{"type": "respond", "role": "nobody"}]}))
    with pytest.raises(UserError, match="nobody"):
        prepare(load_bakeoff(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a method that keeps its own input is checked against that input: its pairs have no response to select on
    (tmp_path / "respond.yaml").write_text(yaml.safe_dump({"models": {}, "stages": [{"type": "respond", "role": "strong"}]}))
    (tmp_path / "leaky.yaml").write_text(yaml.safe_dump({"models": {}, "input": "leaky_input.jsonl", "stages": [
        {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.other", "keep": "a"}]}))
    with pytest.raises(UserError, match=r"method leaky \(leaky.yaml\) cannot work"):
        prepare(load_bakeoff(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError):
        BakeoffConfig.model_validate({"budget_pairs": 2, "testsets": ["x"], "models": {}, "methods": [{"name": "a"}],
                                      "train": {"base": "b"}})


def test_resume_after_kill_9_and_zero_calls_on_a_rerun(tmp_path: Path) -> None:
    path = world(tmp_path, latency=0.02)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datatailor", "bakeoff", str(path), "--out", str(out)]
    marker = out / "methods" / "odd" / "run" / "stages"
    kill_9_when(cmd, cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c1")), lambda: marker.exists(), timeout_s=120)
    assert not (out / "bakeoff_report.json").exists()
    resumed = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c2")), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    clean = run_bakeoff(load_bakeoff(path), tmp_path / "clean", log_stream=None)
    report = json.loads((out / "bakeoff_report.json").read_text())
    strip = lambda r: {n: {k: v for k, v in m.items() if k not in ("data",)} for n, m in r["methods"].items()}  # noqa: E731
    assert strip(report) == strip(clean) and report["ranking"] == clean["ranking"]
    # the good method finished before the kill: its run was not asked again
    good_usage = json.loads((out / "methods" / "good" / "run" / "usage.json").read_text())
    assert good_usage["run"]["all"]["requests"] == 0
    again = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c3")), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    requests = [json.loads(p.read_text())["run"]["all"]["requests"] for p in out.glob("methods/*/**/usage.json")]
    assert len(requests) >= 7 and sum(requests) == 0  # a fresh cache, yet not one call: everything was finished


def test_bootstrap_intervals_on_known_cases() -> None:
    half = ["win", "loss"] * 500
    r = bootstrap({"coin": half, "all": ["tie"] * 1000, "none": ["loss"] * 1000}, resamples=2000, seed=0)
    coin = r["methods"]["coin"]
    # CRR 0.5 over 1000 items: the normal approximation's 95 % interval is 0.5 ± 0.031
    assert coin["crr"] == 0.5 and 0.462 < coin["low"] < 0.476 and 0.524 < coin["high"] < 0.538
    assert (r["methods"]["all"]["low"], r["methods"]["all"]["high"]) == (1.0, 1.0)
    assert r["ranking"] == ["all", "coin", "none"]
    assert all(d["differs"] for d in r["differences"])
    close = bootstrap({"a": ["win"] * 51 + ["loss"] * 49, "b": ["win"] * 49 + ["loss"] * 51}, resamples=2000, seed=0)
    assert not close["differences"][0]["differs"]  # 2 points apart on 100 items: within the noise
    assert close["ranking"] == ["a", "b"]
    # paired: b is a with 6 of its 50 wins lost, on the same items. Compared item by item the 6-point gap is clear;
    # resampled independently (each method its own items) it would be lost in each method's ±10-point noise
    a = ["win"] * 50 + ["loss"] * 50
    paired = bootstrap({"a": a, "b": ["loss"] * 6 + a[6:]}, resamples=2000, seed=0)
    assert paired["differences"][0]["differs"] and 0 < paired["differences"][0]["low"] < 0.06 < paired["differences"][0]["high"]
    with pytest.raises(ValueError):
        bootstrap({"a": ["win"], "b": ["win", "loss"]}, resamples=100, seed=0)
    same = bootstrap({"a": half}, resamples=500, seed=3)
    assert same == bootstrap({"a": half}, resamples=500, seed=3) and np.isfinite(same["methods"]["a"]["low"])


@pytest.mark.parametrize("name", ["local.yaml", "openai.yaml"])
def test_the_example_bakeoffs_check_out(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datatailor.bakeoff.projection import project, render
    from tests.conftest import REPO

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    plan = prepare(load_bakeoff(REPO / "examples" / "bakeoff" / name), tmp_path / "out")
    assert [m.name for m in plan.methods][-1] == "untuned" and len(plan.methods) >= 4
    projected = project(plan)
    assert projected["complete"] and projected["calls"] > projected["counted_calls"] > 0
    # every method can reach the budget: none is capped below it by its seeds or its recipe
    assert projected["warnings"] == [] and "warning" not in render(projected)
    for row in projected["rows"]:
        if "data" in row:
            most = row["data"]["pairs"]["most"]
            assert most is None or most >= plan.config.budget_pairs, row["method"]
    if name == "openai.yaml":  # the list: CodecLM from seeds and metadata, REFED and a variant, CoachLM, TeaMs-RL, baselines
        from datatailor.stages import STAGES

        families = [tuple(dict.fromkeys(STAGES[c.type].method for c in m.recipe.stages if STAGES[c.type].method)) for m in plan.methods if m.recipe]
        assert {("codec",), ("refed",), ("self_instruct", "coachlm"), ("teams_rl",), ("self_instruct",), ("evol",)} <= set(families)
        assert families.count(("codec",)) == 2 and families.count(("refed",)) == 2
        assert any(c.type == "codec.metadata" for m in plan.methods if m.recipe for c in m.recipe.stages)
        assert sum(len(s.seeds) for s in plan.splits) == 66
        rows = {r["method"]: r["data"] for r in projected["rows"] if "data" in r}
        stages = {m: {s["stage"]: s for s in d["stages"]} for m, d in rows.items()}
        # TeaMs-RL's policy training is counted: 200 updates × 4 episodes × 6 steps × (a rewrite + a review)
        assert stages["teams-rl"]["teams.train"]["calls"] == {"value": 9600, "most": 9600, "kind": "at most"}
        # generation per seed before the trim: 66 seeds × 4 episodes × 6 steps rewrites, and 6 chains × 4 rounds
        assert stages["teams-rl"]["teams.generate"]["pairs"]["most"] == 66 * 4 * 6
        assert stages["evol-instruct"]["evol.evolve"]["pairs"]["most"] == 66 * 6 * 4
        assert stages["evol-instruct"]["evol.evolve"]["calls"]["kind"] == "estimate"
        assert stages["self-instruct-coachlm"]["respond"]["calls"] == {"value": 1000, "most": 1000, "kind": "at most"}
        text = render(projected)
        assert "9,600 (at most) calls" in text and "(estimate)" in text
    assert not (tmp_path / "out").exists()  # checking spends and writes nothing


def test_the_plan_knows_every_stage() -> None:
    """A stage the plan has no rule for shows as '?' in it: every registered stage has one (add it to flow.RULES)."""
    from datatailor.bakeoff.flow import RULES
    from datatailor.stages import load_all

    assert sorted(set(load_all()) - set(RULES)) == []


def test_the_plan_counts_what_the_recipes_then_do(tmp_path: Path) -> None:
    """Projected against made, on scripted models: what the recipes fix (an answer per seed, TeaMs-RL's training and
    its 6 rewrites per episode, the ratings, the judging) is counted exactly, per stage and in total, including the
    generation from every seed before the trim; what depends on the models (Evol-Instruct's survivors) is labelled
    an estimate and stays within its bound; a method capped below budget_pairs is warned about before anything runs."""
    from datatailor.bakeoff.projection import project, render

    teams_models = {"rewriter": {"backend": "scripted", "model": "rw", "handler": "tests.test_teams:rewriter"},
                    "reviewer": {"backend": "scripted", "model": "rv", "rules": [{"match": ".*", "reply": "Not Equal"}]},
                    "expert": {"backend": "scripted", "model": "ex", "handler": "tests.test_teams:expert"},
                    "evolver": {"backend": "scripted", "model": "ev", "handler": "tests.test_teams:expert"}}
    path = world(tmp_path, methods=[{"name": "good", "recipe": "respond.yaml"}, {"name": "teams", "recipe": "teams.yaml"},
                                    {"name": "evol", "recipe": "evol.yaml"}, {"name": "base", "untuned": True}])
    (tmp_path / "teams.yaml").write_text(yaml.safe_dump({"models": teams_models, "stages": [
        {"type": "teams.train", "updates": 2, "n_envs": 2},
        {"type": "teams.generate", "schedule": "random", "keep": "all", "elimination": False}]}))
    (tmp_path / "evol.yaml").write_text(yaml.safe_dump({"models": teams_models, "stages": [
        {"type": "evol.evolve", "rounds": 2, "role": "evolver", "responder_role": "evolver", "equal_role": "reviewer"}]}))
    plan = prepare(load_bakeoff(path), tmp_path / "out")
    projected = project(plan)
    rows = {r["method"]: r for r in projected["rows"]}
    seeds = sum(SEEDS.values())
    assert [s["calls"]["value"] for s in rows["good"]["data"]["stages"] if s["calls"]["value"]] == [seeds]
    teams = {s["stage"]: s for s in rows["teams"]["data"]["stages"]}
    assert teams["teams.train"]["calls"]["value"] == 2 * 2 * 6 * 2
    assert teams["teams.generate"]["calls"]["value"] == seeds * 6 * 2 and teams["teams.generate"]["pairs"]["value"] == seeds * 6
    evol = {s["stage"]: s for s in rows["evol"]["data"]["stages"]}["evol.evolve"]
    assert evol["calls"]["kind"] == "estimate" and evol["calls"]["most"] == seeds * 2 * 3
    assert projected["warnings"] == []

    run_bakeoff(load_bakeoff(path), tmp_path / "out", log_stream=None)
    out = tmp_path / "out" / "methods"
    made = {m: json.loads((out / m / "run" / "usage.json").read_text())["total"] for m in ("good", "teams", "evol")}
    assert made["good"]["all"]["requests"] == rows["good"]["data"]["calls"]["value"] == seeds
    assert made["teams"]["stages"]["teams.train"]["requests"] == teams["teams.train"]["calls"]["value"]
    assert made["teams"]["stages"]["teams.generate"]["requests"] == teams["teams.generate"]["calls"]["value"]
    assert made["teams"]["all"]["requests"] == rows["teams"]["data"]["calls"]["value"]
    assert 0 < made["evol"]["all"]["requests"] <= evol["calls"]["most"]
    # the pairs each method made from every seed before the bake-off's trim kept 4
    manifest = json.loads((out / "teams" / "run" / "manifest.json").read_text())
    assert {s["name"]: s["outputs"] for s in manifest["stages"]}["teams.generate"] == rows["teams"]["data"]["made"]["value"]
    judged = sum(json.loads(p.read_text())["total"]["all"]["requests"] for p in out.glob("*/eval/*/run/usage.json"))
    rated = sum(json.loads(p.read_text())["total"]["all"]["requests"] for p in out.glob("*/rate/run/usage.json"))
    assert judged == projected["shared"]["reference_calls"] + sum(r["eval_calls"] for r in projected["rows"])
    assert rated == sum(r.get("rating_calls", 0) for r in projected["rows"])
    # everything but Evol-Instruct's estimate was counted, and counted right
    assert projected["counted_calls"] == judged + rated + made["good"]["all"]["requests"] + made["teams"]["all"]["requests"]

    # a budget above what a method can make from these seeds: warned before anything is spent, and said why
    tight = world(tmp_path / "tight", budget_pairs=seeds + 1, methods=[{"name": "good", "recipe": "respond.yaml"},
                                                                      {"name": "teams", "recipe": "teams.yaml"}])
    (tmp_path / "tight" / "teams.yaml").write_text((tmp_path / "teams.yaml").read_text())
    text = render(project(prepare(load_bakeoff(tight), tmp_path / "tight" / "out")))
    assert f"warning: good can make at most {seeds} pairs from its {seeds} input records, below budget_pairs={seeds + 1}" in text
    assert "warning: teams" not in text  # 6 steps per seed: at most 60
