"""A greedy ROUGE-L novelty index: Self-Instruct's filter (keep a text only if its ROUGE-L F-measure against every
text kept so far is below a threshold, 0.7 by default), also REFED's ROUGE-L subset selection."""

from __future__ import annotations

from collections import Counter

from datatailor.scoring.text import rouge_l, rouge_tokens


class NoveltyIndex:
    """Texts seen so far, answering: how similar (ROUGE-L) is a new text to the closest one?"""

    def __init__(self) -> None:
        self._tokens: list[list[str]] = []
        self._counts: list[Counter[str]] = []
        self.ids: list[str] = []

    def add(self, text_id: str, text: str) -> None:
        tokens = rouge_tokens(text)
        self._tokens.append(tokens)
        self._counts.append(Counter(tokens))
        self.ids.append(text_id)

    def closest(self, text: str) -> tuple[float, str | None]:
        """(highest ROUGE-L, id of that text). Pairs whose token overlap cannot beat the best so far are skipped."""
        tokens = rouge_tokens(text)
        counts = Counter(tokens)
        best, best_id = 0.0, None
        for i, other in enumerate(self._tokens):
            if not tokens or not other:
                continue
            # The LCS cannot be longer than the multiset overlap, which bounds the F-measure from above.
            overlap = sum((counts & self._counts[i]).values())
            if 2 * overlap / (len(tokens) + len(other)) <= best:
                continue
            score = rouge_l(tokens, other)
            if score > best:
                best, best_id = score, self.ids[i]
        return best, best_id
