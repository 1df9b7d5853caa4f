"""The `logprob` scoring mode: expected scores from token log-probabilities, offline.

The expectation math runs on hand-made logprobs; the pairwise judge and the 0–5 rating run on the
scripted backend; the OpenAI path on the mock server on 127.0.0.1; the llama.cpp and transformers
helpers on fake logits (no model is loaded).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from datatailor.errors import RecordFailure, UserError
from datatailor.llm.base import Completion, CompletionRequest, PositionLogprobs
from datatailor.llm.cache import RequestCache
from datatailor.llm.config import OpenAIModel, ScriptedModel
from datatailor.llm.llamacpp import TopLogprobRecorder, recorded_positions
from datatailor.llm.models import RoleModel, build_backend
from datatailor.llm.openai import parse_logprobs
from datatailor.llm.scripted import ScriptedBackend, one_hot_logprobs, scripted_tokens
from datatailor.llm.usage import UsageLedger
from datatailor.records import Record
from datatailor.scoring.judge import judge_pair
from datatailor.scoring.logprob import (
    LogprobsUnavailable,
    ScoreNotLocated,
    expected_score,
    expected_scores,
    require_expected,
    score_distribution,
    score_positions,
)
from datatailor.scoring.quality import rate_pair
from datatailor.testing import MockConfig, MockOpenAIServer


def pos(token: str, top: dict[str, float] | None = None) -> PositionLogprobs:
    """A position from probabilities (not logprobs), the generated token's own taken from `top`."""
    top = top or {token: 1.0}
    return PositionLogprobs(token=token, logprob=math.log(top.get(token, 1e-9)), top={t: math.log(p) for t, p in top.items()})


def plain(*tokens: str) -> list[PositionLogprobs]:
    return [pos(t) for t in tokens]


# ----------------------------------------------------------------------------- the expectation


def test_the_expectation_is_renormalised_over_the_valid_scores() -> None:
    lps = [pos("7", {"7": 0.5, "8": 0.2, "The": 0.2, "11": 0.05})]  # "11" is out of 1–10
    distribution, mass = score_distribution(lps, 0, 1, 10)  # type: ignore[misc]
    assert mass == pytest.approx(0.7)
    assert distribution == pytest.approx({7: 0.5 / 0.7, 8: 0.2 / 0.7})
    # Not renormalised it would be 5.1; renormalised (7·0.5 + 8·0.2) / 0.7:
    assert expected_score(lps, 0, 1, 10) == pytest.approx(5.1 / 0.7)


def test_tokens_with_leading_spaces_are_the_same_score() -> None:
    lps = [pos(" 7", {" 7": 0.4, "7": 0.2, "\u25818": 0.2, " x": 0.2})]
    assert score_distribution(lps, 0, 1, 10)[0] == pytest.approx({7: 0.75, 8: 0.25})  # type: ignore[index]
    assert expected_score(lps, 0, 1, 10) == pytest.approx((7 * 0.6 + 8 * 0.2) / 0.8)
    # A backend that lists the generated " 7" among the alternatives as "7": counted once, not twice.
    once = [PositionLogprobs(token=" 7", logprob=math.log(0.5), top={"7": math.log(0.5), "8": math.log(0.2)})]
    assert expected_score(once, 0, 1, 10) == pytest.approx((7 * 0.5 + 8 * 0.2) / 0.7)


def test_a_generated_one_followed_by_zero_is_ten() -> None:
    lps = [
        pos("1", {"1": 0.5, "9": 0.3, "8": 0.1}),
        pos("0", {"0": 0.8, "5": 0.1, " ": 0.1}),  # given "1": "10" 0.8, "15" 0.1 (out of range), "1 " 0.1
        *plain(" ", "4"),
    ]
    # P(10) = 0.5·0.8, P(1) = 0.5·(1 − 0.9), P(15) dropped; then 9: 0.3, 8: 0.1.
    masses = {10: 0.4, 1: 0.05, 9: 0.3, 8: 0.1}
    total = sum(masses.values())
    distribution, mass = score_distribution(lps, 0, 1, 10)  # type: ignore[misc]
    assert mass == pytest.approx(total)
    assert distribution == pytest.approx({v: p / total for v, p in masses.items()})
    assert expected_score(lps, 0, 1, 10) == pytest.approx(sum(v * p for v, p in masses.items()) / total)
    # The reply's second score is the "4", not the "0" of the ten.
    assert score_positions([p.token for p in lps], 2) == [0, 3]


