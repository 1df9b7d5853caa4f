"""TeaMs-RL's per-record data: the `teams_rl` namespace of a generated pair."""

from __future__ import annotations

from pydantic import Field

from datatailor.stages.contract import register_capability
from datatailor.stages.namespace import Namespace


class TeamsData(Namespace):
    key = "teams_rl"

    seed_id: str
    seed_instruction: str
    episode: int = Field(0, description="Which of the seed's episodes (0-based; see teams.generate's episodes_per_seed).")
    step: int = Field(description="Which step of the episode produced this instruction (1-based).")
    ops: list[str] = Field(default_factory=list, description="The operation chosen at each step of the episode (every step, "
                           "also those after this pair's and the eliminated ones).")
    rewards: list[float | None] = Field(
        default_factory=list, description="The reviewer's verdict per step: 1 not equal, 0 equal; None when no reviewer was "
        "asked (elimination off, a rewrite that did not parse, or one eliminated for copying the prompt's words).",
    )
    eliminated: list[str | None] = Field(default_factory=list, description="Per step: why the rewrite was eliminated, or None.")
    schedule: str
    policy: str | None = None


register_capability("teams_rl.policy", "a trained TeaMs-RL policy (teams.train)", lambda r: False)
