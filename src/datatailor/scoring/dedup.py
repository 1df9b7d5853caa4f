"""Greedy exact and near-duplicate removal in bounded memory.

The decisions are those of a sequential pass over the records in input order with a MinHash LSH index of
the records kept so far (datasketch's `MinHashLSH` at the same threshold, permutations and bands): a
record is dropped when an earlier *kept* record has the same normalised text (exact), or shares an LSH
band with it and has an estimated Jaccard similarity ≥ threshold (near; the earliest such record is
named). Connected components would drop more (in an A~B~C chain, C survives when B was dropped); the
greedy rule keeps what an incremental index keeps.

What it holds in memory per record: a 16-byte digest of the normalised text, and for the records that
share a band with another record, their band groups. Signatures (4 bytes × num_perm per record) and band
columns go to scratch files that are read back in chunks; candidate pairs are verified one signature read
at a time. `signatures()` is the per-record part (a map, which a distributed executor can spread) and
`greedy()` the whole-set part.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)

EXACT, NEAR = 1, 2
CHUNK = 8192


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, n: int) -> set[str]:
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): datasketch's choice for this threshold with recall-heavy weights (0.05, 0.95)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
    return lsh.b, lsh.r


class Signer:
    """MinHash signatures of texts (datasketch, seed 1), with the permutations built once."""

    def __init__(self, num_perm: int, shingle_words: int):
        from datasketch import MinHash  # slow to import (pulls scipy): only when used

        self._minhash = MinHash
        self._template = MinHash(num_perm=num_perm, seed=1)
        self.num_perm = num_perm
        self.shingle_words = shingle_words

    def __call__(self, text: str) -> np.ndarray:
        t = self._template
        mh = self._minhash(num_perm=self.num_perm, seed=1, permutations=t.permutations, scheme=t.scheme)
        mh.update_batch([s.encode("utf-8") for s in shingles(text, self.shingle_words)])
        return mh.hashvalues.astype(np.uint32, copy=False)


def exact_key(text: str) -> bytes:
    """16 bytes for the normalised text (ending in 0x01: numpy's fixed-width bytes drop trailing zero bytes)."""
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=15).digest() + b"\x01"


@dataclass
class Decisions:
    """Per input index: kind (0 kept, EXACT, NEAR) and the index of the earlier kept record it duplicates."""

    kind: np.ndarray
    ref: np.ndarray
    candidate_pairs: int = 0

    def __len__(self) -> int:
        return len(self.kind)

    def names(self) -> _Names:
        """Feed it each id in input order; it answers with the id of the record that one duplicates, remembering
        only the ids some later record refers to."""
        return _Names(set(self.ref[self.ref >= 0].tolist()), self.ref)


class _Names:
    def __init__(self, wanted: set[int], ref: np.ndarray):
        self._wanted, self._ref, self._known = wanted, ref, {}

    def see(self, index: int, record_id: str) -> str | None:
        if index in self._wanted:
            self._known[index] = record_id
        r = int(self._ref[index])
        return self._known[r] if r >= 0 else None


