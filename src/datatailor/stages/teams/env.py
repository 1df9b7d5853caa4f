"""TeaMs-RL's environment: the policy picks an Evol-Instruct operation, a rewriter applies it, a reviewer's
judgement is the reward (Gu et al., arXiv 2403.08694).

* Action: a continuous 6-vector, decoded by argmax (after an optional per-component bias) into one of the six
  operations, in the paper's index order (`OPERATIONS`).
* Step: the `rewriter` role rewrites the current instruction with that operation; the `reviewer` role is asked
  whether the rewrite equals the previous instruction. Reward 1 when it is "Not Equal" (read tolerantly: "Not
  Equal." counts; the official code needs the exact string), else 0. Optional extra terms, off by default:
  WizardLM's leak check (a rewrite that copies the prompt's words earns 0 and is undone) and novelty (ROUGE-L
  distance to the instructions generated so far, weighted).
* Episode: 6 steps from a seed instruction drawn (seeded) from the seed set; `chain=True` keeps the official code's
  single never-reset chain instead.
* Observation: `faithful`, the paper's one-hot of the last operation (normalise it with a running mean/std, as the
  paper's filter, e.g. SB3's VecNormalize); or `informative`, an embedding of the current instruction plus the step.

This module holds the logic (no RL library needed); `vec.py` wraps it as a stable-baselines3 vector environment
whose `step` issues all its environments' model calls at once, and as a single Gymnasium environment. Both call the
models through the engine (cache, usage, budget, retries): `call` runs a coroutine on the run's event loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from datatailor.errors import ParseFailure
from datatailor.llm.models import RoleModel
from datatailor.scoring.embedding import Embedder
from datatailor.scoring.novelty import NoveltyIndex
from datatailor.stages.evolve import evolve, is_equal, leaked_phrase

# The paper's index order of the six operations (0 breadth … 5 complicate input).
OPERATIONS = ("breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning", "complicate_input")
N_ACTIONS = len(OPERATIONS)
EPISODE_LENGTH = 6
ObservationMode = Literal["faithful", "informative"]
Call = Callable[[Coroutine[Any, Any, Any]], Any]


def decode_action(action: Any, bias: Any = None) -> int:
    """The operation index of a continuous action: argmax of the vector plus the per-component bias."""
    vector = np.asarray(action, dtype=np.float64).reshape(-1)
    if vector.shape[0] != N_ACTIONS:
        raise ValueError(f"an action has {N_ACTIONS} components, got {vector.shape[0]}")
    if bias is not None:
        vector = vector + np.asarray(bias, dtype=np.float64)
    return int(np.argmax(vector))


def bias_vector(**by_operation: float) -> np.ndarray:
    """A bias over the six operations, e.g. bias_vector(breadth=0.3) (the paper's training bias)."""
    vector = np.zeros(N_ACTIONS)
    for name, value in by_operation.items():
        vector[OPERATIONS.index(name)] = value
    return vector


@dataclass
class StepResult:
    instruction: str  # the instruction after the step (the previous one when the rewrite was undone)
    reward: float
    op: str
    rewritten: str | None  # what the rewriter returned
    not_equal: bool | None  # the reviewer's verdict (None: no verdict)
    eliminated: str | None = None


@dataclass
class EvolCore:
    """One rewrite and one review, through the engine's role models."""

    rewriter: RoleModel
    reviewer: RoleModel
    stage: str
    elimination: bool = False
    novelty_weight: float = 0.0
    rewriter_temperature: float | None = 0.0
    reviewer_temperature: float | None = 0.0
    novelty: NoveltyIndex = field(default_factory=NoveltyIndex)

    async def step(self, current: str, op: str, key: Any) -> StepResult:
        try:
            gen = await evolve(self.rewriter, current, op, seed_key=(key, "rewrite"), stage=self.stage,
                               temperature=self.rewriter_temperature)
        except ParseFailure as exc:
            return StepResult(current, 0.0, op, None, None, f"no instruction in the rewrite ({exc})")
        new = gen.value
        if self.elimination and (phrase := leaked_phrase(new)):
            return StepResult(current, 0.0, op, new, None, f"copies the template phrase {phrase!r}")
        try:
            review = await is_equal(self.reviewer, current, new, seed_key=(key, "review"), stage=self.stage,
                                    temperature=self.reviewer_temperature)
        except ParseFailure as exc:
            return StepResult(new, 0.0, op, new, None, f"the review did not parse ({exc})")
        not_equal = not review.value
        reward = 1.0 if not_equal else 0.0
        if self.elimination and not not_equal:
            return StepResult(current, reward, op, new, False, "no information gain: judged equal to the previous instruction")
        return StepResult(new, reward, op, new, not_equal)

    def score_novelty(self, results: list[StepResult]) -> None:
        """Add the novelty term to each reviewed rewrite's reward, in the given order (so concurrent steps score the
        same whichever review came back first): weight × (1 − ROUGE-L with the closest instruction generated so far)."""
        if not self.novelty_weight:
            return
        for res in results:
            if res.rewritten is None or res.not_equal is None:
                continue
            similarity, _ = self.novelty.closest(res.rewritten)
            res.reward += self.novelty_weight * (1.0 - similarity)
            self.novelty.add(str(len(self.novelty.ids)), res.rewritten)


@dataclass
class Episode:
    seed: str
    instruction: str
    step: int = 0
    last_op: int | None = None
    reward: float = 0.0
    ops: list[str] = field(default_factory=list)


class Observer:
    """Builds the policy's observation of an episode."""

    def __init__(self, mode: ObservationMode, embedder: Embedder | None = None):
        if mode == "informative" and embedder is None:
            raise ValueError("the informative observation needs an embedder")
        self.mode = mode
        self.embedder = embedder
        self.dim = N_ACTIONS if mode == "faithful" else int(np.asarray(embedder(["x"])).shape[1]) + EPISODE_LENGTH  # type: ignore[misc]

    def __call__(self, episodes: list[Episode]) -> np.ndarray:
        obs = np.zeros((len(episodes), self.dim), dtype=np.float32)
        if self.mode == "faithful":
            for i, e in enumerate(episodes):
                if e.last_op is not None:
                    obs[i, e.last_op] = 1.0
            return obs
        vectors = np.asarray(self.embedder([e.instruction for e in episodes]), dtype=np.float32)  # type: ignore[misc]
        obs[:, : vectors.shape[1]] = vectors
        for i, e in enumerate(episodes):
            obs[i, vectors.shape[1] + min(e.step, EPISODE_LENGTH - 1)] = 1.0
        return obs


class SeedSampler:
    """Seed instructions for new episodes, drawn uniformly with the run's seed (one stream per environment)."""

    def __init__(self, seeds: list[str], seed: int):
        if not seeds:
            raise ValueError("TeaMs-RL needs at least one seed instruction")
        self.seeds = seeds
        self.seed = seed

    def rng(self, env_index: int) -> random.Random:
        return random.Random(f"teams-rl:{self.seed}:{env_index}")
