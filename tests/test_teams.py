"""TeaMs-RL on scripted models: action decoding, the reward, episodes, concurrent stepping, learning (both
observation modes), checkpoints and resume after kill -9, the generation schedules, fresh expert answers, query
accounting.

The scripted world: a seed is tagged [A] or [B]; the rewriter appends the operation's name to the instruction; the
reviewer says "Not Equal" only when the operation just applied is the good one for the tag (deepening for A,
concretizing for B). A policy that sees the text can earn 6 per episode; one that only sees the last operation can
earn 3 (always deepening, or always concretizing); a uniform random policy earns 1.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("sb3_contrib")

from datatailor.llm.base import Completion, CompletionRequest  # noqa: E402
from datatailor.llm.config import ScriptedModel  # noqa: E402
from datatailor.llm.models import ModelPool, RoleModel  # noqa: E402
from datatailor.llm.usage import UsageLedger  # noqa: E402
from datatailor.recipe import parse_recipe  # noqa: E402
from datatailor.runner import run_recipe_sync  # noqa: E402
from datatailor.stages.teams import OPERATIONS, EvolCore, Observer, bias_vector, decode_action  # noqa: E402
from datatailor.stages.teams.env import Episode  # noqa: E402
from tests.conftest import cli_env  # noqa: E402
from tests.support import kill_9_when, read_jsonl, write_rows  # noqa: E402

GOOD = {"A": "deepening", "B": "concretizing"}


def rewriter(request: CompletionRequest) -> str:
    op = request.template.split("/")[-1].removesuffix(".j2")
    label = "Created prompt" if op == "breadth" else "Rewritten prompt"
    return f"{label}: {request.variables['instruction']} ({op})"


def reviewer(request: CompletionRequest) -> str:
    second = request.variables["second"]
    tag = re.search(r"\[(A|B)\]", second).group(1)
    last = re.findall(r"\((\w+)\)", second)[-1]
    return "Not Equal." if last == GOOD[tag] else "Equal"


EXPERT_CALLS: list[CompletionRequest] = []


def expert(request: CompletionRequest) -> str:
    EXPERT_CALLS.append(request)
    if request.template == "respond.j2":
        return f"A fresh expert answer to: {request.variables['instruction']}"
    return rewriter(request)


SEEDS = [f"[{'AB'[i % 2]}] a question number {i} about cooking" for i in range(20)]
WORLD = {"rewriter": {"backend": "scripted", "model": "rw", "handler": "tests.test_teams:rewriter", "max_concurrency": 64},
         "reviewer": {"backend": "scripted", "model": "rv", "handler": "tests.test_teams:reviewer", "max_concurrency": 64},
         "expert": {"backend": "scripted", "model": "ex", "handler": "tests.test_teams:expert", "max_concurrency": 64}}


def core_and_loop(world: dict[str, Any] | None = None, cache: Any = None, **kwargs: Any) -> tuple[EvolCore, asyncio.AbstractEventLoop]:
    pool = ModelPool({name: ScriptedModel.model_validate(cfg) for name, cfg in (world or WORLD).items()}, UsageLedger(), cache=cache)
    return EvolCore(pool.role("rewriter"), pool.role("reviewer"), stage="test", **kwargs), asyncio.new_event_loop()


# ----------------------------------------------------------------------------- the environment


def test_actions_decode_by_argmax_in_the_papers_order_with_a_bias() -> None:
    assert OPERATIONS == ("breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning", "complicate_input")
    assert decode_action([0.1, 0.9, 0, 0, 0, 0]) == 1
    assert decode_action([0.5, 0.6, 0, 0, 0, 0], bias_vector(breadth=0.3)) == 0  # +0.3 on breadth wins
    assert decode_action([0.5, 0.6, 0, 0, 0, 0], bias_vector(add_constraints=0.7)) == 1
    assert list(bias_vector(breadth=0.3)) == [0.3, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="6 components"):
        decode_action([1, 2, 3])


def test_the_reward_is_the_reviewers_not_equal_read_tolerantly() -> None:
    core, loop = core_and_loop()
    good = loop.run_until_complete(core.step("[A] cook rice", "deepening", "k1"))
    assert (good.reward, good.not_equal, good.instruction) == (1.0, True, "[A] cook rice (deepening)")  # "Not Equal." counts
    bad = loop.run_until_complete(core.step("[A] cook rice", "breadth", "k2"))
    assert (bad.reward, bad.not_equal) == (0.0, False)
    leaky = ScriptedModel(model="leaky", rules=[{"match": ".*", "reply": "Rewritten prompt: the given prompt, harder"}])
    pool = ModelPool({"rewriter": leaky, "reviewer": ScriptedModel.model_validate(WORLD["reviewer"])}, UsageLedger())
    leak = EvolCore(pool.role("rewriter"), pool.role("reviewer"), stage="t", elimination=True)
    undone = asyncio.new_event_loop().run_until_complete(leak.step("[A] cook rice", "deepening", "k3"))
    assert undone.reward == 0.0 and undone.instruction == "[A] cook rice" and "given prompt" in undone.eliminated


def test_episodes_last_six_steps_and_restart_from_a_seed() -> None:
    from datatailor.stages.teams.vec import LLMVecEnv

    core, loop = core_and_loop()
    env = LLMVecEnv(core, SEEDS, n_envs=2, observer=Observer("faithful"), call=loop.run_until_complete, seed=0)
    obs = env.reset()
    assert obs.shape == (2, 6) and not obs.any()  # zeros at reset: no operation yet
    first = [e.seed for e in env.episodes]
    for step in range(6):
        obs, rewards, dones, infos = env.step(np.tile(np.eye(6)[2], (2, 1)))  # always deepening
        assert dones.all() == (step == 5)
    assert all(len(info["episode_ops"]) == 6 for info in infos)
    assert all(e.step == 0 and e.instruction == e.seed for e in env.episodes)  # new episodes from seeds
    assert [info["episode"]["r"] for info in infos] == [6.0 if "[A]" in s else 0.0 for s in first]
    chain = LLMVecEnv(core, SEEDS, n_envs=1, observer=Observer("faithful"), call=loop.run_until_complete, chain=True)
    chain.reset()
    for _ in range(6):
        chain.step(np.eye(6)[[2]])
    assert chain.episodes[0].instruction.count("(deepening)") == 6  # the official never-reset chain continues


class SlowBackend:
    """Answers after 50 ms and records how many calls were in flight at once."""

    native_json_schema = False

    def __init__(self, handler: Any) -> None:
        self.handler, self.in_flight, self.peak = handler, 0, 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        return Completion(text=self.handler(request), finish_reason="stop")

    async def aclose(self) -> None:
        return None


def test_a_vector_step_issues_every_environments_calls_at_once() -> None:
    from datatailor.stages.teams.vec import LLMVecEnv

    rw, rv = SlowBackend(rewriter), SlowBackend(reviewer)
    ledger = UsageLedger()
    core = EvolCore(RoleModel("rewriter", ScriptedModel(model="rw", max_concurrency=64), rw, None, ledger),
                    RoleModel("reviewer", ScriptedModel(model="rv", max_concurrency=64), rv, None, ledger), stage="t")
    loop = asyncio.new_event_loop()
    env = LLMVecEnv(core, SEEDS, n_envs=8, observer=Observer("faithful"), call=loop.run_until_complete)
    env.reset()
    env.step(np.tile(np.eye(6)[2], (8, 1)))
    assert rw.peak == 8 and rv.peak == 8  # the 8 environments' rewrites overlapped, then their reviews


def test_novelty_is_scored_in_environment_order_whatever_review_comes_back_first() -> None:
    """The novelty term compares a rewrite with those scored before it: environment 0 first, so a resumed run (and
    any run) gets the same rewards even when environment 0's review is the slowest to come back."""
    from datatailor.stages.teams.vec import LLMVecEnv

    class FirstSeedSlow(SlowBackend):
        async def complete(self, request: CompletionRequest) -> Completion:
            if "number 0 " in request.variables["second"]:
                await asyncio.sleep(0.2)
            return Completion(text=self.handler(request), finish_reason="stop")

    ledger = UsageLedger()
    rw, rv = SlowBackend(rewriter), FirstSeedSlow(reviewer)
    core = EvolCore(RoleModel("rewriter", ScriptedModel(model="rw"), rw, None, ledger),
                    RoleModel("reviewer", ScriptedModel(model="rv", max_concurrency=8), rv, None, ledger), stage="t", novelty_weight=1.0)
    seeds = ["[A] a question number 0 about cooking", "[A] a question number 1 about cooking"]
    env = LLMVecEnv(core, seeds, n_envs=2, observer=Observer("faithful"), call=asyncio.new_event_loop().run_until_complete)
    env.episodes = [Episode(seed=t, instruction=t) for t in seeds]
    _, rewards, _, _ = env.step(np.tile(np.eye(6)[2], (2, 1)))  # deepening: "Not Equal" for both, reward 1 + novelty
    assert rewards[0] == 2.0 and 1.0 < rewards[1] < 1.5  # the first has nothing before it; the second is close to it


