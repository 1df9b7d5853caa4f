"""Every method's stages with a batched role, on the mock server, against the same recipe online: CoachLM's prompted
revision (with quality.rate before and after), TeaMs-RL's training and generation, the Self-Instruct and
Evol-Instruct baselines, judge.pairwise and quality.rate as a batched judge, and `datatailor eval`'s judge.

Each comparison (`compare`) checks what issue 17 promises of a batched role: the same records and failure rows as
online, every event of a batched role naming a batch the server created (and no event of an online role naming
one), the batched roles' tokens at half the online price (the online roles' unchanged), each batch holding one
stage's requests, and a re-run in a fresh directory that makes zero requests and writes the same bytes. Also: a
shared call read back after a resume keeps the batch id in its record's lineage (stages/shared.py).

The mock answers every request (online or in a batch) with `world` below, which reads the rendered prompt
(templates do not travel over HTTP) and replies deterministically.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from datatailor.cli import main
from datatailor.recipe import parse_recipe
from datatailor.stages.evolve import OPERATIONS, operation_prompt
from datatailor.testing import MockConfig, MockOpenAIServer
from tests.support import read_jsonl, write_rows
from tests.test_batch_recipes import (
    FAST_BATCH,
    REFED,
    REFERENCES,
    codec_world,
    model,
    run,
    strip_batch,
    usage,
)
from tests.test_coach import coach

# ----------------------------------------------------------------------------- the world the mock answers with

# TeaMs-RL's scripted reviewer (as tests/test_teams.py): a rewrite of an [A] seed adds information only when it
# deepens, of a [B] seed only when it concretizes. An untagged seed (Evol-Instruct) gains nothing by complicating its input.
GOOD_OP = {"A": "deepening", "B": "concretizing"}
VERBS = ("Write", "Summarise", "Explain", "Classify", "Translate", "Compare", "Draw", "Review")
THINGS = ("a short poem", "a news story", "the rules of chess", "a recipe for soup", "a diagram of a cell",
          "three idioms", "a cover letter", "the water cycle")
FOR = ("for children", "for a manager", "in French", "in one sentence", "as a table", "for beginners")


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def rate(user: str) -> str:
    """quality.rate: 5 for a pair marked HIGH or revised by the coach ("Be specific"), the Q=n a response names, else 3."""
    instruction = _between(user, "### Instruction:\n", "\n\n###")
    response = _between(user, "### Response:\n", "\n\nRate the response")
    named = re.search(r"Q=(\d)", response)
    score = 5 if "HIGH" in instruction or "Be specific" in instruction else int(named[1]) if named else 3
    return f"Score: {score}\nThe response is accurate and {'complete' if score >= 4 else 'too brief'}."


def review(user: str) -> str:
    """evol/equal.j2: WizardLM's information-gain check, scripted on the operation applied last."""
    second = _between(user, "Second prompt:\n", "\n\nAnswer with")
    last = re.findall(r"\((\w+)\)", second)[-1]
    tag = re.search(r"\[(A|B)\]", second)
    if tag:
        return "Not Equal." if last == GOOD_OP[tag[1]] else "Equal"
    return "Equal" if last == "complicate_input" else "Not Equal"


def rewrite(user: str) -> str:
    """An Evol-Instruct operation: the operation is the one whose template renders this very prompt."""
    head, label = ("Inspiring prompt:\n", "Created prompt") if "Inspiring prompt:\n" in user else ("Prompt to rewrite:\n", "Rewritten prompt")
    instruction = _between(user, head, f"\n\n{label}:")
    op = next(op for op in OPERATIONS if operation_prompt(op).render(instruction=instruction)[-1].content == user)
    return f"{label}: {instruction} ({op})"


def new_tasks(user: str, seed: int) -> str:
    """Self-Instruct: n tasks drawn from a small vocabulary (so some repeat: ROUGE-L and the blocked words drop them)."""
    n = int(re.search(r"Write (\d+) new tasks", user)[1])  # type: ignore[index]
    rng = random.Random(seed)
    return "\n".join(f"{i + 1}. {rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(FOR)}." for i in range(n))


