"""Pairwise LLM judge, asked in both orders, with the raw scores kept.

Three aggregation rules over the same raw scores:

* `mean`    each side's two scores are averaged; the higher mean wins (CodecLM contrastive filtering);
* `strict`  a side wins only if it scores higher in both orders, else tie (CodecLM evaluation / CRR);
* `lenient` a side wins if it scores higher in one order and at least ties in the other
            (AlpaGasus / Cherry-LLM rule).

Two scoring modes (`judge_pair(..., mode=...)`):

* `sampled` (default, as in the papers): the two numbers the judge wrote;
* `logprob`: at temperature 0 with the top-20 token log-probabilities, each score is the expectation
  over the score tokens where the judge wrote it (see `scoring.logprob`); the written numbers are
  kept in `sampled_a_first`/`sampled_b_first`. Expected scores are rarely exactly equal, so this mode
  gives fewer ties.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from datatailor.llm.models import Generation, RoleModel
from datatailor.llm.structured import parse_score_pair
from datatailor.prompts import load_prompt
from datatailor.scoring.logprob import LOGPROB_SAMPLING, require_expected

Rule = Literal["mean", "strict", "lenient"]
Verdict = Literal["a", "b", "tie"]
ScoringMode = Literal["sampled", "logprob"]
SCORING_MODES: tuple[str, ...] = ("sampled", "logprob")
PAIR_LOW, PAIR_HIGH = 1, 10

SCORES_ONLY = "judge/pairwise_scores.j2"
EXPLAINED = "judge/pairwise_explained.j2"


def _order_verdict(a: float, b: float) -> Verdict:
    return "a" if a > b else "b" if b > a else "tie"


class PairwiseScores(BaseModel):
    """Raw scores of one comparison, mapped back to the A/B sides.

    `a_first` holds (score of A, score of B) when A was shown as Assistant 1; `b_first` the same pair
    of sides when B was shown first.
    """

    model_config = ConfigDict(extra="forbid")

    a_first: tuple[float, float]
    b_first: tuple[float, float]
    # In `logprob` mode a_first/b_first hold expected scores; these hold the numbers the judge wrote.
    scoring: ScoringMode = "sampled"
    sampled_a_first: tuple[float, float] | None = None
    sampled_b_first: tuple[float, float] | None = None

    @property
    def mean_a(self) -> float:
        return (self.a_first[0] + self.b_first[0]) / 2

    @property
    def mean_b(self) -> float:
        return (self.a_first[1] + self.b_first[1]) / 2

    @property
    def gap(self) -> float:
        """Mean score of A minus mean score of B (CodecLM's G when A is the strong model)."""
        return self.mean_a - self.mean_b

    @property
    def order_verdicts(self) -> tuple[Verdict, Verdict]:
        return _order_verdict(*self.a_first), _order_verdict(*self.b_first)

    @property
    def position_consistent(self) -> bool:
        """True when both orders give the same verdict (the judge was not swayed by position)."""
        first, second = self.order_verdicts
        return first == second

    def verdict(self, rule: Rule) -> Verdict:
        if rule == "mean":
            return _order_verdict(self.mean_a, self.mean_b)
        first, second = self.order_verdicts
        if rule == "strict":
            return first if first == second and first != "tie" else "tie"
        if rule == "lenient":
            pair = {first, second}
            if pair in ({"a"}, {"a", "tie"}):
                return "a"
            if pair in ({"b"}, {"b", "tie"}):
                return "b"
            return "tie"
        raise ValueError(f"unknown rule {rule!r}")

    def summary(self, rule: Rule) -> dict[str, Any]:
        out: dict[str, Any] = {
            "a_first": list(self.a_first),
            "b_first": list(self.b_first),
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "rule": rule,
            "verdict": self.verdict(rule),
            "position_consistent": self.position_consistent,
        }
        if self.scoring != "sampled":  # sampled summaries stay byte-identical to earlier runs
            out["scoring"] = self.scoring
            out["sampled_a_first"] = list(self.sampled_a_first) if self.sampled_a_first else None
            out["sampled_b_first"] = list(self.sampled_b_first) if self.sampled_b_first else None
        return out


def _who(model: RoleModel) -> str:
    return f"{model.role} ({model.name}, backend {getattr(model.config, 'backend', '?')})"


def _expected_pair(model: RoleModel, gen: Generation[tuple[float, float]]) -> tuple[float, float]:
    first, second = require_expected(gen.logprobs, gen.value, PAIR_LOW, PAIR_HIGH, who=_who(model))
    return round(first.expected, 4), round(second.expected, 4)


async def judge_pair(
    model: RoleModel,
    question: str,
    answer_a: str,
    answer_b: str,
    *,
    template: str = SCORES_ONLY,
    seed_key: Any = None,
    base_dir: Any = None,
    mode: ScoringMode = "sampled",
    **sampling: Any,
) -> tuple[PairwiseScores, list[Generation[tuple[float, float]]]]:
    """Score A and B in both orders. Returns the mapped scores and the two generations (for lineage).

    `mode="logprob"` asks at temperature 0 for the top-20 logprobs (overriding `temperature` and
    `top_logprobs` in `sampling`) and scores with expectations; the generations keep the written
    scores as `.value`. A backend that returns no logprobs raises `LogprobsUnavailable` (a UserError);
    a reply whose scores cannot be found in its tokens raises `ScoreNotLocated` (a RecordFailure).
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {', '.join(SCORING_MODES)}")
    if mode == "logprob":
        sampling = {**sampling, **LOGPROB_SAMPLING}
    prompt = load_prompt(template, base_dir)
    first, second = await asyncio.gather(
        model.generate(
            prompt,
            {"question": question, "answer_1": answer_a, "answer_2": answer_b},
            parse=parse_score_pair,
            seed_key=(seed_key, "a_first"),
            **sampling,
        ),
        model.generate(
            prompt,
            {"question": question, "answer_1": answer_b, "answer_2": answer_a},
            parse=parse_score_pair,
            seed_key=(seed_key, "b_first"),
            **sampling,
        ),
    )
    b_shown_first = second.value
    if mode == "sampled":
        scores = PairwiseScores(a_first=first.value, b_first=(b_shown_first[1], b_shown_first[0]))
        return scores, [first, second]
    expected_a_first = _expected_pair(model, first)
    expected_b_shown_first = _expected_pair(model, second)
    scores = PairwiseScores(
        a_first=expected_a_first,
        b_first=(expected_b_shown_first[1], expected_b_shown_first[0]),
        scoring="logprob",
        sampled_a_first=first.value,
        sampled_b_first=(b_shown_first[1], b_shown_first[0]),
    )
    return scores, [first, second]