def test_the_gymnasium_interface() -> None:
    from datatailor.stages.teams.vec import EvolInstructEnv

    core, loop = core_and_loop()
    env = EvolInstructEnv(core, SEEDS, observer=Observer("faithful"), call=loop.run_until_complete)
    obs, info = env.reset(seed=0)
    assert env.observation_space.shape == (6,) and env.action_space.shape == (6,) and info["instruction"] in SEEDS
    _, reward, terminated, truncated, info = env.step(np.eye(6)[3])
    assert info["op"] == "concretizing" and not terminated and not truncated and reward in (0.0, 1.0)


# ----------------------------------------------------------------------------- learning


def test_trpo_learns_both_observation_modes_and_the_informative_one_uses_the_text(tmp_path: Path) -> None:
    from datatailor.train.rl import RLSettings, build_env, mean_episode_reward, train_policy

    results: dict[str, float] = {}
    for mode in ("faithful", "informative"):
        core, loop = core_and_loop()
        settings = RLSettings(updates=30, n_envs=8, observation=mode, embedder="hashing", breadth_bias=0.0, seed=0)
        summary = train_policy(core, SEEDS, tmp_path / mode, settings, loop.run_until_complete)
        assert summary["updates"] == 30 and (tmp_path / mode / "training_log.csv").exists()
        from datatailor.train.rl import load_policy

        model, normaliser = load_policy(tmp_path / mode)
        env = build_env(core, SEEDS, settings.model_copy(update={"seed": 99}), loop.run_until_complete)
        if normaliser is not None:
            env.obs_rms = normaliser.obs_rms
        results[mode] = mean_episode_reward(env, 64, model, seed=1)
        results[f"random {mode}"] = mean_episode_reward(build_env(core, SEEDS, settings.model_copy(update={"seed": 98}),
                                                                  loop.run_until_complete), 64, None, seed=2)
    assert results["random faithful"] < 1.5 and results["random informative"] < 1.5  # about 1 per episode
    assert results["faithful"] >= 1.5 * results["random faithful"], results
    assert results["informative"] >= 1.5 * results["random informative"], results
    assert results["informative"] > results["faithful"], results  # the best operation depends on the text


