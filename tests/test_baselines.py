"""Self-Instruct baseline: ROUGE-L, the novelty filter, Self-Instruct's cheap filters, and budget sizing."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from datatailor.llm.base import CompletionRequest
from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from datatailor.scoring.text import lcs_length, rouge_l, rouge_tokens
from datatailor.stages.baselines import NoveltyIndex, candidate_problem

VOCAB = [f"w{i}" for i in range(400)]


def generator(request: CompletionRequest) -> str:
    """Per call: a near copy of the first demo (ROUGE-L ≥ 0.7), a blocked task, a too-short one, an exact copy of
    the second demo, and four novel tasks made of random words (seeded by the call's sampling seed)."""
    if request.template == "baselines/self_instruct.j2":
        demos = request.variables["demos"]
        rng = random.Random(request.sampling.seed)
        near = demos[0].rsplit(" ", 1)[0] + " quickly"
        novel = [f"Explain {' '.join(rng.sample(VOCAB, 8))} to a beginner." for _ in range(4)]
        items = [near, "Draw a picture of a lighthouse at dusk.", "Hi.", demos[1], *novel]
        return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items))
    return "A helpful answer."


MODELS = {"strong": {"backend": "scripted", "model": "gen", "handler": "tests.test_baselines:generator"}}

SEEDS = [
    "Write a short poem about the autumn rain falling on the old city roofs",
    "Give three tips for keeping a houseplant alive during a cold winter",
    "Summarize the story of a famous novel in two sentences for a child",
    "Translate the following greeting into French and explain its tone",
    "List five healthy breakfast ideas that take less than ten minutes",
]


STATS = "stages/00-self_instruct/self_instruct_stats.json"


def run_self_instruct(tmp_path: Path, stage: dict[str, Any] | None = None, budget: int = 10, seed: int = 0,
                      status: str = "complete") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS), encoding="utf-8")
    recipe = parse_recipe(
        {"models": MODELS, "input": str(path), "budget_pairs": budget, "seed": seed, "cache": False,
         "stages": [{"type": "self_instruct", "concurrency": 2, **(stage or {})}, {"type": "respond"}]},
        "test-self-instruct", tmp_path,
    )
    out = tmp_path / "out"
    assert run_recipe_sync(recipe, out, show_progress=False).status == status
    return out


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_rouge_l_values() -> None:
    a = rouge_tokens("The cat sat on the mat.")
    assert a == ["the", "cat", "sat", "on", "the", "mat"]
    assert rouge_l(a, a) == 1.0
    assert rouge_l(a, rouge_tokens("Dogs bark loudly")) == 0.0
    assert lcs_length(["a", "b", "c", "d"], ["b", "d", "a"]) == 2
    b = rouge_tokens("the cat lay on a mat")
    # LCS "the cat on mat" = 4; P = 4/6, R = 4/6.
    assert rouge_l(a, b) == pytest.approx(4 / 6)
    assert rouge_l([], a) == 0.0


def test_rouge_l_matches_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(7)
    words = ["the", "a", "cat", "dog", "runs", "fast", "slowly", "over", "hill", "x-ray", "2024", "Big"]
    for _ in range(200):
        s1 = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        s2 = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        expected = scorer.score(s1, s2)["rougeL"].fmeasure
        assert rouge_l(rouge_tokens(s1), rouge_tokens(s2)) == pytest.approx(expected)


def test_novelty_index_pruning_finds_the_true_maximum() -> None:
    rng = random.Random(3)
    words = [f"t{i}" for i in range(15)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(60)]
    index = NoveltyIndex()
    for i, t in enumerate(texts[:40]):
        index.add(str(i), t)
    for t in texts[40:]:
        best, best_id = index.closest(t)
        brute = max(rouge_l(rouge_tokens(t), rouge_tokens(o)) for o in texts[:40])
        assert best == pytest.approx(brute)
        assert best_id is not None and rouge_l(rouge_tokens(t), rouge_tokens(texts[int(best_id)])) == pytest.approx(brute)


def test_cheap_filters() -> None:
    assert candidate_problem("Hi.", 3, 150, ["image"]) == "too_short"
    assert candidate_problem("word " * 151, 3, 150, ["image"]) == "too_long"
    assert candidate_problem("Describe the image below in detail.", 3, 150, ["image"]) == "blocked_word"
    assert candidate_problem("Describe the imagery of this poem.", 3, 150, ["image"]) is None
    assert candidate_problem("- Describe a poem here.", 3, 150, []) == "starts_with_punctuation"


def test_novelty_filter_rejects_similar_candidates_and_meets_the_budget(tmp_path: Path) -> None:
    out = run_self_instruct(tmp_path, budget=10)
    data = rows(out / "data.jsonl")
    assert len(data) == 10
    assert all(r["response"] == "A helpful answer." for r in data)
    stats = json.loads((out / STATS).read_text())
    assert stats["target"] == 10 and stats["reached"] is True and stats["accepted"] == 10
    # Each call yields 4 novel tasks. Round 1 runs 2 calls (the concurrency) → 8; round 2 runs only the 1 call
    # still needed, whose last 2 novel tasks exceed the target.
    assert stats["calls"] == 3
    assert stats["rouge_l_too_similar"] == 2 * 3  # near copy + exact copy of a demo in each screened call
    assert stats["blocked_word"] == 3 and stats["too_short"] == 3
    pool = SEEDS + [r["instruction"] for r in data]
    for i, r in enumerate(data):
        md = r["metadata"]["self_instruct"]
        assert md["max_rouge_l"] < 0.7 and len(md["demos"]) == 3 and set(md["demos"]) <= set(SEEDS)
        others = pool[: len(SEEDS) + i]
        assert max(rouge_l(rouge_tokens(r["instruction"]), rouge_tokens(o)) for o in others) < 0.7


