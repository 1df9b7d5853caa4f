"""CoachLM (Liu et al., ICDE 2024, arXiv 2311.13246): a coach model trained on expert revisions rewrites weak pairs
instead of dropping them.

* `prepare`  expert revisions → the coach's training set: repairs, revision size (edit distance), α selection,
             a held-out split (`datatailor coach prepare`).
* `format`   the coach format (marked instruction / input / response sections), the same for training and revision,
             and its parser with rule-based cleanup.
* `revise`   `coach.revise`: revise each pair with a trained coach (the `coach` role, e.g. the output of
             `datatailor train --preset coachlm_coach`) or a prompted one; never writes a bad revision over a pair.
* `data`     the `coach` record namespace.

The run's report: `report/coach.py` (share changed, edit distances, fields changed, quality before/after, closeness
to the experts' revisions when the pairs carry them).
"""

from datatailor.stages.coach.data import CoachData
from datatailor.stages.coach.format import Pair, directive, parse_pair, serialize_pair
from datatailor.stages.coach.prepare import ExpertPair, load_expert_pairs, prepare, revision_size, select_alpha, split
from datatailor.stages.coach.revise import Revise, ReviseConfig, changed_fields

__all__ = [
    "CoachData", "ExpertPair", "Pair", "Revise", "ReviseConfig", "changed_fields", "directive", "load_expert_pairs",
    "parse_pair", "prepare", "revision_size", "select_alpha", "serialize_pair", "split",
]