def running_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **train: Any) -> Any:
    """Run teams.train (one update) through a recipe and return the TRPO model that actually trained."""
    from datatailor.train import rl

    built: list[Any] = []
    original = rl.prepare_training

    def capture(*args: Any, **kwargs: Any) -> tuple[Any, int]:
        model, done = original(*args, **kwargs)
        built.append(model)
        return model, done

    monkeypatch.setattr(rl, "prepare_training", capture)
    stage = {"type": "teams.train", "updates": 1, **train}
    result = run_recipe_sync(parse_recipe(recipe(tmp_path, [stage]), "t", tmp_path), tmp_path / "out", show_progress=False)
    assert result.status == "complete", result.message
    assert len(built) == 1
    venv = built[0].get_env()
    (getattr(venv, "venv", None) or venv).call = asyncio.new_event_loop().run_until_complete  # the run's loop is closed
    return built[0]


def test_the_papers_training_settings_reach_the_running_trpo_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The values the paper gives, read from the objects that trained (not from the config): TRPO's constants, the
    64-64 ReLU networks, a state-independent log-std starting at 0, 6-step episodes, the normaliser's clip at 5, and
    the +0.3 breadth bias in the environment's decoding."""
    import torch
    from stable_baselines3.common.vec_env import VecNormalize

    model = running_training(tmp_path, monkeypatch, n_envs=3)
    assert (model.gamma, model.gae_lambda, model.target_kl, model.cg_damping) == (0.995, 0.97, 0.01, 0.1)
    assert (model.cg_max_steps, model.line_search_max_iter, model.line_search_shrinking_factor) == (10, 10, 0.5)
    assert model.normalize_advantage and model.n_steps == 6 and model.batch_size == 6 * 3 and model.n_envs == 3
    pi = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    vf = [m for m in model.policy.mlp_extractor.value_net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in pi] == [64, 64] and [m.out_features for m in vf] == [64, 64]
    assert all(isinstance(m, torch.nn.ReLU) for m in model.policy.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear))
    assert model.policy.log_std.shape == (6,) and model.policy.action_net.out_features == 6
    env = model.get_env()
    assert isinstance(env, VecNormalize) and env.norm_obs and not env.norm_reward and env.clip_obs == 5.0
    assert list(env.venv.bias) == [0.3, 0, 0, 0, 0, 0] and env.venv.episode_length == 6
    # the configured bias reaches the environment too
    again = running_training(tmp_path / "b", monkeypatch, n_envs=2, breadth_bias=0.5)
    assert list(again.get_env().venv.bias) == [0.5, 0, 0, 0, 0, 0] and again.n_envs == 2


