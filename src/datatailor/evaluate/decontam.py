"""Decontamination: which training pairs overlap a test set.

Two checks, both over lower-cased word tokens of the pair's prompt (instruction + input, and the
response too when asked):

* **n-gram overlap** (GPT-3 / open-instruct style): the pair shares at least one word n-gram
  (default n = 13) with a test item. Test items shorter than n words can never match this way, so:
* **containment**: the share of a test item's word k-grams (default k = 3) that also occur in the pair
  is at least `containment` (default 0.8). An item shorter than k words counts as one gram of its
  own length (it must appear verbatim). This catches short questions copied into a longer prompt,
  and lightly edited copies of long ones.

A hit names the pair, the test set, the item and the evidence (the shared n-gram or the ratio).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from datatailor.scoring.text import ngrams, tokenize
from datatailor.records import Record


class DecontamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(13, ge=1, description="Word n-gram length of the overlap check.")
    containment: float = Field(0.8, gt=0.0, le=1.0, description="Share of a test item's k-grams that flags a pair.")
    containment_n: int = Field(3, ge=1, description="k of the containment check.")
    include_response: bool = Field(False, description="Also look for test items in the responses.")


class ContaminationHit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record_id: str
    record_index: int
    testset: str
    item_id: str
    test_text: str
    kind: Literal["ngram", "containment"]
    evidence: str
    ratio: float


@dataclass(frozen=True)
class TestItem:
    testset: str
    item_id: str
    text: str

    __test__ = False  # not a pytest class, despite the name


class ContaminationIndex:
    """Inverted indexes over the test items' n-grams and k-grams."""

    def __init__(self, items: Sequence[TestItem], settings: DecontamSettings | None = None):
        self.items = list(items)
        self.settings = settings or DecontamSettings()
        n, k = self.settings.n, self.settings.containment_n
        self._by_ngram: dict[tuple[str, ...], list[int]] = {}
        self._by_kgram: dict[tuple[str, ...], list[int]] = {}
        self._kgram_count: list[int] = []
        self._short_lengths: set[int] = set()
        for idx, item in enumerate(self.items):
            tokens = tokenize(item.text)
            for gram in set(ngrams(tokens, n)):
                self._by_ngram.setdefault(gram, []).append(idx)
            if 0 < len(tokens) < k:
                grams = {tuple(tokens)}
                self._short_lengths.add(len(tokens))
            else:
                grams = set(ngrams(tokens, k))
            self._kgram_count.append(len(grams))
            for gram in grams:
                self._by_kgram.setdefault(gram, []).append(idx)

    def matches(self, text: str) -> list[tuple[int, str, str, float]]:
        """(item index, kind, evidence, containment ratio) for every test item the text overlaps."""
        tokens = tokenize(text)
        n, k = self.settings.n, self.settings.containment_n
        first_ngram: dict[int, tuple[str, ...]] = {}
        for gram in ngrams(tokens, n) if len(tokens) >= n else []:
            for idx in self._by_ngram.get(gram, ()):
                first_ngram.setdefault(idx, gram)
        grams: set[tuple[str, ...]] = set(ngrams(tokens, k)) if len(tokens) >= k else set()
        for length in self._short_lengths:
            if len(tokens) >= length:
                grams.update(ngrams(tokens, length))
        shared: Counter[int] = Counter()
        for gram in grams:
            for idx in self._by_kgram.get(gram, ()):
                shared[idx] += 1
        out: list[tuple[int, str, str, float]] = []
        for idx in sorted(set(first_ngram) | set(shared)):
            ratio = shared[idx] / self._kgram_count[idx] if self._kgram_count[idx] else 0.0
            if idx in first_ngram:
                out.append((idx, "ngram", " ".join(first_ngram[idx]), ratio))
            elif ratio >= self.settings.containment:
                out.append((idx, "containment", f"{shared[idx]}/{self._kgram_count[idx]} {k}-grams", ratio))
        return out


def record_text(record: Record, include_response: bool) -> str:
    if include_response and record.response:
        return f"{record.prompt}\n{record.response}"
    return record.prompt


def find_contamination(
    records: Sequence[Record], items: Sequence[TestItem], settings: DecontamSettings | None = None
) -> list[ContaminationHit]:
    """Every (pair, test item) overlap, in record order."""
    index = ContaminationIndex(items, settings)
    hits: list[ContaminationHit] = []
    for i, record in enumerate(records):
        for idx, kind, evidence, ratio in index.matches(record_text(record, index.settings.include_response)):
            item = index.items[idx]
            hits.append(
                ContaminationHit(
                    record_id=record.id,
                    record_index=i,
                    testset=item.testset,
                    item_id=item.item_id,
                    test_text=item.text,
                    kind=kind,  # type: ignore[arg-type]
                    evidence=evidence,
                    ratio=round(ratio, 4),
                )
            )
    return hits


def testset_items(names: Sequence[str]) -> list[TestItem]:
    """The items of test sets given by name or path (see `testsets.resolve_testset`)."""
    from datatailor.evaluate.testsets import resolve_testset, testset_texts

    items: list[TestItem] = []
    for name in names:
        ts = resolve_testset(name)
        items.extend(TestItem(ts.name, item_id, text) for item_id, text in testset_texts(ts))
    return items


def split_clean(records: Sequence[Record], hits: Sequence[ContaminationHit]) -> tuple[list[Record], list[Record]]:
    """(kept, dropped): a pair with any hit is dropped."""
    flagged = {h.record_index for h in hits}
    kept = [r for i, r in enumerate(records) if i not in flagged]
    dropped = [r for i, r in enumerate(records) if i in flagged]
    return kept, dropped


def contamination_summary(n_records: int, hits: Sequence[ContaminationHit]) -> dict[str, object]:
    """Per test set: flagged pairs and distinct test items hit; overall flagged pairs."""
    per_set: dict[str, dict[str, object]] = {}
    for name in sorted({h.testset for h in hits}):
        mine = [h for h in hits if h.testset == name]
        per_set[name] = {
            "pairs": len({h.record_index for h in mine}),
            "items": len({h.item_id for h in mine}),
        }
    flagged = len({h.record_index for h in hits})
    return {
        "records": n_records,
        "flagged_pairs": flagged,
        "flagged_share": flagged / n_records if n_records else None,
        "by_testset": per_set,
    }


def decontaminate(
    records: Sequence[Record], testsets: Sequence[str], settings: DecontamSettings | None = None
) -> tuple[list[Record], dict[str, object]]:
    """Drop every pair that overlaps one of `testsets`; return the kept pairs and a report.

    The report holds the settings, the summary and, per dropped pair, its id, instruction and the
    test items it matched (with the evidence), so every dropped row is explained.
    """
    settings = settings or DecontamSettings()
    hits = find_contamination(records, testset_items(testsets), settings)
    kept, dropped = split_clean(records, hits)
    by_record: dict[str, list[dict[str, object]]] = {}
    for h in hits:
        by_record.setdefault(h.record_id, []).append(h.model_dump(exclude={"record_id", "record_index"}))
    report = {
        "testsets": list(testsets),
        "settings": settings.model_dump(),
        **contamination_summary(len(records), hits),
        "kept": len(kept),
        "dropped": [{"id": r.id, "instruction": r.instruction, "matches": by_record[r.id]} for r in dropped],
    }
    return kept, report
