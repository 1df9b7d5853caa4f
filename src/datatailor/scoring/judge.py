"""Pairwise LLM judge, asked in both orders, with the raw scores kept.

Three aggregation rules over the same raw scores (methods.md §5.3):

* `mean`    each side's two scores are averaged; the higher mean wins (CodecLM contrastive filtering);
* `strict`  a side wins only if it scores higher in both orders, else tie (CodecLM evaluation / CRR);
* `lenient` a side wins if it scores higher in one order and at least ties in the other
            (AlpaGasus / Cherry-LLM rule).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from datatailor.llm.models import Generation, RoleModel
from datatailor.llm.structured import parse_score_pair
from datatailor.prompts import load_prompt

Rule = Literal["mean", "strict", "lenient"]
Verdict = Literal["a", "b", "tie"]

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
        return {
            "a_first": list(self.a_first),
            "b_first": list(self.b_first),
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "rule": rule,
            "verdict": self.verdict(rule),
            "position_consistent": self.position_consistent,
        }


async def judge_pair(
    model: RoleModel,
    question: str,
    answer_a: str,
    answer_b: str,
    *,
    template: str = SCORES_ONLY,
    seed_key: Any = None,
    base_dir: Any = None,
    **sampling: Any,
) -> tuple[PairwiseScores, list[Generation[tuple[float, float]]]]:
    """Score A and B in both orders. Returns the mapped scores and the two generations (for lineage)."""
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
    scores = PairwiseScores(a_first=first.value, b_first=(b_shown_first[1], b_shown_first[0]))
    return scores, [first, second]