def test_the_observation_after_a_step_is_the_executed_operation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faithful mode, on the running environment: zeros after a reset, then the one-hot of the operation executed
    (after the breadth bias), normalised by the running mean/std and clipped at 5 before the policy sees it."""
    model = running_training(tmp_path, monkeypatch, n_envs=2)
    env = model.get_env()
    env.reset()
    assert not env.get_original_obs().any()
    # deepening leads by 0.2, less than the +0.3 on breadth: breadth is executed in env 0; concretizing in env 1
    actions = np.array([[0.0, 0, 0.2, 0, 0, 0], [0.0, 0, 0, 0.9, 0, 0]], dtype=np.float32)
    obs, _, _, infos = env.step(actions)
    assert [i["op"] for i in infos] == ["breadth", "concretizing"]
    assert np.array_equal(env.get_original_obs(), np.eye(6, dtype=np.float32)[[0, 3]])
    expected = np.clip((np.eye(6)[[0, 3]] - env.obs_rms.mean) / np.sqrt(env.obs_rms.var + env.epsilon), -5, 5)
    assert np.allclose(obs, expected, atol=1e-6)
    # informative mode: the embedding of the instruction as rewritten, and the step
    model = running_training(tmp_path / "i", monkeypatch, n_envs=2, observation="informative", embedder="hashing")
    env = model.get_env()
    env.reset()
    obs, _, _, _ = env.step(actions)
    from datatailor.train.rl import make_embedder

    texts = [e.instruction for e in env.episodes]
    assert all(t.endswith(")") for t in texts)  # rewritten once
    width = obs.shape[1] - 6
    assert np.allclose(obs[:, :width], np.asarray(make_embedder("hashing")(texts)), atol=1e-6)
    assert np.array_equal(obs[:, width:], np.eye(6, dtype=np.float32)[[1, 1]])  # step 1 done: the second step is next


# ----------------------------------------------------------------------------- the stages


def recipe(tmp_path: Path, stages: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    rows = rows or [{"instruction": s, "output": "STALE ALPACA OUTPUT"} for s in SEEDS[:4]]
    return {"models": WORLD, "input": str(write_rows(tmp_path / "seeds.jsonl", rows)), "stages": stages, "cache": False, **fields}


TRAIN = {"type": "teams.train", "updates": 4, "n_envs": 2, "breadth_bias": 0.0}


def test_training_checkpoints_every_update_and_generation_uses_the_policy(tmp_path: Path) -> None:
    stages = [TRAIN, {"type": "teams.generate", "schedule": "policy", "keep": "all"}]
    result = run_recipe_sync(parse_recipe(recipe(tmp_path, stages), "t", tmp_path), tmp_path / "out", show_progress=False)
    assert result.status == "complete", result.message
    policy = tmp_path / "out" / "stages" / "00-teams.train" / "policy"
    assert sorted(p.name for p in (policy / "checkpoints").glob("update_*.zip")) == [f"update_{k:04d}.zip" for k in range(1, 5)]
    rows = list(csv.DictReader((policy / "training_log.csv").open()))
    assert [int(r["update"]) for r in rows] == [1, 2, 3, 4] and all(r["kl"] != "" for r in rows)
    assert abs(sum(float(rows[0][f"share_{op}"]) for op in OPERATIONS) - 1.0) < 1e-3  # shares rounded to 4 places
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert data and all(r["response"].startswith("A fresh expert answer to:") for r in data)  # never the stale output
    assert all(r["metadata"]["teams_rl"]["policy"].endswith("policy") for r in data)
    report = json.loads((tmp_path / "out" / "reports" / "teams_rl_report.json").read_text())
    assert report["training"]["updates"] == 4 and report["pairs"] == len(data)
    # each episode's operations are counted once, not once per kept pair of it
    episodes = {r["metadata"]["teams_rl"]["seed_id"] for r in data}
    assert len(data) > len(episodes) and all(sum(c.values()) == len(episodes) for c in report["operations"]["per_step"].values())
    usage = json.loads((tmp_path / "out" / "usage.json").read_text())["total"]
    assert report["queries"]["expert_requests_per_pair"] == round(usage["roles"]["expert"]["requests"] / len(data), 4)
    assert report["queries"]["training_requests"] == 4 * 2 * 6 * 2  # updates × envs × steps × (rewrite + review)


def test_the_official_schedule_forces_breadth_at_steps_2_and_5(tmp_path: Path) -> None:
    stages = [TRAIN, {"type": "teams.generate", "schedule": "official", "keep": "all", "elimination": False}]
    run_recipe_sync(parse_recipe(recipe(tmp_path, stages), "t", tmp_path), tmp_path / "out", show_progress=False)
    episodes = [r["metadata"]["teams_rl"]["ops"] for r in read_jsonl(tmp_path / "out" / "data.jsonl") if r["metadata"]["teams_rl"]["step"] == 6]
    assert len(episodes) == 4
    for ops in episodes:
        assert ops[1] == ops[4] == "breadth"
        assert "breadth" not in (ops[0], ops[2], ops[3], ops[5])  # breadth elsewhere becomes add constraints


def test_random_schedule_needs_no_policy_and_keep_last_gives_one_pair_per_seed(tmp_path: Path) -> None:
    stages = [{"type": "teams.generate", "schedule": "random", "keep": "last", "elimination": False}]
    EXPERT_CALLS.clear()
    world = {**WORLD, "expert": {**WORLD["expert"], "temperature": 0.2}}
    run_recipe_sync(parse_recipe({**recipe(tmp_path, stages), "models": world}, "t", tmp_path), tmp_path / "out", show_progress=False)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert len(data) == 4 and all(r["metadata"]["teams_rl"]["step"] == 6 for r in data)
    # the official generation code: rewrites at 0.7 whatever the expert's own temperature; answers at its own
    temps = {("answer" if r.template == "respond.j2" else "rewrite", r.sampling.temperature) for r in EXPERT_CALLS}
    assert temps == {("rewrite", 0.7), ("answer", 0.2)}
    ops = [op for r in data for op in r["metadata"]["teams_rl"]["ops"]]
    assert len(set(ops)) >= 4  # uniform choices over 24 steps
    # every call's tokens are in the one pair of each seed
    usage = json.loads((tmp_path / "out" / "usage.json").read_text())["total"]["all"]
    assert sum(e["prompt_tokens"] + e["completion_tokens"] for r in data for e in r["lineage"]) == usage["prompt_tokens"] + usage["completion_tokens"]


def test_generation_without_a_policy_is_refused(tmp_path: Path) -> None:
    from datatailor.errors import UserError

    with pytest.raises(UserError, match=r"needs a trained TeaMs-RL policy.*teams.train"):
        run_recipe_sync(parse_recipe(recipe(tmp_path, [{"type": "teams.generate"}]), "t", tmp_path), tmp_path / "out")


def test_elimination_undoes_rewrites_the_reviewer_calls_equal(tmp_path: Path) -> None:
    rows = [{"instruction": f"[A] question {i} about bread"} for i in range(4)]
    stages = [{"type": "teams.generate", "schedule": "random", "keep": "all", "elimination": True}]
    run_recipe_sync(parse_recipe(recipe(tmp_path, stages, rows=rows), "t", tmp_path), tmp_path / "out", show_progress=False)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    failures = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert len({r["metadata"]["teams_rl"]["seed_id"] for r in data}) + len(failures) == 4  # every seed accounted for
    for r in data:
        ns = r["metadata"]["teams_rl"]
        assert len(ns["ops"]) == len(ns["rewards"]) == len(ns["eliminated"]) == 6  # the whole episode, on every pair
        for op, why, verdict in zip(ns["ops"], ns["eliminated"], ns["rewards"]):
            assert (why is None) == (op == "deepening"), ns  # only [A]'s good operation survives the reviewer
            assert verdict == (1.0 if op == "deepening" else 0.0), ns  # the reviewer's own verdict, step by step
        assert r["instruction"].count("(deepening)") == sum(1 for why in ns["eliminated"][: ns["step"]] if why is None)
    assert all(f["kind"] == "eliminated" for f in failures)


def depth_reviewer(request: CompletionRequest) -> str:
    """Not Equal for the first two rewrites that stick; every deeper one is Equal (so steps 3 to 6 are eliminated)."""
    return "Equal" if len(re.findall(r"\((\w+)\)", request.variables["second"])) >= 3 else "Not Equal"


def sorry_at_depth_2(request: CompletionRequest) -> str:
    """The expert: rewrites as usual, but cannot answer an instruction rewritten twice (a short 'sorry')."""
    if request.template == "respond.j2" and len(re.findall(r"\((\w+)\)", request.variables["instruction"])) == 2:
        return "Sorry, I cannot."
    return expert(request)


def generate_with(tmp_path: Path, name: str, keep: str, expert_handler: str = "expert", **stage: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    world = {**WORLD, "reviewer": {**WORLD["reviewer"], "handler": "tests.test_teams:depth_reviewer"},
             "expert": {**WORLD["expert"], "handler": f"tests.test_teams:{expert_handler}"}}
    stages = [{"type": "teams.generate", "schedule": "random", "keep": keep, "elimination": True, **stage}]
    result = run_recipe_sync(parse_recipe({**recipe(tmp_path, stages), "models": world}, "t", tmp_path), tmp_path / name, show_progress=False)
    assert result.status == "complete", result.message
    return read_jsonl(tmp_path / name / "data.jsonl"), read_jsonl(tmp_path / name / "failures.jsonl")


def test_keep_last_keeps_the_last_surviving_step_when_the_final_one_is_eliminated(tmp_path: Path) -> None:
    every, _ = generate_with(tmp_path, "all", "all")
    last, failures = generate_with(tmp_path, "last", "last")
    assert len(every) == 2 * 4 and {r["metadata"]["teams_rl"]["step"] for r in every} == {1, 2}  # steps 3-6 eliminated
    # one pair per seed, never a lost seed: the last step that survived (step 2), as keep: all's last pair of that seed
    assert not failures and len(last) == 4
    final_of_all = {r["metadata"]["teams_rl"]["seed_id"]: (r["instruction"], r["response"]) for r in every if r["metadata"]["teams_rl"]["step"] == 2}
    assert {r["metadata"]["teams_rl"]["seed_id"]: (r["instruction"], r["response"]) for r in last} == final_of_all
    for r in last:
        ns = r["metadata"]["teams_rl"]
        assert ns["step"] == 2 and ns["eliminated"][:2] == [None, None] and all(ns["eliminated"][2:])
        assert ns["rewards"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # the answer of the last surviving step is unusable: that step is eliminated too, and the one before it is kept
    fallback, failures = generate_with(tmp_path, "fallback", "last", "sorry_at_depth_2")
    assert not failures and len(fallback) == 4
    for r in fallback:
        ns = r["metadata"]["teams_rl"]
        assert ns["step"] == 1 and r["instruction"].count("(") == 1 and "unusable" in ns["eliminated"][1]
        assert r["response"].startswith("A fresh expert answer to:")


def test_without_the_checks_no_reward_is_recorded(tmp_path: Path) -> None:
    stages = [{"type": "teams.generate", "schedule": "random", "keep": "all", "elimination": False}]
    REVIEWS.clear()
    world = {**WORLD, "reviewer": {**WORLD["reviewer"], "handler": "tests.test_teams:counting_reviewer"}}
    run_recipe_sync(parse_recipe({**recipe(tmp_path, stages), "models": world}, "t", tmp_path), tmp_path / "out", show_progress=False)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert len(data) == 4 * 6 and not REVIEWS  # nobody was asked ...
    assert all(r["metadata"]["teams_rl"]["rewards"] == [None] * 6 for r in data)  # ... so no verdict, never a 1.0


REVIEWS: list[CompletionRequest] = []


def counting_reviewer(request: CompletionRequest) -> str:
    REVIEWS.append(request)
    return reviewer(request)


def test_episodes_per_seed_start_again_from_the_seed(tmp_path: Path) -> None:
    one = {"type": "teams.generate", "schedule": "random", "keep": "all", "elimination": False}
    run_recipe_sync(parse_recipe(recipe(tmp_path, [one]), "t", tmp_path), tmp_path / "one", show_progress=False)
    run_recipe_sync(parse_recipe(recipe(tmp_path, [{**one, "episodes_per_seed": 3}]), "t", tmp_path), tmp_path / "three", show_progress=False)
    single, triple = read_jsonl(tmp_path / "one" / "data.jsonl"), read_jsonl(tmp_path / "three" / "data.jsonl")
    assert len(single) == 4 * 6 and len(triple) == 3 * 4 * 6 and len({r["id"] for r in triple}) == len(triple)
    first = [r for r in triple if r["metadata"]["teams_rl"]["episode"] == 0]
    assert [(r["id"], r["instruction"]) for r in first] == [(r["id"], r["instruction"]) for r in single]
    from datatailor.records import stable_hash

    # the first episode keeps the ids a stage without episodes_per_seed always gave (existing runs resume, caches hit)
    assert all(r["id"] == stable_hash(r["metadata"]["teams_rl"]["seed_id"], ("teams.generate", r["metadata"]["teams_rl"]["step"] - 1))
               for r in first)
    for r in triple:
        ns = r["metadata"]["teams_rl"]
        assert r["instruction"].startswith(ns["seed_instruction"]) and r["instruction"].count("(") == ns["step"]  # from the seed
    ops = {ns["episode"]: tuple(ns["ops"]) for r in triple if (ns := r["metadata"]["teams_rl"])["seed_id"] == triple[0]["metadata"]["teams_rl"]["seed_id"]}
    assert len(set(ops.values())) == 3  # each episode draws its own operations


REWRITES: list[tuple[Any, str]] = []


def recording_rewriter(request: CompletionRequest) -> str:
    REWRITES.append((request.sampling.seed, request.variables["instruction"]))
    return rewriter(request)


def final_weights(folder: Path) -> dict[str, Any]:
    from datatailor.train.rl import load_policy

    model, normaliser = load_policy(folder)
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    weights.update({f"optimizer.{k}": v for k, v in model.policy.optimizer.state_dict()["state"].items()})
    if normaliser is not None:
        weights["obs_rms.mean"], weights["obs_rms.var"] = normaliser.obs_rms.mean, normaliser.obs_rms.var
    return weights


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):  # an optimizer's per-parameter state (Adam's moments and step)
            assert_same_weights(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{key} differs by up to {(a[key] - b[key]).abs().max()}"
        else:
            assert np.array_equal(a[key], b[key]), key


def training_log(folder: Path) -> list[dict[str, str]]:
    """The log without its wall-clock column."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((folder / "training_log.csv").open())]