def test_an_alternative_one_that_was_not_generated_counts_as_one() -> None:
    # The next position is conditioned on "9", so it says nothing about what would follow a "1";
    # its digit mass does say how often the "9" went on to a (invalid) "90".
    lps = [pos("9", {"9": 0.6, "1": 0.3}), pos(" ", {" ": 0.9, "0": 0.1}), *plain("5")]
    masses = {9: 0.6 * 0.9, 1: 0.3}
    assert expected_score(lps, 0, 1, 10) == pytest.approx((9 * masses[9] + 1 * masses[1]) / sum(masses.values()))


def test_a_position_whose_top_tokens_are_not_scores_has_no_expectation() -> None:
    lps = [pos("Great", {"Great": 0.7, "Good": 0.2, " The": 0.1}), *plain(" ", "7")]
    assert score_distribution(lps, 0, 1, 10) is None
    assert expected_score(lps, 0, 1, 10) is None
    assert expected_score(None, 0, 1, 10) is None
    assert expected_score(lps, 9, 1, 10) is None  # out of range of the reply
    assert expected_scores(plain("no", " scores", " here"), 2, 1, 10) is None


def test_names_and_denominators_are_not_scores() -> None:
    tokens = scripted_tokens("Assistant 1: 8/10\nAssistant 2: 7/10")
    positions = score_positions(tokens, 2)
    assert [tokens[i] for i in positions] == [" 8", " 7"]  # type: ignore[union-attr]


def test_the_ends_of_the_scale_are_not_scores() -> None:
    tokens = scripted_tokens("Score (0-5): 5")
    assert [i for i in score_positions(tokens, 1, expect=[5])] == [len(tokens) - 1]  # type: ignore[union-attr]
    tokens = scripted_tokens("On a scale from 1 to 10, out of 10: 1 10")
    assert "".join(tokens[score_positions(tokens, 2)[0]:]) == " 1 10"  # type: ignore[index]


def test_the_positions_follow_the_parsed_values() -> None:
    tokens = scripted_tokens("Scores (out of 10): 6 then 9")
    assert [tokens[i] for i in score_positions(tokens, 2, expect=[6, 9])] == [" 6", " 9"]  # type: ignore[union-attr]
    assert score_positions(tokens, 2, expect=[6, 5]) is None


def test_the_estimate_is_read_at_the_right_position() -> None:
    lps = [
        pos("8", {"8": 0.5, "2": 0.5}),
        *plain(" "),
        pos("3", {"3": 0.5, "9": 0.5}),
    ]
    first, second = expected_scores(lps, 2, 1, 10)  # type: ignore[misc]
    assert (first.position, first.generated, first.expected) == (0, 8.0, pytest.approx(5.0))
    assert (second.position, second.generated, second.expected) == (2, 3.0, pytest.approx(6.0))


def test_missing_logprobs_fail_clearly() -> None:
    with pytest.raises(LogprobsUnavailable, match="scripted"):
        require_expected(None, [8, 6], 1, 10, who="judge (m, backend scripted)")
    assert issubclass(LogprobsUnavailable, UserError) and issubclass(LogprobsUnavailable, ValueError)
    with pytest.raises(ScoreNotLocated):
        require_expected(plain("8", " ", "6"), [5, 5], 1, 10, who="judge")
    assert issubclass(ScoreNotLocated, RecordFailure)


# ----------------------------------------------------------------------------- the judge and the rating


def role(handler: Any, cache: RequestCache | None = None) -> tuple[RoleModel, ScriptedBackend]:
    config = ScriptedModel(model="judge-script", temperature=0.7)
    backend = ScriptedBackend(config, handler=handler)
    return RoleModel("judge", config, backend, cache, UsageLedger()), backend


def biased_judge(seen: list[CompletionRequest]) -> Any:
    """Writes a higher score for whatever is shown first; its logprobs say B is better."""

    def handler(request: CompletionRequest) -> tuple[str, list[PositionLogprobs]]:
        seen.append(request)
        a_first = request.messages[-1].content.index("ANSWER-A") < request.messages[-1].content.index("ANSWER-B")
        if a_first:  # A: E = 8·.4 + 2·.35 + 3·.25 = 4.65; B: E = 6.5
            return "8 6", [pos("8", {"8": 0.4, "2": 0.35, "3": 0.25}), *plain(" "), pos("6", {"6": 0.5, "7": 0.5})]
        # B shown first: E(B) = 7·.6 + 6·.4 = 6.6; A: E = 6·.3 + 2·.7 = 3.2
        return "7 6", [pos("7", {"7": 0.6, "6": 0.4}), pos(" 6", {" 6": 0.3, " 2": 0.7})]

    return handler


