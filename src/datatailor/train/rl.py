"""TeaMs-RL policy training: TRPO (sb3-contrib) on the Evol-Instruct environment (Gu et al., arXiv 2403.08694).

The paper's settings: MLP 64-64 (ReLU) policy and value networks, γ 0.995, GAE λ 0.97, max-KL 0.01, damping 0.1,
10 conjugate-gradient steps, a line search of 10 backtracks (halving), advantages normalised, a diagonal Gaussian
policy whose log-std starts at 0, a +0.3 bias on breadth during training, 6-step episodes.

What sb3-contrib's TRPO does differently, and why that is acceptable:

* the value function is fitted by Adam (`critic_updates` passes at `value_lr`) instead of L-BFGS (25 iterations,
  L2 1e-3): both regress the value on the same returns; Adam is what the maintained implementation supports, and the
  value only enters through the advantages;
* the line search accepts the first step that improves the surrogate within the KL bound, instead of the official
  code's expected-improvement ratio of 0.1: a stricter acceptance rule would only shrink steps;
* the log-probability is that of the sampled continuous action; the official code feeds back the one-hot of the
  decoded operation, which is not a sample of the Gaussian. The decoding (argmax after the bias) is the same;
* one update uses `n_envs` episodes (stepped concurrently) instead of one: the official 6 transitions per update
  make very noisy steps. `n_envs: 1` gives the paper's batch.

Every update is checkpointed (`checkpoints/update_NNNN.zip`, with the observation normaliser and `state_NNNN.pkl`:
the random states and the environments' seed draws, episodes and counters) and logged (`training_log.csv`: mean
episode reward, KL, line-search success, the share of each operation). A killed training resumes from the last
checkpoint and continues where it stopped: it ends with the same weights and log as an uninterrupted one (but the
`seconds` column), and its model calls are the ones the uninterrupted run would make (the same cache keys).
`training_curve.png` plots the mean episode reward per update.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pydantic import Field

from datatailor.errors import UserError
from datatailor.stages.teams.env import EPISODE_LENGTH, OPERATIONS, Call, EvolCore, Observer, bias_vector
from datatailor.stages.teams.options import PolicyOptions

LOG_FILE = "training_log.csv"
CURVE_FILE = "training_curve.png"
CHECKPOINTS = "checkpoints"
LOG_FIELDS = ["update", "timesteps", "episodes", "mean_episode_reward", "kl", "policy_objective", "value_loss",
              "line_search_success", *(f"share_{op}" for op in OPERATIONS), "seconds"]


class RLSettings(PolicyOptions):
    """PolicyOptions plus TRPO's settings (the paper's) and the seed."""

    gamma: float = 0.995
    gae_lambda: float = 0.97
    max_kl: float = 0.01
    damping: float = 0.1
    cg_steps: int = 10
    line_search_steps: int = 10
    value_lr: float = Field(1e-3, description="Adam step size of the value fit (sb3-contrib; the paper: L-BFGS).")
    critic_updates: int = Field(10, ge=1, description="Value-fit passes per update.")
    seed: int = 0


def make_embedder(name: str) -> Any:
    from datatailor.scoring.embedding import hashing_embedder, minilm_embedder

    return minilm_embedder() if name == "minilm" else hashing_embedder()


def build_env(core: EvolCore, seeds: list[str], settings: RLSettings, call: Call, bias: Any = None) -> Any:
    """The vector environment the policy trains on (normalised observations in faithful mode, as the paper's filter)."""
    from stable_baselines3.common.vec_env import VecNormalize

    from datatailor.stages.teams.vec import LLMVecEnv

    observer = Observer(settings.observation, make_embedder(settings.embedder) if settings.observation == "informative" else None)
    venv = LLMVecEnv(core, seeds, n_envs=settings.n_envs, observer=observer, call=call, seed=settings.seed,
                     bias=bias_vector(breadth=settings.breadth_bias) if bias is None else bias, chain=settings.chain)
    if settings.observation == "faithful":
        return VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=5.0, gamma=settings.gamma)
    return venv


def _imports() -> tuple[Any, Any]:
    try:
        import torch
        from sb3_contrib import TRPO
    except ImportError:
        raise UserError("TeaMs-RL training needs sb3-contrib and torch: pip install 'datatailor[rl]' -c constraints.txt") from None
    return torch, TRPO


def last_checkpoint(folder: Path) -> int:
    """The number of the last complete checkpoint (0: none)."""
    # A zip is renamed into place only once it and its normaliser are written (save_checkpoint).
    done = [int(m.group(1)) for p in (folder / CHECKPOINTS).glob("update_*.zip") if (m := re.match(r"update_(\d+)\.zip", p.name))]
    return max(done, default=0)