@pytest.mark.parametrize("observation, novelty, chain", [("faithful", 0.0, False), ("informative", 0.5, True)])
def test_a_resumed_training_ends_with_the_weights_log_and_calls_of_an_uninterrupted_one(
    observation: str, novelty: float, chain: bool, tmp_path: Path
) -> None:
    """Stopped after 2 of 6 updates and run again (new objects, as a new process would make): the resumed run continues
    the seed draws, episode counters, sampling and normaliser, so it ends where an uninterrupted run ends, having made
    the same model calls; with one cache for both parts, as a bake-off re-run has, it pays for the same requests."""
    from datatailor.llm.cache import RequestCache
    from datatailor.train.rl import RLSettings, train_policy

    world = {**WORLD, "rewriter": {**WORLD["rewriter"], "handler": "tests.test_teams:recording_rewriter"}}
    settings = RLSettings(updates=6, n_envs=2, observation=observation, embedder="hashing", chain=chain, seed=3)
    calls: dict[str, list[tuple[Any, str]]] = {}
    requests: dict[str, int] = {}
    for name, stops in (("straight", [6]), ("resumed", [2, 6])):
        REWRITES.clear()
        cache = RequestCache(tmp_path / f"{name}.sqlite")
        requests[name] = 0
        for updates in stops:
            core, loop = core_and_loop(world, cache, novelty_weight=novelty)
            summary = train_policy(core, SEEDS, tmp_path / name, settings.model_copy(update={"updates": updates}), loop.run_until_complete)
            requests[name] += sum(u.requests for u in core.rewriter.ledger.total().values())
        assert summary["updates"] == 6 and summary["resumed_from"] == (2 if name == "resumed" else 0)
        calls[name] = list(REWRITES)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    assert training_log(tmp_path / "resumed") == training_log(tmp_path / "straight")
    assert sorted(calls["resumed"]) == sorted(calls["straight"]) and len(set(calls["straight"])) == len(calls["straight"])
    assert requests["resumed"] == requests["straight"] == 6 * 2 * 6 * 2  # no rollout replayed from the cache for free


