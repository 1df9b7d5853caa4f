"""How confident the ranking is: a paired bootstrap over test items.

Every method was judged on the same items, so one resample of item indices (with replacement) is applied to
all methods at once; a method's interval is the 2.5th and 97.5th percentile of its CRR over the resamples,
and two methods differ when the interval of their CRR difference, over the same resamples, leaves out 0.
"""

from __future__ import annotations

import numpy as np

# CRR counts a tie as recovered capacity: (W + T) / N (CodecLM)
RECOVERED = {"win": 1.0, "tie": 1.0, "loss": 0.0}


def bootstrap(outcomes: dict[str, list[str]], resamples: int, seed: int) -> dict[str, object]:
    """`outcomes`: per method, its outcome on each item ("win"/"tie"/"loss"), items in the same order for all.

    Returns per method its CRR and 95 % interval, the ranking (highest CRR first), and for each method and the
    one ranked just below it the interval of the difference and whether it leaves out 0."""
    methods = list(outcomes)
    lengths = {len(v) for v in outcomes.values()}
    if len(lengths) != 1:
        raise ValueError(f"methods were judged on different numbers of items: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n == 0:
        return {"items": 0, "resamples": resamples, "methods": {}, "ranking": [], "differences": []}
    values = np.array([[RECOVERED[o] for o in outcomes[m]] for m in methods])  # methods × items
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    samples = values[:, idx].mean(axis=2)  # methods × resamples
    point = values.mean(axis=1)
    per = {m: {"crr": float(point[i]), "low": float(np.percentile(samples[i], 2.5)), "high": float(np.percentile(samples[i], 97.5))}
           for i, m in enumerate(methods)}
    ranking = sorted(methods, key=lambda m: (-per[m]["crr"], methods.index(m)))
    differences = []
    for upper, lower in zip(ranking, ranking[1:]):
        d = samples[methods.index(upper)] - samples[methods.index(lower)]
        low, high = float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))
        differences.append({"higher": upper, "lower": lower, "difference": per[upper]["crr"] - per[lower]["crr"],
                            "low": low, "high": high, "differs": low > 0 or high < 0})
    return {"items": n, "resamples": resamples, "methods": per, "ranking": ranking, "differences": differences}