def test_every_accepted_candidate_is_novel_against_later_ones_too(tmp_path: Path) -> None:
    data = rows(run_self_instruct(tmp_path, budget=12) / "data.jsonl")
    texts = [r["instruction"] for r in data]
    assert len(set(texts)) == len(texts)
    for i in range(len(texts)):
        for j in range(i):
            assert rouge_l(rouge_tokens(texts[i]), rouge_tokens(texts[j])) < 0.7


def test_machine_demos_and_threshold_are_configurable(tmp_path: Path) -> None:
    out = run_self_instruct(tmp_path / "a", {"machine_demos": 2, "rouge_threshold": 0.99}, budget=12)
    data = rows(out / "data.jsonl")
    stats = json.loads((out / STATS).read_text())
    # With a 0.99 threshold the near copy of a demo passes; the exact copy still does not.
    assert any(r["instruction"].endswith(" quickly") for r in data)
    assert stats["rouge_l_too_similar"] >= 1
    assert any(len(r["metadata"]["self_instruct"]["demos"]) == 5 for r in data)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = run_self_instruct(tmp_path / "a", seed=1)
    b = run_self_instruct(tmp_path / "b", seed=1)
    c = run_self_instruct(tmp_path / "c", seed=2)
    assert (a / "data.jsonl").read_bytes() == (b / "data.jsonl").read_bytes()
    demos = lambda out: [r["metadata"]["self_instruct"]["demos"] for r in rows(out / "data.jsonl")]  # noqa: E731
    assert demos(a) != demos(c)


def test_max_calls_stops_a_model_that_never_delivers(tmp_path: Path) -> None:
    out = run_self_instruct(tmp_path, {"max_calls": 1, "concurrency": 1}, budget=10, status="shortfall")
    stats = json.loads((out / STATS).read_text())
    assert stats["calls"] == 1 and stats["reached"] is False and stats["accepted"] == 4
    assert len(rows(out / "data.jsonl")) == 4
    shortfall = json.loads((out / "manifest.json").read_text())["shortfall"]
    assert shortfall["stage"] == "self_instruct" and shortfall["asked"] == 10 and shortfall["delivered"] == 4


# ----------------------------------------------------------------------------- boundaries of the filters


def fixed_candidates(request: CompletionRequest) -> str:
    """One call's candidates, routed by template name: see test_length_and_rouge_boundaries."""
    if request.template == "baselines/self_instruct.j2":
        base = [f"a{i}" for i in range(10)]
        items = [
            "Write a haiku.",                                   # 3 words: dropped (Alpaca keeps 4 or more)
            "Write a short haiku.",                             # 4 words: kept
            " ".join(base[:7] + ["b7", "b8", "b9"]),            # ROUGE-L exactly 0.70 with the seed: dropped
            " ".join(base[:7] + ["c7", "c8", "c9", "c10"]),     # ROUGE-L 0.67 with the seed: kept
        ]
        return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items))
    return "A helpful answer."


def test_length_and_rouge_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps({"instruction": " ".join(f"a{i}" for i in range(10))}) + "\n", encoding="utf-8")
    recipe = parse_recipe(
        {"models": {"strong": {"backend": "scripted", "model": "fixed", "handler": "tests.test_baselines:fixed_candidates"}},
         "input": str(path), "budget_pairs": 2, "cache": False,
         "stages": [{"type": "self_instruct", "seed_demos": 1, "max_calls": 1}, {"type": "respond"}]},
        "test-boundaries", tmp_path,
    )
    result = run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    kept = [r["instruction"] for r in rows(tmp_path / "out" / "data.jsonl")]
    assert result.status == "complete"
    assert kept == ["Write a short haiku.", "a0 a1 a2 a3 a4 a5 a6 c7 c8 c9 c10"]
    stats = json.loads((tmp_path / "out" / STATS).read_text())
    assert stats["too_short"] == 1 and stats["rouge_l_too_similar"] == 1


def test_a_model_that_never_writes_a_list_is_a_reported_shortfall(tmp_path: Path) -> None:
    """examples/self_instruct.yaml against a server whose replies are not numbered lists: 0 of 4, and the run says why."""
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS), encoding="utf-8")
    recipe = parse_recipe(
        {"models": {"strong": {"backend": "scripted", "model": "prose", "max_parse_retries": 0,
                               "rules": [{"match": ".*", "reply": "Sure! Here are some ideas you could try."}]}},
         "input": str(path), "budget_pairs": 4, "cache": False,
         "stages": [{"type": "self_instruct", "per_call": 4}, {"type": "respond"}]},
        "test-prose", tmp_path,
    )
    result = run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    assert result.status == "shortfall" and result.records == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "shortfall"
    assert manifest["shortfall"]["stage"] == "self_instruct"
    assert (manifest["shortfall"]["asked"], manifest["shortfall"]["delivered"]) == (4, 0)
    assert "0 replies that parsed as lists" in manifest["shortfall"]["why"]