async def test_pairwise_logprob_mode_scores_both_orders_with_expectations() -> None:
    seen: list[CompletionRequest] = []
    model, _ = role(biased_judge(seen))
    scores, gens = await judge_pair(model, "Q?", "ANSWER-A", "ANSWER-B", mode="logprob", temperature=0.7)
    assert scores.a_first == pytest.approx((4.65, 6.5))
    assert scores.b_first == pytest.approx((3.2, 6.6))
    assert scores.sampled_a_first == (8, 6) and scores.sampled_b_first == (6, 7)
    assert scores.verdict("strict") == "b" and scores.position_consistent
    assert [g.value for g in gens] == [(8, 6), (7, 6)]  # the generations keep what the judge wrote
    assert all(r.sampling.temperature == 0.0 and r.sampling.top_logprobs == 20 for r in seen)
    summary = scores.summary("strict")
    assert summary["scoring"] == "logprob" and summary["sampled_a_first"] == [8, 6]


async def test_pairwise_sampled_mode_is_unchanged() -> None:
    seen: list[CompletionRequest] = []
    model, _ = role(biased_judge(seen))
    scores, _ = await judge_pair(model, "Q?", "ANSWER-A", "ANSWER-B", temperature=0.0)
    assert scores.a_first == (8, 6) and scores.b_first == (6, 7)
    assert not scores.position_consistent and scores.verdict("strict") == "tie"
    assert all(r.sampling.top_logprobs is None for r in seen)
    assert "scoring" not in scores.summary("strict")


async def test_scripted_rules_give_one_hot_logprobs() -> None:
    config = ScriptedModel(model="rules", rules=[{"match": ".*", "reply": "9 3"}])
    model = RoleModel("judge", config, build_backend(config), None, UsageLedger())
    scores, gens = await judge_pair(model, "Q?", "a", "b", mode="logprob")
    assert scores.a_first == (9, 3) and scores.sampled_a_first == (9, 3)
    assert gens[0].logprobs == one_hot_logprobs("9 3")
    plain_scores, plain_gens = await judge_pair(model, "Q?", "a", "b")
    assert plain_gens[0].logprobs is None and plain_scores.a_first == (9, 3)


async def test_a_backend_without_logprobs_is_a_clear_error() -> None:
    model, _ = role(lambda request: Completion(text="8 6"))
    with pytest.raises(LogprobsUnavailable, match=r"judge \(judge-script, backend scripted\).*sampled"):
        await judge_pair(model, "Q?", "a", "b", mode="logprob")


async def test_a_reply_whose_scores_are_not_in_its_tokens_fails_the_record() -> None:
    model, _ = role(lambda request: ("8 6", plain("eight", " six")))
    with pytest.raises(ScoreNotLocated):
        await judge_pair(model, "Q?", "a", "b", mode="logprob")


async def test_an_unknown_mode_is_rejected() -> None:
    model, _ = role(lambda request: "8 6")
    with pytest.raises(ValueError, match="scoring mode"):
        await judge_pair(model, "Q?", "a", "b", mode="median")  # type: ignore[arg-type]


async def test_logprob_replies_come_back_from_the_cache(tmp_path) -> None:
    seen: list[CompletionRequest] = []
    cache = RequestCache(tmp_path / "cache.sqlite")
    model, backend = role(biased_judge(seen), cache)
    first, _ = await judge_pair(model, "Q?", "ANSWER-A", "ANSWER-B", mode="logprob")
    again, gens = await judge_pair(model, "Q?", "ANSWER-A", "ANSWER-B", mode="logprob")
    assert backend.calls == 2 and all(g.cached for g in gens)
    assert again == first


def rating_handler(request: CompletionRequest) -> tuple[str, list[PositionLogprobs]]:
    return "Score: 4\nAccurate.", [
        *plain("Score", ":"),
        pos(" 4", {" 4": 0.5, " 5": 0.3, " 3": 0.1, " 7": 0.05, " Great": 0.05}),  # 7 is out of 0–5
        pos("\n", {"\n": 0.9, ".": 0.1}),
        *plain("Accurate", "."),
    ]


