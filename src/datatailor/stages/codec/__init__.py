"""CodecLM (Wang et al., NAACL 2024, arXiv 2404.05875): encode seeds to metadata, decode tailored instructions,
make them harder with Self-Rubrics, and keep the pairs the target model gets wrong (Contrastive Filtering).

Stages, each usable on its own in a recipe (one module per job):

* `pool`         `codec.encode` (seed → use case + skills, strong model, few-shot), `codec.metadata` (metadata
                 written by hand), `codec.augment` (grow the pool to N entries by mix-and-match).
* `generation`   `codec.rubrics` (per entry: n rubrics and n paired actions, one shared call per entry),
                 `codec.decode` (per entry: k = ceil(budget_pairs / pool size) instructions, with top-up rounds
                 when filtering leaves the run short), `codec.improve` (rewrite by one sampled action).
* `contrastive`  `codec.contrastive` (strong vs target answer, judged in both orders; keep when |G| > θ, else
                 improve and retry) and the CodecLM report.
* `select`       `codec.select` (trim to exactly budget_pairs).
* `data`         the `codec` record namespace (`CodecData`), metadata entries, the capabilities the stages
                 declare; `parsers` reads the models' plain-text replies.

docs/method-contract.md describes the contract every method follows, with this package as the worked example.
"""

from datatailor.stages.codec.contrastive import Contrastive, ContrastiveConfig, named_scores
from datatailor.stages.codec.data import (
    ActionStep,
    CodecData,
    ContrastiveResult,
    codec_metadata,
    entry_key,
    entry_record,
    metadata_id,
)
from datatailor.stages.codec.generation import (
    Decode,
    DecodeConfig,
    Improve,
    ImproveConfig,
    Rubrics,
    RubricsConfig,
    improve_instruction,
    instructions_per_entry,
    pick_action,
)
from datatailor.stages.codec.parsers import (
    clean_item,
    clean_skill,
    parse_improved,
    parse_instruction_list,
    parse_rewritten,
    parse_rubrics_actions,
)
from datatailor.stages.codec.pool import Augment, AugmentConfig, Encode, EncodeConfig, GivenMetadata, MetadataConfig, load_given_entries
from datatailor.stages.codec.select import BudgetSelect, CodecSelect, Select, SelectConfig

__all__ = [
    "ActionStep", "Augment", "AugmentConfig", "CodecData", "ContrastiveResult", "Contrastive", "ContrastiveConfig",
    "Decode", "DecodeConfig", "Encode", "EncodeConfig", "GivenMetadata", "Improve", "ImproveConfig", "MetadataConfig",
    "BudgetSelect", "CodecSelect", "Rubrics", "RubricsConfig", "Select", "SelectConfig", "clean_item", "clean_skill", "codec_metadata", "entry_key",
    "entry_record", "improve_instruction", "instructions_per_entry", "load_given_entries", "metadata_id",
    "named_scores", "parse_improved", "parse_instruction_list", "parse_rewritten", "parse_rubrics_actions", "pick_action",
]
