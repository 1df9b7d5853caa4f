"""`datatailor eval` / `rate` end to end with scripted models: the numbers in eval.json must be exactly
what the scripted judge implies, and bad input must end with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from datatailor.cli import main
from datatailor.llm.base import CompletionRequest

# Each test item names the answer the scripted candidate gives; the judge scores that answer against
# the reference answer "REF" (always 5) like this, per order:
#   GOOD 9 (win both orders)   SAME 5 (tie both)   BAD 2 (loss both)
#   FLIP: whoever is shown first gets 6 (order decides: a flip)
#   HALF: 7 when shown first, 5 when shown second (win + tie)
#   JUNK: the judge never gives two scores (unjudgeable: a loss over N, never a tie)
#   EMPTY: the candidate answers nothing (unanswered: a loss)
#   LONG: its answer is cut off by max_tokens; it is judged as written (the judge scores it 2: a loss) and counted
KEYS = ["GOOD", "GOOD", "SAME", "BAD", "FLIP", "HALF", "JUNK", "EMPTY", "LONG"]
FIRST = {"GOOD": 9, "SAME": 5, "BAD": 2, "FLIP": 6, "HALF": 7}  # the candidate's score when shown first
SECOND = {"GOOD": 9, "SAME": 5, "BAD": 2, "FLIP": 5, "HALF": 5}  # … when shown second (REF then gets 6 on FLIP)


JUDGE_TEMPERATURES: set[float] = set()


def judge(request: CompletionRequest) -> str:
    """The scripted judge: reads the two answers it was given (routing by template, not by wording)."""
    assert request.template == "judge/pairwise_scores.j2"
    JUDGE_TEMPERATURES.add(request.sampling.temperature)
    v = request.variables
    if v["answer_1"] == "REF":
        cand = "BAD" if v["answer_2"].startswith("LONG ") else v["answer_2"]
        if cand not in SECOND:
            return "I cannot decide between them."
        return f"{6 if cand == 'FLIP' else 5} {SECOND[cand]}"
    cand = "BAD" if v["answer_1"].startswith("LONG ") else v["answer_1"]
    if cand not in FIRST:
        return "I cannot decide between them."
    return f"{FIRST[cand]} 5"


def candidate(request: CompletionRequest) -> str:
    key = re.search(r"key=(\w+)", request.variables["instruction"]).group(1)
    return {"EMPTY": "", "LONG": "LONG " + "word " * 600, "LONGJUNK": "LONGJUNK " + "word " * 600}.get(key, key)


def models_yaml(tmp_path: Path, with_reference: bool = True) -> Path:
    models = {
        "candidate": {"backend": "scripted", "model": "cand", "handler": "tests.test_eval_cli:candidate"},
        "judge": {"backend": "scripted", "model": "judge", "handler": "tests.test_eval_cli:judge"},
    }
    if with_reference:
        models["reference"] = {"backend": "scripted", "model": "ref", "rules": [{"match": ".*", "reply": "REF"}]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}), encoding="utf-8")
    return path


def make_testset(tmp_path: Path, stored: bool = False) -> Path:
    path = tmp_path / "tiny.jsonl"
    rows = []
    for i, key in enumerate(KEYS, 1):
        row = {"id": f"t{i}", "instruction": f"Please answer key={key}", "category": "even" if i % 2 == 0 else "odd"}
        if stored:
            row["reference"] = "REF"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str) -> int:
    return main([*args, "--no-progress"]) if args[0] in ("eval", "rate") else main(list(args))


def test_eval_numbers_match_the_scripted_judge(tmp_path: Path) -> None:
    JUDGE_TEMPERATURES.clear()
    out = tmp_path / "ev"
    code = run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)), "--out", str(out))
    assert code == 0
    ev = json.loads((out / "eval.json").read_text())
    # N is the whole test set: the unjudgeable JUNK and the unanswered EMPTY are losses; LONG was cut off, judged, lost.
    assert (ev["items"], ev["judged"], ev["unanswered"], ev["unjudgeable"]) == (9, 7, 1, 1)
    assert ev["failures"] == {"judge:parse_error": 1, "answer-candidate:empty_response": 1}
    assert ev["truncated_answers"] == 1 and ev["truncated_by_rule"]["strict"]["losses"] == 1
    strict = ev["by_rule"]["strict"]
    assert (strict["wins"], strict["ties"], strict["losses"], strict["n"]) == (2, 3, 4, 9)
    assert strict["crr"] == pytest.approx(5 / 9)
    assert strict["wr1"] == pytest.approx((2 + 1.5) / 9)
    assert strict["wr2"] == pytest.approx(2 / 6)
    assert strict["qs"] == pytest.approx(5 / 9)
    assert ev["metrics"] == strict and ev["rule"] == "strict"
    assert JUDGE_TEMPERATURES == {0.0}  # the judge is asked at temperature 0 (the papers)
    judged_only = ev["judged_only"]["metrics"]
    assert (judged_only["wins"], judged_only["ties"], judged_only["losses"], judged_only["n"]) == (2, 3, 2, 7)
    lenient, mean = ev["by_rule"]["lenient"], ev["by_rule"]["mean"]
    assert (lenient["wins"], lenient["ties"], lenient["losses"]) == (3, 2, 4)
    assert (mean["wins"], mean["ties"], mean["losses"]) == (3, 2, 4)
    assert ev["position_consistency"] == pytest.approx(5 / 7)
    assert ev["flip_rate"] == pytest.approx(1 / 7)
    assert ev["consistency_warning"] is None
    assert ev["models"]["reference"] == {"backend": "scripted", "model": "ref"}
    # odd items: GOOD(1) SAME(3) FLIP(5) JUNK(7) LONG(9); even: GOOD(2) BAD(4) HALF(6) EMPTY(8)
    odd, even = ev["by_category"]["odd"], ev["by_category"]["even"]
    assert (odd["wins"], odd["ties"], odd["losses"], odd["n"]) == (1, 2, 2, 5)
    assert (even["wins"], even["ties"], even["losses"], even["n"]) == (1, 1, 2, 4)
    # raw scores of both orders are kept per item
    data = [json.loads(line) for line in (out / "run" / "data.jsonl").read_text().splitlines()]
    half = next(r for r in data if "HALF" in r["instruction"])
    assert half["metadata"]["judge"]["a_first"] == [7.0, 5.0] and half["metadata"]["judge"]["b_first"] == [5.0, 5.0]
    md = (out / "eval.md").read_text()
    assert "CRR 55.56" in md and "N = 9 (the whole test set): 7 judged, 1 unanswered by the candidate, 1 unjudgeable" in md
    assert "Judged items only (not the headline): CRR 71.43" in md
    assert "1 of the candidate's answers were cut off by max_tokens and judged as written (W/T/L 0/0/1" in md
    usage = json.loads((out / "run" / "usage.json").read_text())
    assert usage["run"]["roles"]["judge"]["requests"] > 0


def first_wins(request: CompletionRequest) -> str:
    """A judge that always prefers whichever answer it sees first (what a 0.5B judge does)."""
    return "8 4"


def test_a_judge_dominated_by_answer_order_is_called_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = yaml.safe_load(models_yaml(tmp_path).read_text())
    models["models"]["judge"] = {"backend": "scripted", "model": "lazy", "handler": "tests.test_eval_cli:first_wins"}
    path = tmp_path / "lazy.yaml"
    path.write_text(yaml.safe_dump(models), encoding="utf-8")
    out = tmp_path / "ev"
    assert run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(path), "--out", str(out)) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["position_consistency"] == 0.0
    assert "dominated by which answer it sees first" in ev["consistency_warning"]
    assert "not meaningful" in (out / "eval.md").read_text()
    assert "not meaningful" in capsys.readouterr().err
    # a stricter threshold is a parameter
    out2 = tmp_path / "ev2"
    assert run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)),
                   "--out", str(out2), "--consistency-threshold", "0.9") == 0
    assert json.loads((out2 / "eval.json").read_text())["consistency_warning"]  # 4 of 6 consistent < 90 %


def sampled_candidate(request: CompletionRequest) -> str:
    """Answers depend on the call's sampling seed, as a real model's do at temperature > 0."""
    return f"answer {request.sampling.seed % 1000}"


def tie_judge(request: CompletionRequest) -> str:
    return "5 5"


def test_the_seed_reaches_the_models(tmp_path: Path) -> None:
    models = yaml.safe_load(models_yaml(tmp_path).read_text())
    models["models"]["candidate"] = {"backend": "scripted", "model": "s", "temperature": 0.7,
                                     "handler": "tests.test_eval_cli:sampled_candidate"}
    models["models"]["judge"] = {"backend": "scripted", "model": "tie", "handler": "tests.test_eval_cli:tie_judge"}
    path = tmp_path / "sampled.yaml"
    path.write_text(yaml.safe_dump(models), encoding="utf-8")

    def answers(seed: int, name: str) -> list[str]:
        out = tmp_path / name
        assert run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(path), "--out", str(out),
                       "--seed", str(seed), "--limit", "4") == 0
        return [json.loads(line)["response"] for line in (out / "run" / "data.jsonl").read_text().splitlines()]

    assert answers(0, "a") == answers(0, "b")
    assert answers(0, "a") != answers(1, "c")


def test_eval_resume_makes_no_new_calls(tmp_path: Path) -> None:
    args = ["eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)), "--out", str(tmp_path / "ev")]
    assert run_cli(*args) == 0
    first = (tmp_path / "ev" / "eval.json").read_text()
    assert run_cli(*args) == 0
    usage = json.loads((tmp_path / "ev" / "run" / "usage.json").read_text())
    assert usage["run"]["all"]["requests"] == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert again["by_rule"] == json.loads(first)["by_rule"]


def test_eval_with_stored_references_and_flag_override(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    models = models_yaml(tmp_path, with_reference=False)
    code = run_cli("eval", "--testset", str(make_testset(tmp_path, stored=True)), "--models", str(models),
                   "--reference", "stored", "--judge", "role:judge", "--limit", "4", "--out", str(out))
    assert code == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["models"]["reference"] == "stored"
    assert ev["items"] == 4
    strict = ev["by_rule"]["strict"]
    assert (strict["wins"], strict["ties"], strict["losses"]) == (2, 1, 1)
    stages = [s["name"] for s in json.loads((out / "run" / "manifest.json").read_text())["stages"]]
    assert stages == ["answer-candidate", "judge"]


@pytest.mark.parametrize(
    "args",
    [
        ["--testset", "no-such-testset"],
        ["--testset", "alpacaeval"],
        ["--testset", "vicuna80", "--candidate", "bogus:thing"],
        ["--testset", "vicuna80", "--judge", "role:nobody"],
        ["--testset", "vicuna80", "--rule", "majority"],
        ["--testset", "vicuna80", "--reference", "stored", "--candidate", "hf:x+"],
    ],
)
def test_eval_bad_input_exits_2(tmp_path: Path, args: list[str]) -> None:
    code = run_cli("eval", *args, "--models", str(models_yaml(tmp_path)), "--out", str(tmp_path / "ev"))
    assert code == 2
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_eval_bad_models_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("models:\n  judge: {backend: scripted, model: j, temperature: 9}\n", encoding="utf-8")
    assert run_cli("eval", "--testset", "vicuna80", "--models", str(bad), "--out", str(tmp_path / "ev")) == 2
    bad.write_text("models: [1, 2\n", encoding="utf-8")
    assert run_cli("eval", "--testset", "vicuna80", "--models", str(bad), "--out", str(tmp_path / "ev")) == 2


def test_eval_stored_without_references_exits_2(tmp_path: Path) -> None:
    code = run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)),
                   "--reference", "stored", "--out", str(tmp_path / "ev"))
    assert code == 2


def test_rate_reports_quality_histogram(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    scores = {"a": "5", "b": "4.5", "c": "4", "d": "3.5", "e": "Score: 1\nwrong"}
    data.write_text("".join(json.dumps({"instruction": f"task {k}", "output": f"answer {k}"}) + "\n" for k in scores), encoding="utf-8")
    rules = [{"match": rf"task {k}\b", "reply": v} for k, v in scores.items()]
    models = tmp_path / "m.yaml"
    models.write_text(yaml.safe_dump({"judge": {"backend": "scripted", "model": "rater", "rules": rules}}), encoding="utf-8")
    out = tmp_path / "q"
    assert run_cli("rate", str(data), "--models", str(models), "--out", str(out)) == 0
    q = json.loads((out / "quality.json").read_text())
    assert q["n"] == 5
    assert q["histogram"] == {"[0,3.5)": 1, "[3.5,4)": 1, "[4,4.5)": 1, "[4.5,5]": 2}
    assert q["mean"] == pytest.approx((5 + 4.5 + 4 + 3.5 + 1) / 5)
    assert q["high_quality_share"] == pytest.approx(2 / 5)
    rated = [json.loads(line) for line in (out / "run" / "data.jsonl").read_text().splitlines()]
    assert [r["metadata"]["quality"] for r in rated] == [5.0, 4.5, 4.0, 3.5, 1.0]


def test_rate_keeps_and_counts_a_pair_whose_rating_does_not_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"task {k}", "output": f"answer {k}"}) + "\n" for k in "ab"), encoding="utf-8")
    rules = [{"match": r"task a\b", "reply": "Score: 4"}, {"match": r"task b\b", "reply": "It depends on what you need."},
             {"reply": "I still cannot put a number on it."}]  # the re-asks
    models = tmp_path / "m.yaml"
    models.write_text(yaml.safe_dump({"judge": {"backend": "scripted", "model": "rater", "rules": rules}}), encoding="utf-8")
    out = tmp_path / "q"
    assert run_cli("rate", str(data), "--models", str(models), "--out", str(out)) == 0
    q = json.loads((out / "quality.json").read_text())
    assert (q["n"], q["unrated"], q["mean"], q["failures"]) == (1, 1, 4.0, {})
    rated = [json.loads(line) for line in (out / "run" / "data.jsonl").read_text().splitlines()]
    assert [r["metadata"]["quality"] for r in rated] == [4.0, None]
    assert "1 pair(s) unrated" in capsys.readouterr().err


def test_rate_needs_out_for_a_file(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n", encoding="utf-8")
    assert run_cli("rate", str(data), "--judge", "local:gemma-3-270m") == 2


def test_export_decontaminate_drops_and_reports(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"instruction": "How can I improve my time management skills?", "output": "Plan your day."},  # Vicuna Q1
        {"instruction": "Write a limerick about a cat.", "output": "There once was a cat..."},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "train.jsonl"
    assert main(["export", str(data), "--out", str(out), "--decontaminate", "vicuna80,selfinstruct252"]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in kept] == ["Write a limerick about a cat."]
    report = json.loads((tmp_path / "train.decontam.json").read_text())
    assert report["testsets"] == ["vicuna80", "selfinstruct252"]
    assert report["flagged_pairs"] == 1 and report["kept"] == 1
    assert report["dropped"][0]["matches"][0]["item_id"] == "1"
    assert main(["export", str(data), "--out", str(out), "--decontaminate", "nosuchset"]) == 2


def test_model_spec_shorthands(tmp_path: Path) -> None:
    from datatailor.errors import UserError
    from datatailor.evaluate.modelspec import parse_model_spec

    local = parse_model_spec("local:gemma-3-270m")
    assert (local.backend, local.model) == ("llamacpp", "local:gemma-3-270m")
    hf = parse_model_spec("hf:local:gemma-3-270m+runs/tuned/adapter", base_dir=tmp_path)
    assert (hf.backend, hf.model, hf.adapter) == ("hf", "local:gemma-3-270m", str(tmp_path / "runs/tuned/adapter"))
    served = parse_model_spec("openai:qwen@http://127.0.0.1:8080/v1")
    assert (served.backend, served.base_url, served.api_key_env) == ("openai", "http://127.0.0.1:8080/v1", None)
    hosted = parse_model_spec("openai:gpt-4o-mini")
    assert hosted.api_key_env == "OPENAI_API_KEY"
    for bad in ("gpt-4", "openai:m@ftp://x", "role:strong", "hf:"):
        with pytest.raises(UserError):
            parse_model_spec(bad)
    # a `datatailor train` output folder says how to load it
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "train_report.json").write_text(json.dumps(
        {"use_as": {"backend": "hf", "model": "local:gemma-3-270m", "adapter": str(tuned)}}), encoding="utf-8")
    trained = parse_model_spec(f"hf:{tuned}")
    assert (trained.model, trained.adapter) == ("local:gemma-3-270m", str(tuned))
    (tuned / "train_report.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="use_as"):
        parse_model_spec(f"hf:{tuned}")


def test_eval_refuses_a_folder_of_other_items(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    base = ["eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)), "--out", str(out)]
    assert run_cli(*base, "--limit", "2") == 0
    before = (out / "testset.jsonl").read_text()
    assert run_cli(*base, "--limit", "3") == 2
    assert (out / "testset.jsonl").read_text() == before  # nothing overwritten
    assert run_cli(*base, "--limit", "3", "--force") == 0
    assert json.loads((out / "eval.json").read_text())["items"] == 3


def test_diversity_command(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [{"instruction": "a b c", "output": "x y"}, {"instruction": "a b d", "output": "x"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "div.json"
    assert main(["diversity", str(data), "--no-embeddings", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 2
    assert report["distinct_1"] == pytest.approx(4 / 6) and report["distinct_2"] == pytest.approx(3 / 4)
    assert report["embedding_distance"] is None
    assert report["response_length"]["mean"] == pytest.approx(1.5)
    assert main(["diversity", str(tmp_path / "missing.jsonl"), "--no-embeddings"]) == 2


# ----------------------------------------------------------------------------- cut-off answers, categories, bake-off figures


def test_a_base_model_that_rambles_to_the_limit_is_judged_not_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """12 held-out questions, every answer cut off by max_tokens (an untuned base model): the evaluation completes,
    the cut answers are judged as written, and the report counts them — two the judge could not score included."""
    keys = ["LONG"] * 5 + ["LONGJUNK"] + ["LONG"] * 5 + ["LONGJUNK"]
    testset = tmp_path / "base.jsonl"
    testset.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"Please answer key={k}"}) + "\n"
                               for i, k in enumerate(keys)), encoding="utf-8")
    out = tmp_path / "ev"
    assert run_cli("eval", "--testset", str(testset), "--models", str(models_yaml(tmp_path)), "--out", str(out)) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert (ev["items"], ev["judged"], ev["unanswered"], ev["unjudgeable"], ev["truncated_answers"]) == (12, 10, 0, 2, 12)
    cut = ev["truncated_by_rule"]["strict"]
    assert (cut["wins"], cut["ties"], cut["losses"], cut["n"]) == (0, 0, 12, 12)
    data = [json.loads(line) for line in (out / "run" / "data.jsonl").read_text().splitlines()]
    assert all(r["response"].startswith("LONG word word") and len(r["response"].split()) == 512 for r in data)
    assert all(any(e["stage"] == "answer-candidate" and e["details"].get("truncated") for e in r["lineage"]) for r in data)
    assert "12 of the candidate's answers were cut off by max_tokens and judged as written (W/T/L 0/0/12" in (out / "eval.md").read_text()
    assert "12 of the candidate's answers were cut off by max_tokens" in capsys.readouterr().err


def test_per_category_tables_follow_the_chosen_rule(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    assert run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)), "--out", str(out),
                   "--rule", "lenient") == 0
    ev = json.loads((out / "eval.json").read_text())
    # even items: GOOD win, BAD loss, HALF (a win and a tie: a win under the lenient rule, a tie under strict), EMPTY loss
    even, odd = ev["by_category"]["even"], ev["by_category"]["odd"]
    assert (ev["rule"], even["wins"], even["ties"], even["losses"]) == ("lenient", 2, 0, 2)
    assert (odd["wins"] + even["wins"], odd["ties"] + even["ties"], odd["losses"] + even["losses"]) == (3, 2, 4)
    assert ev["metrics"] == ev["by_rule"]["lenient"]


def test_the_bakeoff_reads_the_same_outcomes_and_per_pair_figures(tmp_path: Path) -> None:
    """What the bake-off takes from an evaluation run: each item's outcome (an unanswered or unjudgeable item is a
    loss, as in eval.json), and per-pair cost figures over the method's final pairs."""
    import shutil
    from types import SimpleNamespace

    from datatailor.bakeoff.report import collect, item_outcomes
    from datatailor.io import read_records

    eval_dir = tmp_path / "m1" / "eval" / "tiny"
    assert run_cli("eval", "--testset", str(make_testset(tmp_path)), "--models", str(models_yaml(tmp_path)), "--out", str(eval_dir)) == 0
    ev = json.loads((eval_dir / "eval.json").read_text())
    outcomes = item_outcomes(eval_dir, "strict")
    assert outcomes == ["win", "win", "tie", "loss", "tie", "tie", "loss", "loss", "loss"]  # KEYS in order
    strict = ev["by_rule"]["strict"]
    assert [outcomes.count(o) for o in ("win", "tie", "loss")] == [strict["wins"], strict["ties"], strict["losses"]]

    items = read_records(eval_dir / "testset.jsonl")
    split = SimpleNamespace(name="tiny", seeds=[], evaluation=items, testset=SimpleNamespace(source="tiny.jsonl", records=items))
    config = SimpleNamespace(budget_pairs=2, seed=0, eval_limit=None, name="t",
                             eval=SimpleNamespace(rule="strict", bootstrap=200, consistency_threshold=0.6))
    plan = SimpleNamespace(config=config, splits=[split], folder=lambda name: tmp_path / name)
    rows = {}
    for name in ("m1", "m2"):
        if name == "m2":
            shutil.copytree(tmp_path / "m1" / "eval", tmp_path / "m2" / "eval")
        run = tmp_path / name / "run"
        run.mkdir(parents=True)
        (run / "data.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "instruction": f"task {i}", "response": "answer"}) + "\n"
                                                for i in range(2)), encoding="utf-8")
        usage = {"requests": 6, "prompt_tokens": 100, "completion_tokens": 20, "cost_usd": 0.3}
        (run / "usage.json").write_text(json.dumps({"total": {"all": usage}}), encoding="utf-8")
        rows[name] = {"untuned": False, "recipe": "r.yaml", "eval": {"tiny": ev}, "data": {"status": "complete", "message": ""}}
    report = collect(plan, rows)  # type: ignore[arg-type]
    data = report["methods"]["m1"]["data"]
    assert (data["pairs"], data["requests_per_pair"], data["tokens_per_pair"], data["cost_per_pair"]) == (2, 3.0, 60.0, 0.15)
    assert report["ranking"]["methods"]["m1"]["crr"] == pytest.approx((2 + 3) / 9)  # the unjudged items are losses
    # the cut-off answer (LONG), judged as written, is counted in the bake-off too
    assert report["methods"]["m1"]["testsets"]["tiny"]["truncated_answers"] == 1
    assert any("judged as written" in note and "m1 on tiny 1" in note for note in report["notes"])
