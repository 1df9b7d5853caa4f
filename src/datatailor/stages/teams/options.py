"""What a user chooses about TeaMs-RL's policy training. A module of its own, below both `teams.train`'s config
(stages.py) and the trainer (train/rl.py), so neither has to import the other to know these fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PolicyOptions(BaseModel):
    """What a user chooses about the policy's training; `teams.train` takes these fields as they are."""

    model_config = ConfigDict(extra="forbid")

    updates: int = Field(200, ge=1, description="TRPO updates (the official code: 200).")
    n_envs: int = Field(4, ge=1, description="Episodes per update, stepped concurrently (the official code: 1).")
    observation: Literal["faithful", "informative"] = Field(
        "faithful", description="faithful: the paper's one-hot of the last operation; informative: an embedding of the instruction and the step."
    )
    embedder: Literal["minilm", "hashing"] = Field("minilm", description="informative mode: all-MiniLM-L6-v2, or a hashing bag of words (no model).")
    breadth_bias: float = Field(0.3, description="Added to the breadth component before the argmax during training (the official code: +0.3).")
    chain: bool = Field(False, description="The official code's single never-reset chain of rewrites instead of episodes from seeds.")