async def test_rating_logprob_mode() -> None:
    model, _ = role(rating_handler)
    record = Record(id="r1", instruction="Say hi.", response="Hi!")
    rating = await rate_pair(model, record, mode="logprob")
    assert rating.value == pytest.approx((4 * 0.5 + 5 * 0.3 + 3 * 0.1) / 0.9, abs=1e-4)
    assert rating.sampled_value == 4 and rating.scoring == "logprob"
    assert rating.distribution == pytest.approx({3: 0.1 / 0.9, 4: 0.5 / 0.9, 5: 0.3 / 0.9})
    assert rating.detail()["sampled_score"] == 4
    sampled = await rate_pair(model, record)
    assert sampled.value == 4 and sampled.scoring == "sampled" and sampled.detail() == {}


async def test_rating_reads_a_half_point_at_its_integer_part() -> None:
    def handler(request: CompletionRequest) -> tuple[str, list[PositionLogprobs]]:
        # " 4" then ".": a digit after "4" would make 40+ (out of range), so P(4) = 0.7 · (1 − 0.4).
        return "Score: 4.5", [*plain("Score", ":"), pos(" 4", {" 4": 0.7, " 3": 0.3}), pos(".", {".": 0.6, "0": 0.4}), *plain("5")]

    model, _ = role(handler)
    rating = await rate_pair(model, Record(id="r2", instruction="x", response="y"), mode="logprob")
    assert rating.sampled_value == 4.5
    assert rating.value == pytest.approx((4 * 0.42 + 3 * 0.3) / 0.72, abs=1e-4)


# ----------------------------------------------------------------------------- the OpenAI path


async def test_openai_logprob_mode_against_the_mock_server() -> None:
    with MockOpenAIServer(MockConfig(reply_text="10 1")) as server:
        config = OpenAIModel(model="mock-model", base_url=server.url, api_key_env=None, max_retries=0)
        backend = build_backend(config)
        model = RoleModel("judge", config, backend, None, UsageLedger())
        try:
            scores, gens = await judge_pair(model, "Q?", "a", "b", mode="logprob")
            bodies = list(server.bodies)
            await judge_pair(model, "Q?", "a", "b")
            plain_body = server.bodies[-1]
        finally:
            await backend.aclose()
    assert all(b["logprobs"] is True and b["top_logprobs"] == 20 and b["temperature"] == 0.0 for b in bodies)
    assert "logprobs" not in plain_body and "top_logprobs" not in plain_body
    assert [p.token for p in gens[0].logprobs] == ["1", "0", " 1"]  # type: ignore[union-attr]
    # "1" (0.6) then "0" (0.6) or "1" (0.1): P(10) = .36, P(1) = .6·(1 − .7) = .18; "2" .1; "0" is out of 1–10.
    first = (10 * 0.36 + 1 * 0.18 + 2 * 0.1) / 0.64
    # " 1" (0.6), " 2" (0.1), " 0" out of range, nothing after it.
    second = (1 * 0.6 + 2 * 0.1) / 0.7
    assert scores.a_first == pytest.approx((first, second), abs=1e-4)
    assert scores.b_first == pytest.approx((second, first), abs=1e-4)
    assert scores.sampled_a_first == (10, 1)


def test_openai_logprobs_parsing_both_formats() -> None:
    chat = {"content": [
        {"token": "7", "logprob": -0.1, "bytes": [55], "top_logprobs": [{"token": "7", "logprob": -0.1}, {"token": "6", "logprob": -2.5}]},
        {"token": " 4", "logprob": -0.3, "top_logprobs": []},
    ]}
    parsed = parse_logprobs(chat)
    assert parsed == [
        PositionLogprobs(token="7", logprob=-0.1, top={"7": -0.1, "6": -2.5}),
        PositionLogprobs(token=" 4", logprob=-0.3, top={}),
    ]
    legacy = {"tokens": ["7", " 4"], "token_logprobs": [-0.1, None], "top_logprobs": [{"7": -0.1, "8": -3.0}, None]}
    parsed = parse_logprobs(legacy)
    assert [p.token for p in parsed] == ["7", " 4"] and parsed[0].top == {"7": -0.1, "8": -3.0}  # type: ignore[index]
    assert parsed[1].logprob < -100 and math.isfinite(parsed[1].logprob)  # type: ignore[index]
    assert parse_logprobs(None) is None and parse_logprobs({"content": None}) is None


# ----------------------------------------------------------------------------- backend helpers


