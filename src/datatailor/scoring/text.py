"""Text primitives shared by the evaluation modules: word tokens, n-grams, ROUGE-L.

`tokenize` gives lower-cased runs of letters and digits (`\\w+`, non-ASCII letters kept) for distinct-n
and decontamination. ROUGE-L uses `rouge_tokens`, rouge-score's own tokenisation (lower-cased
`[a-z0-9]+`), and is the F-measure of the longest common subsequence of tokens, as in rouge-score
without stemming (what Self-Instruct's novelty filter uses). The LCS length is computed
bit-parallel (Allison–Dix / Hyyrö): one big-integer update per token of the second text, so
comparing thousands of instruction pairs stays fast in pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_tokens(text: str) -> list[str]:
    """Tokens exactly as rouge-score makes them (no stemming)."""
    return _ROUGE_TOKEN.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError("n must be at least 1")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a  # the bit vector runs over the longer sequence
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure between two token sequences (symmetric; 0 when either is empty)."""
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def rouge_l_text(a: str, b: str) -> float:
    return rouge_l(rouge_tokens(a), rouge_tokens(b))