def _read_log(path: Path, upto: int) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row.get("update") and int(row["update"]) <= upto]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _callback(out: Path, start: int, progress: TextIO | None) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class UpdateLog(BaseCallback):
        """After every TRPO update: a checkpoint, a log row (reward, KL, operation shares)."""

        def __init__(self) -> None:
            super().__init__()
            self.update = start
            self.rollouts = 0
            self.ops: Counter[str] = Counter()
            self.episode_rewards: list[float] = []
            self.t0 = time.perf_counter()

        def _on_rollout_start(self) -> None:
            if self.rollouts:
                self._finish_update()

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                self.ops[info.get("op")] += 1
                if "episode" in info:
                    self.episode_rewards.append(float(info["episode"]["r"]))
            return True

        def _on_rollout_end(self) -> None:
            self.rollouts += 1

        def _on_training_end(self) -> None:
            if self.rollouts:
                self._finish_update()

        def _finish_update(self) -> None:
            self.update += 1
            values = self.model.logger.name_to_value
            total = sum(self.ops.values()) or 1
            row = {
                "update": self.update, "timesteps": self.model.num_timesteps, "episodes": len(self.episode_rewards),
                "mean_episode_reward": round(float(np.mean(self.episode_rewards)), 4) if self.episode_rewards else "",
                "kl": values.get("train/kl_divergence_loss", ""), "policy_objective": values.get("train/policy_objective", ""),
                "value_loss": values.get("train/value_loss", ""), "line_search_success": values.get("train/is_line_search_success", ""),
                **{f"share_{op}": round(self.ops.get(op, 0) / total, 4) for op in OPERATIONS},
                "seconds": round(time.perf_counter() - self.t0, 2),
            }
            save_checkpoint(self.model, out, self.update)
            rows = _read_log(out / LOG_FILE, self.update - 1) + [row]
            _write_log(out / LOG_FILE, rows)
            if progress is not None:
                print(f"update {self.update}: mean episode reward {row['mean_episode_reward']}, kl {row['kl']}, "
                      f"ops {dict(self.ops)}", file=progress, flush=True)
            self.ops, self.episode_rewards, self.rollouts, self.t0 = Counter(), [], 0, time.perf_counter()

    return UpdateLog()


def save_checkpoint(model: Any, out: Path, update: int) -> None:
    """The policy after `update` updates, with what a resumed training needs to continue exactly as an uninterrupted
    one: the observation normaliser's statistics (faithful mode) and the training state (the Python, NumPy and torch
    random states, and the environments' seed draws, episodes and counters). Each file is written to a temporary name
    and renamed; the policy's zip comes last, so a checkpoint exists only once all of it is on disk."""
    import pickle

    from stable_baselines3.common.vec_env import VecNormalize

    folder = out / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    env = model.get_env()
    venv = env.venv if isinstance(env, VecNormalize) else env
    if isinstance(env, VecNormalize):
        _atomic(folder / f"vecnormalize_{update:04d}.pkl", lambda tmp: env.save(str(tmp)))
    state = {"rng": _rng_state(), "env": venv.state()}
    _atomic(folder / f"state_{update:04d}.pkl", lambda tmp: tmp.write_bytes(pickle.dumps(state)))
    _atomic(folder / f"update_{update:04d}.zip", lambda tmp: model.save(str(tmp)))


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}")  # same suffix: sb3 would append .zip to another
    write(tmp)
    tmp.replace(path)


def _rng_state() -> dict[str, Any]:
    import random

    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_training_state(model: Any, out: Path, update: int) -> bool:
    """Put back the random states and the environments' state saved with checkpoint `update` (after TRPO.load, which
    re-seeds everything from the seed). False when the checkpoint has none (written by an older version)."""
    import pickle
    import random

    import torch
    from stable_baselines3.common.vec_env import VecNormalize

    path = out / CHECKPOINTS / f"state_{update:04d}.pkl"
    if not path.is_file():
        return False
    state = pickle.loads(path.read_bytes())
    env = model.get_env()
    try:
        (env.venv if isinstance(env, VecNormalize) else env).restore(state["env"])
    except ValueError as exc:
        raise UserError(f"{path}: {exc}: these checkpoints come from another training; give this one a new folder") from None
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return True


def prepare_training(core: EvolCore, seeds: list[str], out: Path, settings: RLSettings, call: Call,
                     progress: TextIO | None = None) -> tuple[Any, int]:
    """The TRPO model on its environment: new, or restored from the last checkpoint in `out` (with its training state);
    and that checkpoint's number (0: none)."""
    torch, TRPO = _imports()
    from stable_baselines3.common.vec_env import VecNormalize

    done = last_checkpoint(out)
    env = build_env(core, seeds, settings, call)
    if done:
        if isinstance(env, VecNormalize):
            env = VecNormalize.load(str(out / CHECKPOINTS / f"vecnormalize_{done:04d}.pkl"), env.venv)
        # force_reset=False: keep the saved last observation, or learn() resets the environments (new seed draws)
        model = TRPO.load(str(out / CHECKPOINTS / f"update_{done:04d}.zip"), env=env, device="cpu", force_reset=False)
        if not restore_training_state(model, out, done) and progress is not None:
            print(f"checkpoint {done} has no training state (an older version wrote it): training continues from its "
                  "weights, but the rest will not equal an uninterrupted run", file=progress, flush=True)
        return model, done
    steps = EPISODE_LENGTH
    model = TRPO(
        "MlpPolicy", env, n_steps=steps, batch_size=steps * settings.n_envs, gamma=settings.gamma,
        gae_lambda=settings.gae_lambda, target_kl=settings.max_kl, cg_damping=settings.damping,
        cg_max_steps=settings.cg_steps, line_search_max_iter=settings.line_search_steps,
        line_search_shrinking_factor=0.5, n_critic_updates=settings.critic_updates, learning_rate=settings.value_lr,
        normalize_advantage=True, seed=settings.seed, device="cpu", verbose=0,
        policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}, "activation_fn": torch.nn.ReLU, "log_std_init": 0.0},
    )
    return model, 0


