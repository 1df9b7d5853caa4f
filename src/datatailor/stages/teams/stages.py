"""`teams.train` (train the policy with TRPO) and `teams.generate` (evolve seeds with it, answer with the expert)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from datatailor.errors import ParseFailure, RecordFailure, UserError
from datatailor.records import LineageEvent, Record
from datatailor.stages.base import RECORD_VARIABLES, BatchResult, BatchStage, MapStage, StageConfig, register
from datatailor.stages.contract import Contract
from datatailor.stages.evolve import evolve, is_equal, is_only_punctuation_and_stop_words, is_sorry_and_short, leaked_phrase
from datatailor.stages.teams.data import TeamsData
from datatailor.stages.teams.env import EPISODE_LENGTH, N_ACTIONS, OPERATIONS, EvolCore, bias_vector, decode_action
from datatailor.stages.teams.options import PolicyOptions

TRAIN_FOLDER = "policy"  # inside the teams.train stage's folder


class TrainConfig(PolicyOptions, StageConfig):
    """The policy options (updates, n_envs, observation, embedder, breadth_bias, chain; see PolicyOptions) and the
    stage's own: the roles, the optional reward terms, the rewriter's temperature and the seed."""

    type: Literal["teams.train"] = "teams.train"
    rewriter_role: str = Field("rewriter", description="Applies the chosen operation during training (the official code: a local WizardLM-13B).")
    reviewer_role: str = Field("reviewer", description="Judges whether the rewrite adds anything: its verdict is the reward.")
    elimination: bool = Field(False, description="Extra reward term: a rewrite that copies the prompt's words earns 0 and is undone (WizardLM).")
    novelty_weight: float = Field(0.0, ge=0, description="Extra reward term: weight × (1 − ROUGE-L with the closest instruction generated so far).")
    rewriter_temperature: float | None = Field(
        0.0, description="The official code's local model decodes greedily (no do_sample), whatever its temperature says."
    )
    seed: int | None = Field(None, description="TRPO's seed (default: the recipe's).")


@register("teams.train")
class Train(BatchStage[TrainConfig]):
    """TeaMs-RL (Gu et al., arXiv 2403.08694): train a policy that picks the Evol-Instruct operation to apply next,
    with TRPO (sb3-contrib; MLP 64-64, γ 0.995, λ 0.97, max-KL 0.01, damping 0.1, 10 CG steps, 10 line-search steps).
    The reward is the reviewer's verdict that a rewrite is "Not Equal" to the instruction before it. Every rewrite and
    review goes through the engine (cache, usage, budget). Checkpoints after every update in the stage's folder; a
    killed run resumes from the last one. The seeds pass through for `teams.generate`."""

    Config = TrainConfig
    method = "teams_rl"
    needs = ("instruction",)
    provides = ("teams_rl.policy",)

    def settings(self) -> Any:
        from datatailor.train.rl import RLSettings

        cfg = self.config
        options = cfg.model_dump(include=set(PolicyOptions.model_fields))
        return RLSettings(**options, seed=self.ctx.seed if cfg.seed is None else cfg.seed)

    async def process_all(self, records: list[Record]) -> BatchResult:
        from datatailor.train.rl import train_policy

        cfg = self.config
        core = EvolCore(self.ctx.model(cfg.rewriter_role), self.ctx.model(cfg.reviewer_role), stage=self.name,
                        elimination=cfg.elimination, novelty_weight=cfg.novelty_weight,
                        rewriter_temperature=cfg.rewriter_temperature)
        loop = asyncio.get_running_loop()

        def call(coro: Any) -> Any:  # from the training thread, run the model calls on the run's event loop
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        out = self.ctx.artifact(TRAIN_FOLDER)
        summary = await asyncio.to_thread(train_policy, core, [r.prompt for r in records], out, self.settings(), call, sys.stderr)
        event = LineageEvent(stage=self.name, decision="policy_trained", details={"policy": summary["policy"], "updates": summary["updates"]})
        return BatchResult(outputs=[r.with_event(event) for r in records])


# ----------------------------------------------------------------------------- teams.generate


class GenerateConfig(StageConfig):
    type: Literal["teams.generate"] = "teams.generate"
    policy: str | None = Field(None, description="A training folder or checkpoint zip (default: the policy teams.train wrote earlier in the recipe).")
    rewriter_role: str = Field("expert", description="Applies the operations (the paper: the expert model, ChatGPT).")
    reviewer_role: str = Field("reviewer", description="Elimination check 1 (is the rewrite equal to its source?).")
    expert_role: str = Field("expert", description="Answers the kept instructions (fresh answers: never the seeds' old ones).")
    steps: int = Field(EPISODE_LENGTH, ge=1, description="Steps per seed (the paper: 6).")
    schedule: Literal["official", "policy", "random"] = Field(
        "official",
        description=(
            "official: the released generation code's rules (+0.7 on add constraints, breadth forced at steps 2 and 5, "
            "breadth elsewhere becomes add constraints); policy: the trained policy alone; random: a uniform choice (a baseline)."
        ),
    )
    keep: Literal["all", "last"] = Field(
        "all", description="all: each step's instruction is a pair (the official logs keep all 6); last: only the last step "
        "that survived the checks and was answered (an eliminated final step falls back to the one before).",
    )
    episodes_per_seed: int = Field(
        1, ge=1, description="Episodes per seed, each from the seed itself (the official code: 1, over 52K Alpaca seeds). "
        "A few seeds and a large budget need more: at most seeds × episodes × steps pairs (keep: all).",
    )
    elimination: bool = Field(True, description="WizardLM's elimination checks on every step (an eliminated rewrite is undone).")
    rewriter_temperature: float | None = Field(0.7, description="The official generation code's expert: 0.7 (top_p 0.95).")
    respond_template: str = "respond.j2"
    response_max_tokens: int | None = None


@register("teams.generate")
class Generate(MapStage[GenerateConfig]):
    """Evolve each seed instruction for 6 steps, choosing each step's operation with the trained TeaMs-RL policy (or
    the official schedule, or at random), apply WizardLM's elimination checks, and have the expert answer every kept
    instruction. Each step's instruction is a pair (`keep: all`, as the official logs) or only the last one."""

    Config = GenerateConfig
    method = "teams_rl"
    needs = ("instruction",)
    provides = ("instruction", "response")
    templates = {"respond_template": RECORD_VARIABLES}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        needs = list(cls.needs)
        if config is not None and config.policy is None and config.schedule != "random":
            needs.append("teams_rl.policy")
        return Contract.of(needs, cls.provides)

    def __init__(self, config: GenerateConfig, ctx: Any):
        super().__init__(config, ctx)
        self._policy: tuple[Any, Any, str] | None = None

    def policy(self) -> tuple[Any, Any, str]:
        if self._policy is None:
            from datatailor.train.rl import load_policy

            if self.config.policy is not None:
                path = self.ctx.base_dir / self.config.policy
            else:
                found = next((d / TRAIN_FOLDER for d in reversed(self.ctx.earlier_dirs) if (d / TRAIN_FOLDER).is_dir()), None)
                if found is None:
                    raise UserError(f"{self.name}: no policy: set `policy`, or put teams.train before this stage")
                path = found
            model, normaliser = load_policy(Path(path))
            self._policy = (model, normaliser, str(path))
        return self._policy

    def choose(self, record: Record, step: int, last_op: int | None, instruction: str, episode: int = 0) -> int:
        """The operation of `step` (0-based), sampled with a per-record, per-step seed (so it does not depend on timing)."""
        cfg = self.config
        rng = np.random.default_rng(self.ctx.rng(record.id, "op", *_episode_key(episode), step).getrandbits(32))
        if cfg.schedule == "random":
            return int(rng.integers(N_ACTIONS))
        from datatailor.train.rl import action_distribution

        model, normaliser, _ = self.policy()
        obs = self._observation(model, last_op, step, instruction)
        mean, std = action_distribution(model, normaliser, obs[None, :])
        action = mean[0] + std[0] * rng.standard_normal(N_ACTIONS)
        if cfg.schedule == "policy":
            return decode_action(action)
        if step in (1, 4):  # the released generation code forces breadth at t = 1 and t = 4
            return OPERATIONS.index("breadth")
        op = decode_action(action, bias_vector(add_constraints=0.7))
        return OPERATIONS.index("add_constraints") if OPERATIONS[op] == "breadth" else op

    def _observation(self, model: Any, last_op: int | None, step: int, instruction: str) -> np.ndarray:
        dim = model.observation_space.shape[0]
        obs = np.zeros(dim, dtype=np.float32)
        if dim == N_ACTIONS:  # faithful: one-hot of the last operation
            if last_op is not None:
                obs[last_op] = 1.0
            return obs
        from datatailor.train.rl import make_embedder

        embedder = make_embedder("minilm" if dim - EPISODE_LENGTH == 384 else "hashing")
        vector = np.asarray(embedder([instruction]), dtype=np.float32)[0]
        obs[: vector.shape[0]] = vector
        obs[vector.shape[0] + min(step, EPISODE_LENGTH - 1)] = 1.0
        return obs

    async def _check(self, previous: str, evolved: str, key: Any, events: list[LineageEvent]) -> tuple[float | None, str | None]:
        """WizardLM's checks 4 (copied template words) and 1 (no information gain): the reviewer's verdict (1 not
        equal, 0 equal, None when it was not asked or did not parse) and the elimination reason, or None."""
        if phrase := leaked_phrase(evolved):
            return None, f"copies the template phrase {phrase!r}"
        try:
            equal = await is_equal(self.ctx.model(self.config.reviewer_role), previous, evolved, seed_key=(key, "review"),
                                   base_dir=self.ctx.base_dir, stage=self.name)
        except ParseFailure as exc:
            return None, f"the information-gain check did not parse ({exc})"
        events.append(equal.event(self.name, decision="equal" if equal.value else "not_equal"))
        if equal.value:
            return 0.0, "no information gain: judged equal to the previous instruction"
        return 1.0, None

    async def _answer(self, record: Record, instruction: str, key: Any, events: list[LineageEvent]) -> str | None:
        asked = record.model_copy(update={"instruction": instruction, "input": "", "response": None})
        try:
            gen = await self.answer(self.config.expert_role, asked, seed_key=(key, "answer"), max_tokens=self.config.response_max_tokens)
        except RecordFailure as exc:
            if exc.kind in ("empty_response", "truncated"):
                return None
            raise
        events.append(gen.event(self.name, decision="answered"))
        text = gen.text.strip()
        return None if is_sorry_and_short(text) or is_only_punctuation_and_stop_words(text) else text

    async def process(self, record: Record) -> list[Record]:
        outputs: list[Record] = []
        reasons: list[str] = []
        events: list[LineageEvent] = []
        for episode in range(self.config.episodes_per_seed):
            pairs, why, episode_events = await self._episode(record, episode)
            outputs += pairs
            events += episode_events
            if why:
                reasons.append(why if self.config.episodes_per_seed == 1 else f"episode {episode + 1}: {why}")
        if not outputs:  # every step of every episode eliminated: the seed is a failure row that says why
            traced = record.model_copy(deep=True)
            traced.lineage.extend(events)
            raise RecordFailure(f"no step of the episode was kept: {' | '.join(reasons)}", kind="eliminated", record=traced)
        return outputs

    async def _episode(self, record: Record, episode: int) -> tuple[list[Record], str | None, list[LineageEvent]]:
        """One episode from the seed: its pairs, why it has none (or None), and its lineage events."""
        cfg = self.config
        current, last_op = record.prompt, None
        log = EpisodeLog(self.name)
        survivors: list[tuple[int, str]] = []  # (step, instruction) of each step that passed the checks
        kept: list[tuple[int, str, str, int]] = []  # (step, instruction, answer, events so far)
        events: list[LineageEvent] = []
        for step in range(cfg.steps):
            op = self.choose(record, step, last_op, current, episode)
            log.ops.append(OPERATIONS[op])
            key = (self.name, record.id, *_episode_key(episode), step)
            try:
                gen = await evolve(self.ctx.model(cfg.rewriter_role), current, OPERATIONS[op], seed_key=(key, "rewrite"),
                                   base_dir=self.ctx.base_dir, stage=self.name, temperature=cfg.rewriter_temperature)
            except ParseFailure as exc:
                log.record(step, None, f"no instruction in the rewrite ({exc})", events)
                continue
            last_op = op
            events.append(gen.event(self.name, decision="evolved", op=OPERATIONS[op], step=step + 1))
            # no reviewer asked with the checks off: no verdict (None), never a reward of 1 nobody gave
            verdict, reason = await self._check(current, gen.value, key, events) if cfg.elimination else (None, None)
            answer = None
            if reason is None and cfg.keep == "all":
                answer = await self._answer(record, gen.value, key, events)
                if answer is None and cfg.elimination:
                    reason = UNUSABLE_ANSWER
            log.record(step, verdict, reason, events)
            if reason:
                continue
            current = gen.value
            survivors.append((step, current))
            if answer is not None:
                kept.append((step, current, answer, len(events)))
        if cfg.keep == "last":
            kept = await self._answer_last(record, episode, survivors, log, events)
        why = None if kept else ("; ".join(f"step {i + 1}: {r}" for i, r in enumerate(log.eliminated) if r) or "nothing answered")
        return self._pairs(record, episode, kept, log, events), why, events

    async def _answer_last(self, record: Record, episode: int, survivors: list[tuple[int, str]], log: EpisodeLog,
                           events: list[LineageEvent]) -> list[tuple[int, str, str, int]]:
        """keep: last: answer the last step that survived the checks; when its answer is unusable (an elimination
        with the checks on), the one before it, and so on, so an eliminated final step never costs the seed its work."""
        for step, instruction in reversed(survivors):
            key = (self.name, record.id, *_episode_key(episode), step)
            answer = await self._answer(record, instruction, key, events)
            if answer is not None:
                return [(step, instruction, answer, len(events))]
            if self.config.elimination:
                log.eliminated[step] = UNUSABLE_ANSWER
                log.event(step, UNUSABLE_ANSWER, events)
        return []

    def _pairs(self, record: Record, episode: int, kept: list[tuple[int, str, str, int]], log: EpisodeLog,
               events: list[LineageEvent]) -> list[Record]:
        outputs: list[Record] = []
        start = 0
        policy_label = None if self.config.schedule == "random" else self.policy()[2]
        for i, (step, instruction, answer, upto) in enumerate(kept):
            # Each pair carries the calls made since the previous kept pair (the last one: all that remain), so every
            # call is counted once; with keep: last the one pair carries them all.
            end = len(events) if i == len(kept) - 1 else upto
            pair = record.child(("teams.generate", *_episode_key(episode), step), instruction=instruction, input="", response=answer)
            pair.metadata = TeamsData(seed_id=record.id, seed_instruction=record.prompt, episode=episode, step=step + 1,
                                      ops=list(log.ops), rewards=list(log.rewards), eliminated=list(log.eliminated), schedule=self.config.schedule,
                                      policy=policy_label).stored(pair)
            pair.lineage.extend(e.model_copy(deep=True) for e in events[start:end])
            outputs.append(pair)
            start = end
        return outputs


UNUSABLE_ANSWER = "the expert's answer is unusable (empty, cut off, a short 'sorry' or only stop words)"


def _episode_key(episode: int) -> tuple[int, ...]:
    """The first episode keeps the keys (ids, seeds, cache) of a stage without `episodes_per_seed`."""
    return (episode,) if episode else ()


@dataclass
class EpisodeLog:
    """Per step of one episode: the operation chosen, the reviewer's verdict (None: not asked) and why it was eliminated."""

    stage: str
    ops: list[str] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)
    eliminated: list[str | None] = field(default_factory=list)

    def record(self, step: int, verdict: float | None, reason: str | None, events: list[LineageEvent]) -> None:
        self.rewards.append(verdict)
        self.eliminated.append(reason)
        if reason:
            self.event(step, reason, events)

    def event(self, step: int, reason: str, events: list[LineageEvent]) -> None:
        events.append(LineageEvent(stage=self.stage, decision="eliminated", reason=reason, details={"step": step + 1}))