def world(body: dict[str, Any]) -> str:
    messages = body["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    user = next(m["content"] for m in messages if m["role"] == "user")
    if "expert editor of instruction-tuning data" in system:  # coach/prompted.j2
        return coach(SimpleNamespace(template="coach/prompted.j2", variables={"pair": user.split("Now revise this pair:\n", 1)[1]}))
    if "Rate the response's accuracy and helpfulness" in user:  # eval/quality_rating.j2
        return rate(user)
    if "exacting reviewer" in system:  # judge/pairwise_scores.j2: the QUALITY=n each answer names
        return codec_world(body)
    if "Below are two prompts" in user:  # evol/equal.j2
        return review(user)
    if "Prompt to rewrite:\n" in user or "Inspiring prompt:\n" in user:  # evol/*.j2
        return rewrite(user)
    if "Here are some tasks that people ask" in user:  # baselines/self_instruct.j2
        return new_tasks(user, body["seed"])
    if "careful, helpful assistant" in system:  # respond.j2
        if user.endswith("(increase_reasoning)"):
            return "Sorry, I cannot."  # WizardLM's elimination check 2
        return f"A fresh expert answer to: {user}"
    return f"unscripted request: {user[:80]}"  # never raise here: a batch would never end


# ----------------------------------------------------------------------------- the comparison


@pytest.fixture
def mock() -> Iterator[MockOpenAIServer]:
    with MockOpenAIServer(MockConfig(handler="tests.test_batch_methods:world", batch_delay_s=0.02)) as server:
        yield server


def models(url: str, *roles: str, **per_role: dict[str, Any]) -> dict[str, Any]:
    """Online entries on the mock, one model name per role."""
    return {role: model(url, f"mock-{role}", False, **per_role.get(role, {})) for role in roles}


def planned_stages(out: Path) -> list[set[str]]:
    """For each batch of a run, in order: the stages whose requests it holds."""
    rows = read_jsonl(out / "batches" / "journal.jsonl")
    return [{(o or "?").split(":", 1)[0] for _, o in r["requests"]} for r in rows if r["event"] == "planned"]


def failure_keys(out: Path) -> list[tuple[str, str, str, str]]:
    path = out / "failures.jsonl"
    return [(f["id"], f["stage"], f["kind"], f["message"]) for f in read_jsonl(path)] if path.exists() else []


def compare(tmp_path: Path, mock: MockOpenAIServer, recipe: dict[str, Any], batched: set[str],
            same: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = strip_batch) -> tuple[list[dict[str, Any]], Path]:
    """Run `recipe` (its models online entries on the mock) online, then with the roles in `batched` batched, then the
    batched recipe again in a fresh directory; check what a batched role promises. `same` strips what may differ
    between the runs (by default what says how a call was paid). Returns the batched run's records and directory."""

    def build(roles: set[str], cache: str) -> Any:
        entries = {r: {**e, "batch": True, **FAST_BATCH} if r in roles else e for r, e in recipe["models"].items()}
        return parse_recipe({**recipe, "models": entries, "cache": str(tmp_path / cache)}, "batch-methods", tmp_path)

    on_dir, off_dir = tmp_path / "online", tmp_path / "batched"
    online = run(build(set(), "online.sqlite"), on_dir)
    assert online.status == "complete", online.message
    assert mock.stats["batches_created"] == 0
    chat_before = mock.stats["requests"]

    result = run(build(batched, "batched.sqlite"), off_dir)
    assert result.status == "complete", result.message
    on, off = read_jsonl(on_dir / "data.jsonl"), read_jsonl(off_dir / "data.jsonl")
    assert off and same(off) == same(on), "a batched role gives the records an online one gives"
    assert failure_keys(off_dir) == failure_keys(on_dir)

    # every event of a batched role names a batch the server created; no event of an online role names one
    created = set(mock.batch_api.batches)
    for record in off:
        for event in record["lineage"]:
            if event["role"] in batched:
                assert event["details"].get("batch_id") in created, event
            else:
                assert "batch_id" not in event["details"], event
    roles_on = json.loads((on_dir / "usage.json").read_text())["run"]["roles"]
    roles_off = json.loads((off_dir / "usage.json").read_text())["run"]["roles"]
    assert mock.stats["batch_lines"] == sum(roles_off[r]["requests"] for r in batched) > 0
    assert mock.stats["batch_answered_again"] == 0, "no request was paid for twice"
    assert mock.stats["requests"] - chat_before == sum(u["requests"] for r, u in roles_off.items() if r not in batched)
    for role, u_on in roles_on.items():
        u_off = roles_off[role]
        assert (u_off["requests"], u_off["prompt_tokens"], u_off["completion_tokens"]) == \
            (u_on["requests"], u_on["prompt_tokens"], u_on["completion_tokens"]), role
        assert u_off["cost_usd"] == pytest.approx(u_on["cost_usd"] / 2 if role in batched else u_on["cost_usd"]), role
    # a batch holds the requests of one stage: a stage's step becomes the next batch once the step before it is answered
    for stages in planned_stages(off_dir):
        assert len(stages) == 1, stages

    # a re-run in a fresh directory: every call from the request cache the batches filled
    created_before = mock.stats["batches_created"]
    again = run(build(batched, "batched.sqlite"), tmp_path / "again")
    assert again.status == "complete" and mock.stats["batches_created"] == created_before
    assert usage(tmp_path / "again")["requests"] == 0 and usage(tmp_path / "again")["cache_hits"] > 0
    again_data = read_jsonl(tmp_path / "again" / "data.jsonl")
    assert again_data == off if same is strip_batch else same(again_data) == same(off)
    return off, off_dir


def steps(out: Path) -> list[str]:
    """The stages the run's batches went to, one entry per run of consecutive batches of the same stage."""
    return [stage for stage, _ in itertools.groupby(s for stages in planned_stages(out) for s in stages)]


# ----------------------------------------------------------------------------- CoachLM (prompted)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_coachlm_prompted_revision_with_a_batched_coach_and_judge(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """examples/coachlm_prompted.yaml: rate, revise the pairs rated below 4.5, rate again: three steps, a batch each."""
    recipe = yaml.safe_load((EXAMPLES / "coachlm_prompted.yaml").read_text())
    keys = ["GOOD", "HIGH GOOD", "PROSE", "SAME", "SHORT", "GOOD"]
    rows = [{"instruction": f"{k} task {i}: explain tides", "input": "",
             "output": "The moon pulls the oceans, which makes the tides rise and fall twice a day."} for i, k in enumerate(keys)]
    recipe.update(input=str(write_rows(tmp_path / "pairs.jsonl", rows)),
                  models=models(mock.url, "coach", "judge", coach={"max_tokens": 2048}, judge={"max_tokens": 64}))
    recipe["stages"][1]["shots_file"] = str(EXAMPLES / "data" / "coachlm_shots.jsonl")
    off, out = compare(tmp_path, mock, recipe, {"coach", "judge"})

    coach_data = [r["metadata"]["coach"] for r in off]
    assert [c["kept_original"] for c in coach_data] == [None, "rated_high", "unparsable", "unchanged", "too_short", None]
    assert [r["metadata"]["quality"] for r in off] == [3, 5, 3, 3, 3, 3]
    assert [r["metadata"]["quality_after"] for r in off] == [5, 5, 3, 3, 3, 5]  # the revised pairs rate higher
    assert all(c["mode"] == "prompted" for c in coach_data)
    assert steps(out) == ["quality.rate", "coach.revise", "rate-after"]
    report = json.loads((out / "reports" / "coachlm_report.json").read_text())
    assert (report["pairs"], report["revised"]) == (6, 2)
    assert report["quality_after"]["high_quality_share"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- TeaMs-RL


TEAMS_SEEDS = [{"instruction": f"[{'AB'[i % 2]}] a question number {i} about cooking"} for i in range(4)]


def test_teams_rl_generation_with_a_batched_expert_and_reviewer(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """Each step is a batch of rewrites, then one of reviews, then one of answers (keep: all), every seed's calls of a
    step in the same batch."""
    stages = [{"type": "teams.generate", "schedule": "random", "keep": "all", "elimination": True, "steps": 3}]
    recipe = {"models": models(mock.url, "expert", "reviewer"), "input": str(write_rows(tmp_path / "seeds.jsonl", TEAMS_SEEDS)),
              "stages": stages}
    off, out = compare(tmp_path, mock, recipe, {"expert", "reviewer"})
    ns = [r["metadata"]["teams_rl"] for r in off]
    assert all(len(n["ops"]) == 3 for n in ns)
    for n in ns:  # the reviewer's verdicts (through a batch) decided which rewrite stayed
        assert all(why for v, why in zip(n["rewards"], n["eliminated"]) if v == 0.0)
        assert all(v == 1.0 for v, why in zip(n["rewards"], n["eliminated"]) if why is None)
    assert any(why for n in ns for why in n["eliminated"]) and any(why is None for n in ns for why in n["eliminated"])
    journal = read_jsonl(out / "batches" / "journal.jsonl")
    sizes = [len(r["requests"]) for r in journal if r["event"] == "planned"]
    assert sizes[0] == len(TEAMS_SEEDS), "the first rewrite of every seed goes in one batch"


def without_policy_path(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """strip_batch, and the policy's path (in each run's own directory)."""
    out = strip_batch(records)
    for r in out:
        r["metadata"]["teams_rl"]["policy"] = Path(r["metadata"]["teams_rl"]["policy"]).name
    return out


def test_teams_rl_training_with_a_batched_rewriter_and_reviewer(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """A tiny training: each environment step waits for a batch of rewrites, then one of reviews (n_envs requests
    each); the policy it trains is the one online training trains, so generation makes the same pairs."""
    pytest.importorskip("sb3_contrib")
    stages = [{"type": "teams.train", "updates": 1, "n_envs": 2, "breadth_bias": 0.0},
              {"type": "teams.generate", "schedule": "policy", "keep": "last", "elimination": False, "steps": 2}]
    recipe = {"models": models(mock.url, "rewriter", "reviewer", "expert"),
              "input": str(write_rows(tmp_path / "seeds.jsonl", TEAMS_SEEDS)), "stages": stages}
    off, out = compare(tmp_path, mock, recipe, {"rewriter", "reviewer", "expert"}, same=without_policy_path)
    log = "stages/00-teams.train/policy/training_log.csv"
    trained = [{k: v for k, v in row.items() if k != "seconds"} for run_dir in (out, tmp_path / "online")
               for row in csv.DictReader((run_dir / log).open())]
    assert trained[0] == trained[1] and trained[0]["mean_episode_reward"] == "0.5"  # the same update, the same rewards
    planned = [r for r in read_jsonl(out / "batches" / "journal.jsonl") if r["event"] == "planned"]
    training = [r for r in planned if all(o == "teams.train:*" for _, o in r["requests"])]  # the stage's, not a record's
    # one update = one 6-step episode per environment: 6 batches of 2 rewrites and 6 of 2 reviews
    assert [len(r["requests"]) for r in training] == [2] * 12
    assert len(off) == len(TEAMS_SEEDS)


# ----------------------------------------------------------------------------- the baselines


def test_self_instruct_with_a_batched_strong_model(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """Self-Instruct's rounds of calls (ROUGE-L screening between them) each become a batch, then the answers."""
    seeds = [{"instruction": f"{v} {t} {f}."} for v, t, f in zip(VERBS, THINGS, FOR)]
    stages = [{"type": "self_instruct", "seed_demos": 3, "per_call": 4, "concurrency": 2}, {"type": "respond", "role": "strong"}]
    recipe = {"models": models(mock.url, "strong"), "input": str(write_rows(tmp_path / "seeds.jsonl", seeds)),
              "stages": stages, "budget_pairs": 10}
    off, out = compare(tmp_path, mock, recipe, {"strong"})
    assert len(off) == 10 and all(r["response"] == f"A fresh expert answer to: {r['instruction']}" for r in off)
    stats_path = "stages/00-self_instruct/self_instruct_stats.json"
    stats = json.loads((out / stats_path).read_text())
    assert stats == json.loads((tmp_path / "online" / stats_path).read_text())
    assert stats["rouge_l_too_similar"] > 0 and stats["calls"] >= 2  # the screening between rounds was exercised
    planned = [r for r in read_jsonl(out / "batches" / "journal.jsonl") if r["event"] == "planned"]
    # a batch per round of at most `concurrency` calls, then one batch of answers
    assert all(len(r["requests"]) <= 2 for r in planned[:-1]) and sum(len(r["requests"]) for r in planned[:-1]) == stats["calls"]
    assert len(planned[-1]["requests"]) == 10 and steps(out) == ["self_instruct", "respond"]


def test_evol_instruct_with_a_batched_strong_model_and_an_online_checker(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """Per round: a batch of evolutions, the information-gain checks online, a batch of answers."""
    seeds = [{"instruction": f"Explain how topic {i} works to a new student."} for i in range(4)]
    stages = [{"type": "evol.evolve", "rounds": 3, "equal_role": "judge"}, {"type": "select"}]
    recipe = {"models": models(mock.url, "strong", "judge"), "input": str(write_rows(tmp_path / "seeds.jsonl", seeds)),
              "stages": stages, "budget_pairs": 6}
    off, out = compare(tmp_path, mock, recipe, {"strong"})
    assert len(off) == 6
    rounds = [r for record in off for r in record["metadata"]["evol"]["rounds"]]
    reasons = {r["eliminated"].split(":")[0] for r in rounds if r["eliminated"]}
    assert reasons >= {"no information gain", 'the answer says "sorry" in under 80 words'}  # both checks ran
    assert steps(out) == ["evol.evolve"] and len(planned_stages(out)) >= 2 * 3


# ----------------------------------------------------------------------------- a batched judge


def test_judge_pairwise_and_quality_rate_as_a_batched_judge(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """Both orders of a pairwise judgement go in one batch; a rating in `logprob` mode gets its token probabilities
    back from the batch (else the stage would stop: no logprobs)."""
    qualities = [(9, 3), (4, 8), (7, 7), (8, 2)]
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}. Q={i % 6} QUALITY={a}", "reference": f"Ref {i}. QUALITY={b}"}
            for i, (a, b) in enumerate(qualities)]
    stages = [{"type": "quality.rate", "role": "judge", "min_score": 2},
              {"type": "quality.rate", "name": "rate-logprob", "role": "judge", "scoring": "logprob", "key": "quality_lp"},
              {"type": "judge.pairwise", "role": "judge", "b": "metadata.reference", "keep": "a"}]
    rows = [{**r, "metadata": {"reference": r.pop("reference")}} for r in rows]
    recipe = {"models": models(mock.url, "judge"), "input": str(write_rows(tmp_path / "pairs.jsonl", rows)), "stages": stages}
    off, out = compare(tmp_path, mock, recipe, {"judge"})
    # Q=0 and Q=1 rate below min_score 2; of the rest, only A=9 > B=3 and A=8 > B=2 win both orders
    assert [r["instruction"] for r in off] == ["Question 3?"]
    (kept,) = off
    assert kept["metadata"]["quality"] == 3 and kept["metadata"]["quality_lp"] == pytest.approx(0.6 * 3 + 0.3 * 2 + 0.1 * 4)
    judge = kept["metadata"]["judge"]
    assert judge["a_first"] == judge["b_first"] == [8.0, 2.0] and judge["verdict"] == "a"  # A's score first, in both orders
    assert [k for _, _, k, _ in failure_keys(out)] == ["low_quality", "low_quality", "judge_filter"]
    assert steps(out) == ["quality.rate", "rate-logprob", "judge.pairwise"]
    planned = [r for r in read_jsonl(out / "batches" / "journal.jsonl") if r["event"] == "planned"]
    assert len(planned[-1]["requests"]) == 2 * 2  # two pairs judged, both orders, one batch


def test_eval_with_a_batched_judge(tmp_path: Path, mock: MockOpenAIServer) -> None:
    """`datatailor eval` builds a recipe: a judge with batch: true in the --models file judges through batches, in
    OUT/run/batches, with the numbers of an online judge at half its price."""
    testset = write_rows(tmp_path / "items.jsonl", [
        {"id": f"t{i}", "instruction": f"Please answer item {i} QUALITY={q}", "reference": "A reference answer. QUALITY=5"}
        for i, q in enumerate([9, 2, 5, 8])])

    def evaluate(out: str, batch: bool, *flags: str) -> dict[str, Any]:
        entries = {"candidate": model(mock.url, "mock-candidate", False), "judge": model(mock.url, "mock-judge", batch)}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({"models": entries}), encoding="utf-8")
        code = main(["eval", "--testset", str(testset), "--models", str(path), "--reference", "stored", "--out",
                     str(tmp_path / out), "--no-progress", *flags])
        assert code == 0
        return json.loads((tmp_path / out / "eval.json").read_text())

    batched = evaluate("batched", True)
    online = evaluate("online", False, "--no-cache")
    assert batched["by_rule"] == online["by_rule"] and batched["by_rule"]["strict"]["wins"] == 2
    roles = {name: json.loads((tmp_path / name / "run" / "usage.json").read_text())["run"]["roles"] for name in ("batched", "online")}
    assert roles["batched"]["judge"]["cost_usd"] == pytest.approx(roles["online"]["judge"]["cost_usd"] / 2)
    assert roles["batched"]["candidate"] == roles["online"]["candidate"]
    assert mock.stats["batch_lines"] == roles["batched"]["judge"]["requests"] == 2 * 4
    judged = read_jsonl(tmp_path / "batched" / "run" / "data.jsonl")
    assert all(next(e for e in r["lineage"] if e["stage"] == "judge")["details"]["batch_id"] in mock.batch_api.batches for r in judged)
    created = mock.stats["batches_created"]
    again = evaluate("again", True)
    assert again["by_rule"] == batched["by_rule"] and mock.stats["batches_created"] == created  # from the cache


# ----------------------------------------------------------------------------- shared calls and resume


def test_a_shared_call_read_back_after_a_resume_keeps_its_batch_id(tmp_path: Path) -> None:
    """REFED's feedback is one call per reference, shared by its records and checkpointed in shared_calls.jsonl. A
    crash after the calls but before the records were checkpointed: the resumed run reads the calls back (no request)
    and each record's lineage still names the batch that answered its feedback."""
    refs = write_rows(tmp_path / "refs.jsonl", REFERENCES)
    with MockOpenAIServer(MockConfig(handler="tests.test_batch_recipes:refed_world", batch_delay_s=0.02)) as mock:
        recipe = parse_recipe({"models": {"teacher": model(mock.url, "mock-teacher", True)}, "input": str(refs),
                               "stages": REFED[:2], "budget_pairs": 12, "cache": False}, "shared-batch", tmp_path)
        out = tmp_path / "out"
        assert run(recipe, out).status == "complete"
        first = read_jsonl(out / "data.jsonl")
        stage = out / "stages" / "01-refed.feedback"
        shared = read_jsonl(stage / "shared_calls.jsonl")
        assert len(shared) == 2 * len(REFERENCES) and all(row["batch_id"] in mock.batch_api.batches for row in shared)

        (stage / "outputs.jsonl").write_text("", encoding="utf-8")
        (stage / "done.json").unlink()
        (out / "data.jsonl").unlink()
        lines = mock.stats["batch_lines"]
        assert run(recipe, out).status == "complete"
        assert mock.stats["batch_lines"] == lines and usage(out)["requests"] == 0
    resumed = read_jsonl(out / "data.jsonl")
    assert resumed == first
    feedback = [e for r in resumed for e in r["lineage"] if e["stage"] == "refed.feedback"]
    assert len(feedback) == 2 * len(resumed) and {e["details"]["batch_id"] for e in feedback} == {row["batch_id"] for row in shared}
