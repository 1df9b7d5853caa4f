"""Reference-Level Feedback, REFED (Mehri et al., EACL 2026, arXiv 2502.04511): feedback collected once per
high-quality reference pair guides the synthesis and the improvement of many new pairs.

Stages (one call per step, as in the paper):

* `references`  `refed.references`: draw single-turn reference pairs uniformly without replacement, only as many as
                the budget needs; more in top-up rounds when the run ends short.
* `feedback`    `refed.feedback` (once per reference: instruction features, response feedback) and
                `refed.sample_feedback` (once per generated pair: the ablation).
* `synthesis`   `refed.synthesize` (per feature, N new instructions), `refed.respond` (a draft with the reference
                pair as the worked example), `refed.improve` (the draft improved by the feedback).
* `data`        the `refed` record namespace (`RefedData`), the teacher's JSON schemas, the capabilities.

Filters that work on any method's output: `judge.pairwise` with `keep: a` (the LLM-judge filter), `filter.rouge`
(greedy ROUGE-L novelty), `select` with `strategy: random`. The run's report: `report/refed.py`.
"""

from datatailor.stages.refed.data import FEATURES, Improvement, InstructionFeedback, Instructions, RefedData, ResponseFeedback
from datatailor.stages.refed.feedback import Feedback, SampleFeedback
from datatailor.stages.refed.references import References
from datatailor.stages.refed.synthesis import Improve, Respond, Synthesize, at_least_one, clean_instructions, exactly, per_feature_counts

__all__ = [
    "FEATURES", "Feedback", "Improve", "Improvement", "InstructionFeedback", "Instructions", "RefedData", "References",
    "Respond", "ResponseFeedback", "SampleFeedback", "Synthesize", "at_least_one", "clean_instructions", "exactly",
    "per_feature_counts",
]