def test_checkpoints_of_another_training_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    from datatailor.errors import UserError
    from datatailor.train.rl import RLSettings, train_policy

    core, loop = core_and_loop()
    train_policy(core, SEEDS, tmp_path, RLSettings(updates=1, n_envs=2), loop.run_until_complete)
    with pytest.raises(UserError, match=r"state_0001.pkl: the checkpoint holds 2 environments, this training has 3.*new folder"):
        train_policy(core, SEEDS, tmp_path, RLSettings(updates=2, n_envs=3), loop.run_until_complete)


def test_resume_after_kill_9_during_training(tmp_path: Path) -> None:
    # Slow enough that a loaded machine still sees the kill land part-way (about 0.6 s per update).
    slow = {name: {**cfg, "latency_s": 0.05} for name, cfg in WORLD.items()}
    path = tmp_path / "teams.yaml"
    data = recipe(tmp_path, [{**TRAIN, "updates": 8}])
    data["models"] = slow
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datatailor", "run", str(path), "--out", str(out), "--no-progress"]
    checkpoints = out / "stages" / "00-teams.train" / "policy" / "checkpoints"
    kill_9_when(cmd, cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c1")),
                lambda: len(list(checkpoints.glob("update_*.zip"))) >= 3, timeout_s=90)
    done_before = len(list(checkpoints.glob("update_*.zip")))
    assert 3 <= done_before < 8
    resumed = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c2")), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((checkpoints.parent / "train_summary.json").read_text())
    assert summary["updates"] == 8 and summary["resumed_from"] >= done_before
    assert not list(checkpoints.glob(".*"))  # no temporary file left behind
    # the resumed run made only the remaining updates' calls: 2 envs × 6 steps × 2 calls each
    requests = json.loads((out / "usage.json").read_text())["run"]["all"]["requests"]
    assert requests == (8 - summary["resumed_from"]) * 2 * 6 * 2
    # and it ended as a run never killed: the same policy, the same log
    straight = run_recipe_sync(parse_recipe({**data, "models": WORLD}, "t", tmp_path), tmp_path / "straight", show_progress=False)
    assert straight.status == "complete", straight.message
    policy = tmp_path / "straight" / "stages" / "00-teams.train" / "policy"
    assert_same_weights(final_weights(checkpoints.parent), final_weights(policy))
    assert training_log(checkpoints.parent) == training_log(policy)
