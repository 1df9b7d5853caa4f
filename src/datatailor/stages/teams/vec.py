"""TeaMs-RL's environment as the RL libraries want it: `LLMVecEnv`, a stable-baselines3 vector environment whose
`step` issues all its environments' rewrites and reviews at once (the model calls overlap), and `EvolInstructEnv`,
the standard single-environment Gymnasium interface over the same logic (env.py). Needs the `rl` extra."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import numpy as np

from datatailor.stages.teams.env import (
    EPISODE_LENGTH,
    N_ACTIONS,
    OPERATIONS,
    Call,
    Episode,
    EvolCore,
    Observer,
    SeedSampler,
    StepResult,
    decode_action,
)


def _spaces(dim: int) -> tuple[Any, Any]:
    from gymnasium import spaces

    observation = spaces.Box(low=-np.inf, high=np.inf, shape=(dim,), dtype=np.float32)
    action = spaces.Box(low=-10.0, high=10.0, shape=(N_ACTIONS,), dtype=np.float32)
    return observation, action


def _vec_env_base() -> type:
    from stable_baselines3.common.vec_env import VecEnv

    return VecEnv


class LLMVecEnv(_vec_env_base()):  # type: ignore[misc]
    """`n_envs` TeaMs-RL environments stepped together: one `step` issues every environment's rewrite and review at
    once, so the model calls overlap. Episodes end after 6 steps and restart from a new seed (SB3's auto-reset)."""

    render_mode = None

    def __init__(
        self, core: EvolCore, seeds: list[str], *, n_envs: int, observer: Observer, call: Call, seed: int = 0,
        bias: Any = None, chain: bool = False, episode_length: int = EPISODE_LENGTH,
    ):
        observation_space, action_space = _spaces(observer.dim)
        super().__init__(n_envs, observation_space, action_space)
        self.core, self.observer, self.call, self.chain = core, observer, call, chain
        self.episode_length = episode_length
        self.bias = np.zeros(N_ACTIONS) if bias is None else np.asarray(bias, dtype=np.float64)
        self.sampler = SeedSampler(seeds, seed)
        self.rngs = [self.sampler.rng(i) for i in range(n_envs)]
        self.episodes: list[Episode] = [self._new_episode(i, None) for i in range(n_envs)]
        self.episode_counts = [0] * n_envs
        self.op_counts = np.zeros(N_ACTIONS, dtype=np.int64)
        self._actions: np.ndarray | None = None

    def _new_episode(self, index: int, previous: Episode | None) -> Episode:
        if self.chain and previous is not None:
            return Episode(seed=previous.seed, instruction=previous.instruction)  # the official never-reset chain
        text = self.rngs[index].choice(self.sampler.seeds)
        return Episode(seed=text, instruction=text)

    def reset(self) -> np.ndarray:
        self.episodes = [self._new_episode(i, None) for i in range(self.num_envs)]
        return self.observer(self.episodes)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    async def _step_all(self, ops: list[int]) -> list[StepResult]:
        return list(await asyncio.gather(*(
            self.core.step(e.instruction, OPERATIONS[op], ("teams-rl", i, self.episode_counts[i], e.step))
            for i, (e, op) in enumerate(zip(self.episodes, ops))
        )))

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        assert self._actions is not None
        ops = [decode_action(a, self.bias) for a in self._actions]
        results = self.call(self._step_all(ops))
        self.core.score_novelty(results)  # in environment order, not in the order the reviews came back
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        infos: list[dict[str, Any]] = []
        for i, (e, op, res) in enumerate(zip(self.episodes, ops, results)):
            self.op_counts[op] += 1
            e.instruction, e.last_op, e.step = res.instruction, op, e.step + 1
            e.reward += res.reward
            e.ops.append(res.op)
            rewards[i] = res.reward
            infos.append({"op": res.op, "reward": res.reward, "eliminated": res.eliminated})
        obs = self.observer(self.episodes)
        for i, e in enumerate(self.episodes):
            if e.step >= self.episode_length:
                dones[i] = True
                infos[i]["terminal_observation"] = obs[i].copy()
                infos[i]["episode"] = {"r": e.reward, "l": e.step}
                infos[i]["episode_ops"] = list(e.ops)
                self.episode_counts[i] += 1
                self.episodes[i] = self._new_episode(i, e)
        if dones.any():
            obs = self.observer(self.episodes)
        return obs, rewards, dones, infos

    def state(self) -> dict[str, Any]:
        """Everything a resumed training needs to continue exactly where this environment stopped: each environment's
        seed-draw stream, its episode in progress and episode counter (part of every model call's cache key), the
        operation counts and the novelty index."""
        return {"rngs": [r.getstate() for r in self.rngs], "episodes": copy.deepcopy(self.episodes),
                "episode_counts": list(self.episode_counts), "op_counts": self.op_counts.copy(),
                "novelty": copy.deepcopy(self.core.novelty)}

    def restore(self, state: dict[str, Any]) -> None:
        if len(state["rngs"]) != self.num_envs:
            raise ValueError(f"the checkpoint holds {len(state['rngs'])} environments, this training has {self.num_envs}")
        for rng, saved in zip(self.rngs, state["rngs"]):
            rng.setstate(saved)
        self.episodes = copy.deepcopy(state["episodes"])
        self.episode_counts = list(state["episode_counts"])
        self.op_counts = np.asarray(state["op_counts"], dtype=np.int64).copy()
        self.core.novelty = copy.deepcopy(state["novelty"])

    def close(self) -> None:
        return None

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name)] * self.num_envs

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs)]

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs


def _gym_env_base() -> type:
    import gymnasium

    return gymnasium.Env


class EvolInstructEnv(_gym_env_base()):  # type: ignore[misc]
    """The single-environment Gymnasium interface: `reset()` draws a seed, `step(action)` rewrites and reviews it."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, core: EvolCore, seeds: list[str], *, observer: Observer, call: Call, seed: int = 0, bias: Any = None):
        super().__init__()
        self.vec = LLMVecEnv(core, seeds, n_envs=1, observer=observer, call=call, seed=seed, bias=bias)
        self.observation_space, self.action_space = self.vec.observation_space, self.vec.action_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return self.vec.reset()[0], {"instruction": self.vec.episodes[0].instruction}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        episode = self.vec.episodes[0]  # the vector env starts a new one when this one ends
        self.vec.step_async(np.asarray([action]))
        obs, rewards, dones, infos = self.vec.step_wait()
        info = {**infos[0], "instruction": episode.instruction}
        if dones[0]:
            return infos[0]["terminal_observation"], float(rewards[0]), True, False, info
        return obs[0], float(rewards[0]), False, False, info