def log_softmax(values: list[float]) -> list[float]:
    peak = max(values)
    lse = peak + math.log(sum(math.exp(v - peak) for v in values))
    return [v - lse for v in values]


def test_llamacpp_recorder_keeps_the_top_k_and_the_chosen_tokens() -> None:
    np = pytest.importorskip("numpy")
    pieces = {0: "", 1: "7", 2: " ", 3: "4", 4: "x"}  # 0: end of generation (no text)
    steps = [[0.0, 3.0, 0.5, 2.0, 1.0], [0.1, 0.2, 5.0, 0.3, 0.4], [0.0, 1.0, 0.2, 2.5, 2.4], [4.0, 0.0, 0.0, 0.0, 0.0]]
    chosen = [1, 2, 3, 0]
    recorder = TopLogprobRecorder(2)
    ids = [9, 9, 9]  # the prompt
    for step, logits in enumerate(steps):
        if step:
            ids.append(chosen[step - 1])  # llama.cpp evaluates the previous step's token before sampling
        out = recorder(np.array(ids), np.array(logits, dtype=np.float32))
        assert list(out) == pytest.approx(logits)
    expected = [log_softmax(s) for s in steps]
    assert recorder.tops[0][0] == [1, 3]
    assert recorder.tops[0][1] == pytest.approx([expected[0][1], expected[0][3]], abs=1e-5)
    assert recorder.chosen == [(1, pytest.approx(expected[0][1], abs=1e-5)), (2, pytest.approx(expected[1][2], abs=1e-5)),
                               (3, pytest.approx(expected[2][3], abs=1e-5))]

    def tokenize(s: str) -> list[int]:
        return [k for k, v in pieces.items() if v == s][:1]

    positions = recorded_positions(recorder, "7 4", pieces.__getitem__, tokenize)
    assert [p.token for p in positions] == ["7", " ", "4"]  # the end token is no part of the reply
    assert positions[2].top == pytest.approx({"4": expected[2][3], "x": expected[2][4]}, abs=1e-5)

    # Cut by max_tokens after "7 4": the last sampled token was never evaluated; it comes from the text.
    cut = TopLogprobRecorder(2)
    ids = [9]
    for step, logits in enumerate(steps[:3]):
        if step:
            ids.append(chosen[step - 1])
        cut(np.array(ids), np.array(logits, dtype=np.float32))
    positions = recorded_positions(cut, "7 4", pieces.__getitem__, tokenize)
    assert [p.token for p in positions] == ["7", " ", "4"]
    assert positions[2].logprob == pytest.approx(expected[2][3], abs=1e-5)
    # A stop string cut the text: the tokens past it are dropped.
    assert [p.token for p in recorded_positions(recorder, "7", pieces.__getitem__, tokenize)] == ["7"]


def test_hf_step_logprobs_and_positions() -> None:
    torch = pytest.importorskip("torch")
    from datatailor.llm.hf import positions_from_steps, step_logprobs

    logits = [0.0, 2.0, 1.0, 3.0, 2.0]
    chosen, logprob, top_ids, top_lps = step_logprobs(torch, torch.tensor(logits), 1, 3)
    expected = log_softmax(logits)
    assert chosen == 1 and logprob == pytest.approx(expected[1], abs=1e-6)
    assert top_ids[0] == 3 and set(top_ids[1:]) == {1, 4}
    assert top_lps == pytest.approx([expected[3], expected[1], expected[4]], abs=1e-6)

    # A SentencePiece-like tokenizer: "▁" is a space, and decoding drops the reply's leading space.
    pieces = {1: "Score", 2: ":", 3: "\u25817", 4: "\u25818", 5: "7"}

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids).replace("\u2581", " ").lstrip(" ")

    steps = [(1, -0.1, [1], [-0.1]), (2, -0.2, [2], [-0.2]), (3, math.log(0.5), [3, 4, 5], [math.log(0.5), math.log(0.2), math.log(0.1)])]
    positions = positions_from_steps(steps, [1, 2, 3], "Score: 7", decode)
    assert [p.token for p in positions] == ["Score", ":", " 7"]
    # Alternatives are written in context, as the chosen token is: "▁8" → " 8", while the id "7" stays "7".
    assert positions[2].top == pytest.approx({" 7": math.log(0.5), " 8": math.log(0.2), "7": math.log(0.1)})
    assert expected_score(positions, 2, 1, 10) == pytest.approx((7 * 0.6 + 8 * 0.2) / 0.8)
