"""Expected scores from a judge's token log-probabilities (the `logprob` scoring mode).

A small judge that samples one digit is noisy and leans towards the answer shown first. Where the
backend returns the log-probabilities of the most likely tokens at each generated position, the
score can instead be the expectation over the score tokens at the position where the judge wrote it:

    E[score] = Σ_v v · P(v) / Σ_v P(v)      over the valid scores v in [low, high]

The probabilities are renormalised over the valid scores (the top-k alternatives never cover the
whole vocabulary, and some of them are not numbers at all).

How tokens become scores:

* leading whitespace (and the SentencePiece/byte-level space markers "▁" and "Ġ") is ignored, so
  "7", " 7" and "▁7" all mean 7 and their probabilities add up;
* a token that is not a whole number ("." or "Score") is not a score; a multi-digit token ("10",
  as some tokenizers have) is that number;
* tokenizers that write "10" as "1" then "0" (Qwen, Gemma, Llama 3): for the token the judge did
  generate at the position, the next position's distribution is conditioned on it, so its digit
  tokens tell how the number continues: P(10) = P("1")·P("0" | "1") and P(1) = P("1")·(1 − P(any
  digit | "1")) (continuations out of range, like "11", are dropped). For an *alternative* token that
  was not generated, what would have followed is unknown: "1" is then taken as the complete number 1.
  So when the judge wrote "9", the mass of "1" counts as a 1 even if some of it meant 10;
* only the first number token is used: a rating "4.5" is read at its "4", whose distribution covers
  the integer part (the expectation itself is fractional).

Everything here is pure: no model calls. Functions return None when the logprobs needed are absent;
the caller decides how to fail (see `scoring.judge` and `scoring.quality`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from datatailor.errors import RecordFailure, UserError
from datatailor.llm.base import PositionLogprobs

# How many alternatives the scoring mode asks for at each position (OpenAI's maximum).
TOP_LOGPROBS = 20
LOGPROB_SAMPLING = {"temperature": 0.0, "top_logprobs": TOP_LOGPROBS}

_SPACE = " \t\r\n\u2581\u0120"  # whitespace, SentencePiece "▁", byte-level BPE "Ġ"
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")
# A number that is a name ("Assistant 1"), a denominator ("8/10", "out of 10") or an end of the scale
# ("(0-5)", "from 1 to 10") is not a score.
_NOT_A_SCORE_BEFORE = re.compile(r"(?:assistant|answer|out of)\s*$|/\s*$|\d\s*(?:[-\u2013]|to)\s*$", re.IGNORECASE)
_NOT_A_SCORE_AFTER = re.compile(r"\s*(?:[-\u2013]|to)\s*\d", re.IGNORECASE)


class LogprobsUnavailable(UserError, ValueError):
    """The backend returned no log-probabilities, so the `logprob` scoring mode cannot work with it."""


class ScoreNotLocated(RecordFailure):
    """The reply has logprobs, but the score could not be found in its tokens (or has no valid mass)."""

    kind = "logprob_error"


@dataclass(frozen=True)
class ScoreEstimate:
    """One score read from the logprobs."""

    position: int  # index into the logprobs of the token where the score starts
    generated: float  # the number the judge actually wrote there
    expected: float  # the expectation over the valid scores
    distribution: dict[int, float]  # renormalised P(score) over the valid scores seen
    mass: float  # probability of the valid scores before renormalising (how much of the top-k was a score)


def _clean(token: str) -> str:
    return token.lstrip(_SPACE)


def _token_number(token: str) -> str | None:
    """The digits of a token that is a whole number (after leading whitespace), else None."""
    t = _clean(token)
    return t if t and t.isascii() and t.isdigit() else None


def _position_probs(pos: PositionLogprobs) -> tuple[dict[str, float], str]:
    """Probabilities of the alternatives at one position, and the key under which the generated token is.

    The generated token is added when the alternatives lack it, unless one of them is the same token
    written without its leading space (a backend that decodes alternatives alone), which is then taken
    as the generated one, so its probability is not counted twice.
    """
    probs = {token: math.exp(lp) for token, lp in pos.top.items()}
    if pos.token in probs:
        return probs, pos.token
    same = [t for t in probs if _clean(t) == _clean(pos.token)]
    if len(same) == 1:
        return probs, same[0]
    probs[pos.token] = math.exp(pos.logprob)
    return probs, pos.token


def score_positions(tokens: Sequence[str], count: int, expect: Sequence[float] | None = None) -> list[int] | None:
    """Token indices where the first `count` scores of the reply start, or None if not found.

    Numbers that are names ("Assistant 1"), denominators ("/10", "out of 10") or ends of the scale
    ("(0-5)", "1 to 10") are skipped. With `expect` (the
    values a text parser read from the same reply), the positions are the first numbers, in order,
    whose values equal those; this keeps the logprob reading on the very numbers the parser chose.
    """
    text = "".join(tokens)
    starts: list[int] = []  # character offset where each token begins
    offset = 0
    for token in tokens:
        starts.append(offset)
        offset += len(token)
    candidates: list[tuple[int, float]] = []  # (token index, value)
    for m in _NUMBER.finditer(text):
        if _NOT_A_SCORE_BEFORE.search(text[max(0, m.start() - 12) : m.start()]) or _NOT_A_SCORE_AFTER.match(
            text, m.end(), m.end() + 8
        ):
            continue
        index = _token_at(starts, m.start())
        candidates.append((index, float(m.group(0))))
    if expect is None:
        chosen = [index for index, _ in candidates[:count]]
        return chosen if len(chosen) == count else None
    wanted = list(expect)[:count]
    chosen = []
    for index, value in candidates:
        if len(chosen) == len(wanted):
            break
        if math.isclose(value, wanted[len(chosen)], abs_tol=1e-9):
            chosen.append(index)
    return chosen if len(chosen) == count and len(wanted) == count else None


def _token_at(starts: list[int], char: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:  # the last token that begins at or before `char`
        mid = (lo + hi + 1) // 2
        if starts[mid] <= char:
            lo = mid
        else:
            hi = mid - 1
    return lo


def score_distribution(
    logprobs: Sequence[PositionLogprobs], position: int, low: int, high: int
) -> tuple[dict[int, float], float] | None:
    """(renormalised P(score) over the valid scores, their raw mass) at `position`; None when there is none.

    See the module docstring for how "1" followed by "0" and leading spaces are read.
    """
    if not 0 <= position < len(logprobs):
        return None
    here, generated = _position_probs(logprobs[position])
    following = logprobs[position + 1] if position + 1 < len(logprobs) else None
    # Digits that continue the generated token's number (no space before them: " 0" starts a new word).
    continuation: dict[str, float] = {}
    if following is not None:
        continuation = {t: p for t, p in _position_probs(following)[0].items() if t.isascii() and t.isdigit()}
    mass_by_score: dict[int, float] = {}

    def add(value: int, p: float) -> None:
        if low <= value <= high and p > 0:
            mass_by_score[value] = mass_by_score.get(value, 0.0) + p

    for token, p in here.items():
        digits = _token_number(token)
        if digits is None:
            continue
        if token == generated and continuation:
            add(int(digits), p * max(0.0, 1.0 - sum(continuation.values())))
            for more, q in continuation.items():
                add(int(digits + more), p * q)
        else:
            add(int(digits), p)
    mass = sum(mass_by_score.values())
    if mass <= 0:
        return None
    return {v: p / mass for v, p in sorted(mass_by_score.items())}, mass


def expected_value(distribution: dict[int, float]) -> float:
    return sum(v * p for v, p in distribution.items())


def expected_score(logprobs: Sequence[PositionLogprobs] | None, position: int, low: int, high: int) -> float | None:
    """The expected score at `position`, or None when the logprobs are absent or hold no valid score."""
    if not logprobs:
        return None
    found = score_distribution(logprobs, position, low, high)
    return None if found is None else expected_value(found[0])


def expected_scores(
    logprobs: Sequence[PositionLogprobs] | None,
    count: int,
    low: int,
    high: int,
    expect: Sequence[float] | None = None,
) -> list[ScoreEstimate] | None:
    """The first `count` scores of a reply as expectations; None when any of them cannot be read.

    `expect`: the values a text parser read from the reply (see `score_positions`).
    """
    if not logprobs:
        return None
    tokens = [p.token for p in logprobs]
    positions = score_positions(tokens, count, expect)
    if positions is None:
        return None
    text = "".join(tokens)
    estimates: list[ScoreEstimate] = []
    offset_of = [0]
    for t in tokens:
        offset_of.append(offset_of[-1] + len(t))
    for position in positions:
        found = score_distribution(logprobs, position, low, high)
        if found is None:
            return None
        distribution, mass = found
        m = _NUMBER.search(text, offset_of[position])
        generated = float(m.group(0)) if m else float("nan")
        estimates.append(
            ScoreEstimate(position, generated, expected_value(distribution), distribution, mass)
        )
    return estimates


def require_expected(
    logprobs: Sequence[PositionLogprobs] | None,
    sampled: Sequence[float],
    low: int,
    high: int,
    *,
    who: str,
) -> list[ScoreEstimate]:
    """`expected_scores` for a call in `logprob` mode, failing clearly instead of returning None.

    No logprobs at all → `LogprobsUnavailable` (a UserError: the backend cannot do this mode, so the run
    stops); logprobs present but the scores not readable from them → `ScoreNotLocated` (this record fails).
    `who` names the role, model and backend in the message.
    """
    if logprobs is None:
        raise LogprobsUnavailable(
            f"{who} returned no token log-probabilities; scoring mode 'logprob' needs a backend that exposes them "
            f"(llamacpp, hf, or an OpenAI-compatible server that supports `logprobs`/`top_logprobs`); "
            f"use scoring mode 'sampled' with this model"
        )
    estimates = expected_scores(logprobs, len(sampled), low, high, expect=sampled)
    if estimates is None:
        shown = "".join(p.token for p in logprobs)[:120].replace("\n", "\\n")
        raise ScoreNotLocated(
            f"{who}: could not read the score(s) {list(sampled)} from the reply's token log-probabilities "
            f"(reply tokens began {shown!r})"
        )
    return estimates
