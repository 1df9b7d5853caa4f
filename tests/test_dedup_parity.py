"""The bounded-memory dedup makes the decisions of an incremental datasketch MinHashLSH pass, record by record."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from datatailor.records import Record
from datatailor.scoring.dedup import EXACT, NEAR, GreedyDedup, normalise, shingles

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega red green blue cyan plum teal gold rust mint sand").split()


def planted(n_base: int, seed: int = 0) -> list[str]:
    """Base sentences, exact copies (case and punctuation changed), near copies (one or two words changed),
    and templated texts that differ by one word, shuffled."""
    rng = random.Random(seed)
    base = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) for _ in range(n_base)]
    texts = list(base)
    for b in base:
        roll = rng.random()
        if roll < 0.25:
            texts.append(b.upper() + "!")
        elif roll < 0.6:
            words = b.split()
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
    texts += [f"Write a short poem about {w} and the sea at night" for w in WORDS]  # one big template bucket
    texts += ["", "", "!!"]  # empty texts: identical (empty) signatures
    rng.shuffle(texts)
    return texts


def oracle(texts: list[str], *, exact: bool, near: bool, threshold: float, num_perm: int, k: int) -> list[tuple[int, int]]:
    """The reference: an incremental pass with datasketch's MinHashLSH over the kept records."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
    signatures: dict[str, MinHash] = {}
    first_exact: dict[str, int] = {}
    out: list[tuple[int, int]] = []
    for i, text in enumerate(texts):
        key = normalise(text)
        if exact and key in first_exact:
            out.append((EXACT, first_exact[key]))
            continue
        if near:
            mh = MinHash(num_perm=num_perm, seed=1)
            for sh in shingles(text, k):
                mh.update(sh.encode("utf-8"))
            hits = [int(h) for h in lsh.query(mh) if signatures[h].jaccard(mh) >= threshold]
            if hits:
                out.append((NEAR, min(hits)))
                continue
            signatures[str(i)] = mh
            lsh.insert(str(i), mh)
        first_exact.setdefault(key, i)
        out.append((0, -1))
    return out


@pytest.mark.parametrize(
    ("exact", "near", "threshold", "k"),
    [(True, True, 0.8, 3), (True, True, 0.5, 2), (False, True, 0.7, 3), (True, False, 0.8, 3)],
)
def test_same_decisions_as_an_incremental_datasketch_index(tmp_path: Path, exact: bool, near: bool, threshold: float, k: int) -> None:
    texts = planted(700)
    engine = GreedyDedup(exact=exact, near=near, threshold=threshold, num_perm=128, shingle_words=k, scratch_dir=tmp_path)
    try:
        for t in texts:
            engine.add(t)
        decisions = engine.decide()
    finally:
        engine.close()
    ours = list(zip(decisions.kind.tolist(), decisions.ref.tolist()))
    expected = oracle(texts, exact=exact, near=near, threshold=threshold, num_perm=128, k=k)
    assert ours == expected
    kinds = [kind for kind, _ in ours]
    # the planted data exercises every path the configuration allows
    assert (EXACT in kinds) == exact and (NEAR in kinds) == near and kinds.count(0) > 500
    assert not list(tmp_path.iterdir()), "scratch files are removed"


def test_the_stage_names_the_earlier_record_and_streams(tmp_path: Path) -> None:
    from tests.support import make_recipe, read_jsonl, run

    texts = planted(120, seed=3)
    from datatailor.io import read_records

    run(make_recipe(tmp_path, [{"type": "dedup"}], rows=[{"instruction": t or "x"} for t in texts]), tmp_path / "out")
    rows = [{"id": r.id, "instruction": r.instruction} for r in read_records(tmp_path / "input.jsonl")]
    expected = oracle([r["instruction"] for r in rows], exact=True, near=True, threshold=0.8, num_perm=128, k=3)
    kept = [r["id"] for r in read_jsonl(tmp_path / "out/data.jsonl")]
    failures = read_jsonl(tmp_path / "out/failures.jsonl")
    assert kept == [rows[i]["id"] for i, (kind, _) in enumerate(expected) if kind == 0]
    dropped = [(i, kind, ref) for i, (kind, ref) in enumerate(expected) if kind]
    assert [f["id"] for f in failures] == [rows[i]["id"] for i, _, _ in dropped]
    for f, (_, kind, ref) in zip(failures, dropped):
        assert f["kind"] == ("duplicate" if kind == EXACT else "near_duplicate")
        assert f["message"].endswith(f"of {rows[ref]['id']}")


def test_records_keep_their_content(tmp_path: Path) -> None:
    from datatailor.stages.select import Dedup, DedupConfig
    from datatailor.stages.base import StageContext
    from datatailor.store import ListSource

    ctx = StageContext(models=None, stage_name="dedup", seed=0, artifacts_dir=tmp_path, base_dir=tmp_path)  # type: ignore[arg-type]
    stage = Dedup(DedupConfig(type="dedup"), ctx)
    records = [Record(id="a", instruction="Name three rivers in Europe."), Record(id="b", instruction="name three rivers in europe")]
    decisions = list(stage.decide(ListSource(records)))
    assert decisions[0][1].instruction == records[0].instruction and decisions[0][1].lineage[-1].decision == "kept"
    assert decisions[1][1] is None and decisions[1][2] == ("duplicate", "exact duplicate of a")
