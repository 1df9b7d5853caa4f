"""The papers' pairwise metrics, as pure functions over verdicts (no model anywhere in here).

A comparison puts a *candidate* answer against a *reference* answer and ends in a verdict for the
candidate: win, tie or loss. Counting those gives a W/T/L table, from which:

* CodecLM's Capacity Recovery Ratio: CRR = (W + T) / N, with verdicts from the **strict** rule
  (a win counts only if the candidate wins in both orders; CodecLM, arXiv 2404.05875);
* CoachLM's WR1 = (W + T/2) / N, WR2 = W / (W + L), QS = (W + T) / N (CoachLM, arXiv 2311.13246).

Every ratio is a fraction in [0, 1]; reports multiply by 100. A ratio whose denominator is zero is
`None` ("n/a"): N = 0 means nothing was compared, and W + L = 0 (every comparison a tie) leaves WR2
without a single decided comparison, so no number would be honest there.

The judge's position-consistency rate is the share of comparisons whose per-order verdicts agree
(swapping the two answers did not change who won); the flip rate is the share where the winner
itself changed sides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from datatailor.scoring.judge import PairwiseScores, Rule, Verdict

Side = Literal["a", "b"]
Outcome = Literal["win", "tie", "loss"]


class WTL(BaseModel):
    """Wins, ties and losses of the candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def __add__(self, other: "WTL") -> "WTL":
        return WTL(wins=self.wins + other.wins, ties=self.ties + other.ties, losses=self.losses + other.losses)


def _ratio(numerator: float, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def crr(t: WTL) -> float | None:
    """Capacity Recovery Ratio (CodecLM): (W + T) / N. Feed it strict-rule verdicts."""
    return _ratio(t.wins + t.ties, t.n)


def wr1(t: WTL) -> float | None:
    """CoachLM WR1: (W + T/2) / N — a tie is half a win."""
    return _ratio(t.wins + t.ties / 2, t.n)


def wr2(t: WTL) -> float | None:
    """CoachLM WR2: W / (W + L) — wins among decided comparisons; None when every comparison tied."""
    return _ratio(t.wins, t.wins + t.losses)


def qs(t: WTL) -> float | None:
    """CoachLM QS: (W + T) / N — the share of answers at least as good as the reference."""
    return _ratio(t.wins + t.ties, t.n)


def metric_table(t: WTL) -> dict[str, float | int | None]:
    """W/T/L with every metric derived from it, as one flat dict (what eval.json stores)."""
    return {
        "wins": t.wins,
        "ties": t.ties,
        "losses": t.losses,
        "n": t.n,
        "crr": crr(t),
        "wr1": wr1(t),
        "wr2": wr2(t),
        "qs": qs(t),
    }


def outcome(verdict: Verdict, candidate: Side = "a") -> Outcome:
    """The candidate's outcome for a judge verdict ("a", "b" or "tie")."""
    if verdict == "tie":
        return "tie"
    if verdict not in ("a", "b"):
        raise ValueError(f"unknown verdict {verdict!r}")
    return "win" if verdict == candidate else "loss"


def count_verdicts(verdicts: Iterable[Verdict], candidate: Side = "a") -> WTL:
    """W/T/L of the candidate (shown as side `candidate`) over judge verdicts."""
    counts = {"win": 0, "tie": 0, "loss": 0}
    for v in verdicts:
        counts[outcome(v, candidate)] += 1
    return WTL(wins=counts["win"], ties=counts["tie"], losses=counts["loss"])


def wtl_from_scores(scores: Iterable[PairwiseScores], rule: Rule = "strict", candidate: Side = "a") -> WTL:
    """W/T/L of the candidate when each comparison's raw scores are aggregated with `rule`."""
    return count_verdicts((s.verdict(rule) for s in scores), candidate)


def position_consistency_rate(scores: Iterable[PairwiseScores]) -> float | None:
    """Share of comparisons whose two orders give the same verdict (None for no comparisons)."""
    items = list(scores)
    return _ratio(sum(s.position_consistent for s in items), len(items))


def flip_rate(scores: Iterable[PairwiseScores]) -> float | None:
    """Share of comparisons where one order picks A and the other picks B (the winner changed sides)."""
    items = list(scores)
    return _ratio(sum(set(s.order_verdicts) == {"a", "b"} for s in items), len(items))


def scores_from_summary(summary: dict) -> PairwiseScores:
    """Rebuild the raw scores from what the `judge.pairwise` stage stored in a record."""
    return PairwiseScores(a_first=tuple(summary["a_first"]), b_first=tuple(summary["b_first"]))


def evaluate_scores(scores: list[PairwiseScores], candidate: Side = "a") -> dict[str, object]:
    """Every rule's W/T/L and metrics plus the judge's consistency, for one list of comparisons.

    The headline rule is `strict` (CodecLM's CRR); `lenient` (AlpaGasus) and `mean` are given too,
    because the raw scores make any rule free to apply afterwards.
    """
    return {
        "by_rule": {rule: metric_table(wtl_from_scores(scores, rule, candidate)) for rule in ("strict", "lenient", "mean")},
        "position_consistency": position_consistency_rate(scores),
        "flip_rate": flip_rate(scores),
        "n": len(scores),
    }


def percent(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage for reports; "n/a" for an undefined ratio."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}"