class GreedyDedup:
    """Run `add` for every text in input order (or `add_signed` with precomputed keys and signatures), then
    `decide()`. Scratch files live in a temporary folder under `scratch_dir`, removed by `close()`."""

    def __init__(self, *, exact: bool, near: bool, threshold: float, num_perm: int, shingle_words: int,
                 scratch_dir: Path | None = None):
        self.exact, self.near, self.threshold, self.num_perm = exact, near, threshold, num_perm
        self.bands, self.rows = lsh_bands(threshold, num_perm) if near else (0, 0)
        self.signer = Signer(num_perm, shingle_words) if near else None
        if scratch_dir is not None:
            scratch_dir.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=".dedup-", dir=scratch_dir))
        self._keys: list[bytes] = []  # the current chunk's; earlier chunks as arrays (16 bytes a record)
        self._key_chunks: list[np.ndarray] = []
        self._sig_fh = (self.scratch / "signatures.u32").open("wb")
        self._band_fhs = [(self.scratch / f"band{b:02d}.bin").open("wb") for b in range(self.bands)]
        self._pending: list[np.ndarray] = []
        self.count = 0

    # -- per record -----------------------------------------------------------------------------

    def add(self, text: str) -> None:
        self.add_signed(exact_key(text), self.signer(text) if self.signer is not None else None)

    def add_signed(self, key: bytes, signature: np.ndarray | None) -> None:
        self._keys.append(key)
        if len(self._keys) >= CHUNK:
            self._key_chunks.append(np.array(self._keys, dtype="S16"))
            self._keys = []
        self.count += 1
        if signature is not None:
            self._pending.append(signature)
            if len(self._pending) >= CHUNK:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        block = np.stack(self._pending).astype(np.uint32, copy=False)
        self._pending = []
        block.tofile(self._sig_fh)
        for b, fh in enumerate(self._band_fhs):
            np.ascontiguousarray(block[:, b * self.rows : (b + 1) * self.rows]).tofile(fh)

    # -- whole set ------------------------------------------------------------------------------

    def _band_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR of each record's band groups that hold more than one record: (offsets[n+1], dense group ids).
        Only records that share a band with another are listed (4 + 4 bytes per membership)."""
        n = self.count
        members: list[np.ndarray] = []
        groups: list[np.ndarray] = []
        band_dtype = np.dtype((np.void, 4 * self.rows))
        next_id = 0
        for b, fh in enumerate(self._band_fhs):
            fh.close()
            column = np.fromfile(self.scratch / f"band{b:02d}.bin", dtype=band_dtype)
            _, inverse, counts = np.unique(column, return_inverse=True, return_counts=True)
            del column
            inverse = inverse.reshape(-1)
            shared_groups = counts > 1
            dense = np.cumsum(shared_groups) - 1 + next_id  # ids for the groups of 2+ records, numbered across bands
            next_id += int(shared_groups.sum())
            shared = np.flatnonzero(shared_groups[inverse])
            members.append(shared.astype(np.int32))
            groups.append(dense[inverse[shared]].astype(np.int32))
            del inverse, counts, dense
        who = np.concatenate(members) if members else np.empty(0, np.int32)
        grp = np.concatenate(groups) if groups else np.empty(0, np.int32)
        del members, groups
        order = np.argsort(who, kind="stable")
        grp = grp[order]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(who, minlength=n))
        return offsets, grp

    def decide(self) -> Decisions:
        n = self.count
        self._flush()
        self._sig_fh.close()
        kind = np.zeros(n, dtype=np.int8)
        ref = np.full(n, -1, dtype=np.int64)
        keys = np.concatenate([*self._key_chunks, np.array(self._keys, dtype="S16")]) if self.count else np.empty(0, "S16")
        self._keys, self._key_chunks = [], []
        repeated = np.zeros(n, dtype=bool)
        if self.exact and n:
            _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            repeated = counts[inverse.reshape(-1)] > 1
        offsets, group_ids = self._band_groups() if self.near else (np.zeros(n + 1, np.int64), np.empty(0, np.int64))
        first_exact: dict[bytes, int] = {}
        # the kept records of each band group: the first in an array, any later ones in a dict (rare)
        first_kept = np.full(int(group_ids.max()) + 1 if len(group_ids) else 0, -1, dtype=np.int64)
        more_kept: dict[int, list[int]] = {}
        width = 4 * self.num_perm
        pairs = 0
        fd = os.open(self.scratch / "signatures.u32", os.O_RDONLY) if self.near else -1
        try:
            for i in np.flatnonzero(repeated | (offsets[1:] > offsets[:-1])).tolist():
                if repeated[i]:
                    earlier = first_exact.get(keys[i])
                    if earlier is not None:
                        kind[i], ref[i] = EXACT, earlier
                        continue
                groups = group_ids[offsets[i] : offsets[i + 1]].tolist()
                if groups:
                    candidates = sorted({c for g in groups for c in (int(first_kept[g]), *more_kept.get(g, ())) if c >= 0})
                    if candidates:
                        mine = np.frombuffer(os.pread(fd, width, i * width), dtype=np.uint32)
                        for c in candidates:
                            pairs += 1
                            theirs = np.frombuffer(os.pread(fd, width, c * width), dtype=np.uint32)
                            if np.count_nonzero(mine == theirs) / self.num_perm >= self.threshold:  # datasketch's estimate
                                kind[i], ref[i] = NEAR, c
                                break
                        if kind[i]:
                            continue
                    for g in groups:
                        if first_kept[g] < 0:
                            first_kept[g] = i
                        else:
                            more_kept.setdefault(g, []).append(i)
                if repeated[i]:
                    first_exact.setdefault(keys[i], i)
        finally:
            if fd >= 0:
                os.close(fd)
        return Decisions(kind, ref, pairs)

    def close(self) -> None:
        for fh in [self._sig_fh, *self._band_fhs]:
            fh.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
