"""Split each test set into a seed part (given to the methods) and an evaluation part (only judged), as in
CodecLM's protocol: a seeded shuffle, the first `seed_share` to the seeds, both parts kept in test-set order."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from datatailor.evaluate.testsets import TestSet
from datatailor.records import Record, derive_seed


@dataclass
class Split:
    testset: TestSet
    seeds: list[Record]
    evaluation: list[Record]

    @property
    def name(self) -> str:
        return self.testset.name


def split_testset(testset: TestSet, share: float, seed: int) -> Split:
    """Disjoint by construction; the same (test set, share, seed) always gives the same split."""
    records = list(testset.records)
    n_seeds = min(len(records) - 1, max(1, math.floor(share * len(records) + 0.5))) if len(records) > 1 else 0
    order = list(range(len(records)))
    random.Random(derive_seed("bakeoff-split", testset.name, seed)).shuffle(order)
    chosen = set(order[:n_seeds])
    seeds = [records[i] for i in range(len(records)) if i in chosen]
    evaluation = [records[i] for i in range(len(records)) if i not in chosen]
    return Split(testset, seeds, evaluation)


def as_seed(record: Record, testset: str) -> Record:
    """A seed as the methods see it: the instruction and input only (never the test set's reference answer)."""
    return Record(id=f"{testset}:{record.id}", instruction=record.instruction, input=record.input,
                  metadata={"testset": testset})