def train_policy(core: EvolCore, seeds: list[str], out: Path, settings: RLSettings, call: Call,
                 progress: TextIO | None = None) -> dict[str, Any]:
    """Train (or resume) a TeaMs-RL policy into `out`; returns the summary also written to train_summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    model, done = prepare_training(core, seeds, out, settings, call, progress)
    steps = EPISODE_LENGTH
    remaining = settings.updates - done
    start = time.perf_counter()
    if remaining > 0:
        model.learn(total_timesteps=remaining * steps * settings.n_envs, reset_num_timesteps=not done,
                    callback=_callback(out, done, progress))
    final = last_checkpoint(out)
    rows = _read_log(out / LOG_FILE, final)
    plot_curve(out, rows)
    summary = {
        "updates": final, "resumed_from": done, "settings": settings.model_dump(),
        "policy": f"{CHECKPOINTS}/update_{final:04d}.zip",
        "normaliser": f"{CHECKPOINTS}/vecnormalize_{final:04d}.pkl" if settings.observation == "faithful" else None,
        "first_mean_episode_reward": _float(rows[0]["mean_episode_reward"]) if rows else None,
        "last_mean_episode_reward": _float(rows[-1]["mean_episode_reward"]) if rows else None,
        "seconds_this_run": round(time.perf_counter() - start, 1),
    }
    from datatailor.io import write_json

    write_json(out / "train_summary.json", summary)
    return summary


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def plot_curve(out: Path, rows: list[dict[str, str]]) -> bool:
    """training_curve.png: mean episode reward per update (needs matplotlib; False when it is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(int(r["update"]), float(r["mean_episode_reward"])) for r in rows if r.get("mean_episode_reward")]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    ax.set_xlabel("TRPO update")
    ax.set_ylabel("mean episode reward")
    ax.set_title("TeaMs-RL policy training")
    fig.tight_layout()
    fig.savefig(out / CURVE_FILE, dpi=100)
    plt.close(fig)
    return True


def mean_episode_reward(env: Any, episodes: int, model: Any = None, seed: int = 0) -> float:
    """The mean reward of `episodes` episodes in `env`: the model's stochastic policy, or uniform random operations
    (an action of independent normal components decodes to a uniformly random operation) when `model` is None."""
    from stable_baselines3.common.vec_env import VecNormalize

    if isinstance(env, VecNormalize):
        env.training = False  # evaluation does not move the normaliser
    rng = np.random.default_rng(seed)
    obs = env.reset()
    rewards: list[float] = []
    while len(rewards) < episodes:
        if model is None:
            actions = rng.standard_normal((env.num_envs, len(OPERATIONS)))
        else:
            actions, _ = model.predict(obs, deterministic=False)
        obs, _, dones, infos = env.step(actions)
        rewards.extend(float(info["episode"]["r"]) for info, done in zip(infos, dones) if done)
    return float(np.mean(rewards[:episodes]))


def load_policy(out_or_zip: Path) -> tuple[Any, Any]:
    """(the TRPO model, the observation normaliser or None) of a training folder or a checkpoint zip."""
    _, TRPO = _imports()
    import pickle

    path = Path(out_or_zip)
    if path.is_dir():
        k = last_checkpoint(path)
        if not k:
            raise UserError(f"{path}: no policy checkpoint (checkpoints/update_NNNN.zip)")
        path = path / CHECKPOINTS / f"update_{k:04d}.zip"
    if not path.is_file():
        raise UserError(f"policy not found: {path}")
    model = TRPO.load(str(path), device="cpu")
    norm_path = path.with_name(path.name.replace("update_", "vecnormalize_").replace(".zip", ".pkl"))
    normaliser = None
    if norm_path.exists():
        with norm_path.open("rb") as fh:
            normaliser = pickle.load(fh)
    return model, normaliser


def action_distribution(model: Any, normaliser: Any, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The policy's Gaussian (mean, std) over the 6 action components for raw observations `obs` (n, dim)."""
    import torch

    if normaliser is not None:
        obs = normaliser.normalize_obs(obs)
    with torch.no_grad():
        dist = model.policy.get_distribution(torch.as_tensor(obs, dtype=torch.float32))
        return dist.distribution.mean.numpy(), dist.distribution.stddev.numpy()
