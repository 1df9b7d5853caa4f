"""Spend that adds up after a kill: every process's spend log is replayed, "this run" is what this invocation asked
for, and the run's total equals what the server answered, or names the requests that were in flight.

The server's own counters (the mock's /stats: requests received, answers sent, their tokens) are the truth the
figures are checked against, as a user reconciles them with a bill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from datatailor.llm.spend_log import Spend, account, usage_json
from datatailor.testing import MockConfig, MockServerProcess
from tests.conftest import cli_env
from tests.support import questions, read_jsonl, write_rows


def test_a_request_sent_but_never_answered_is_unaccounted_and_logs_are_attributed_by_invocation() -> None:
    earlier = [["s", "strong", "respond"], ["a", "strong", "respond", 10, 5, 0.01, 0], ["s", "strong", "respond"],
               ["s", "strong", "respond"], ["f", "strong", "respond"], ["h", "strong", "respond"]]
    worker_of_earlier = [["s", "strong", "respond"], ["a", "strong", "respond", 1, 2, 0.0, 1]]
    mine = [["s", "strong", "respond"], ["a", "strong", "respond", 3, 4, 0.5, 0]]
    logs = [("usage/inv1.hostA-1-aa.jsonl", earlier), ("usage/inv1.hostB-2-bb.jsonl", worker_of_earlier),
            ("usage/inv2.hostA-3-cc.jsonl", mine)]
    run, total = account(logs, "inv2", base={"roles": {"strong": {"requests": 100, "prompt_tokens": 1000}}})
    # this run is the one log of inv2: an earlier invocation's worker never counts as this run's
    assert run.roles["strong"].requests == 1 and run.roles["strong"].tokens == 7 and run.unaccounted == 0
    assert total.roles["strong"].requests == 100 + 1 + 1 + 1  # the base (pre-log usage) and every answered request
    assert total.roles["strong"].failed_requests == 1 and total.roles["strong"].cache_hits == 1
    assert total.roles["strong"].truncated == 1 and total.stages["respond"].requests == 3
    assert total.unaccounted == 1  # sent 3 in inv1's driver, 1 answered, 1 failed: one in flight when it died
    data = usage_json(run, total, {})
    assert data["total"]["unaccounted_requests"] == 1 and data["run"]["unaccounted_requests"] == 0
    assert data["run"]["all"]["cost_usd"] == 0.5 and data["total"]["all"]["requests"] == 103
    assert Spend().replay([["s", "r", None]]).unaccounted == 1
    # a batched role logs answers without "s" (its requests go in batches): they never hide an online one in flight
    mixed = Spend().replay([["a", "batched", None, 1, 1, 0.0, 0]] * 3 + [["s", "online", None]])
    assert mixed.unaccounted == 1


def _server_stats(server: MockServerProcess) -> dict[str, int]:
    stats = server.stats()
    return {k: int(stats.get(k, 0)) for k in ("requests", "answered", "prompt_tokens", "completion_tokens", "in_flight")}


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (proc.stderr.read().decode() if proc.stderr else "the run ended early")
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("the run did not get far enough in time")


def kill_and_resume(tmp_path: Path, out: str, extra_env: dict[str, str], finished: Any, n: int = 400,
                    cmd_extra: list[str] | None = None) -> dict[str, Any]:
    """Run `datatailor run` against the mock, SIGKILL it once `finished()` >= n/3, run it again to the end.
    Returns the server's counters after each step and the usage.json figures of the resumed run."""
    write_rows(tmp_path / "input.jsonl", questions(n))
    with MockServerProcess(MockConfig(latency_s=0.05)) as server:
        model = {"backend": "openai", "model": "mock-model", "base_url": server.url, "api_key_env": None,
                 "max_concurrency": 8}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models": {"strong": model}, "input": "input.jsonl", "cache": False,
                                                          "stages": [{"type": "respond", "role": "strong", "concurrency": 8}]}))
        cmd = [sys.executable, "-m", "datatailor", "run", str(tmp_path / "r.yaml"), "--out", out, "--no-progress", *(cmd_extra or [])]
        env = cli_env(**extra_env)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        _wait_for(lambda: finished() >= n // 3, 180, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        time.sleep(0.3)  # let the server finish what was in flight (its answers go nowhere)
        killed = _server_stats(server)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        final = _server_stats(server)
    return {"killed": killed, "final": final, "stdout": done.stdout, "stderr": done.stderr}


def _check(figures: dict[str, Any], usage: dict[str, Any]) -> None:
    killed, final = figures["killed"], figures["final"]
    run, total = usage["run"], usage["total"]
    # this run: exactly what this process (and its workers) asked for
    assert run["all"]["requests"] == final["answered"] - killed["answered"]
    assert run["all"]["prompt_tokens"] + run["all"]["completion_tokens"] == (
        final["prompt_tokens"] + final["completion_tokens"] - killed["prompt_tokens"] - killed["completion_tokens"])
    assert run["unaccounted_requests"] == 0
    # the total: what the server answered, except the requests in flight at the kill, which it names (an upper
    # bound: a request logged as sent may have died in the client before it reached the server)
    lost = total["unaccounted_requests"]
    assert 0 <= lost <= 8  # at most the concurrency
    assert total["all"]["requests"] <= final["requests"] <= total["all"]["requests"] + lost
    assert total["all"]["requests"] <= final["answered"] <= total["all"]["requests"] + lost
    tokens = total["all"]["prompt_tokens"] + total["all"]["completion_tokens"]
    assert tokens <= final["prompt_tokens"] + final["completion_tokens"]
    if lost == 0:
        assert tokens == final["prompt_tokens"] + final["completion_tokens"]
    else:
        assert "in flight when a process was killed" in figures["stdout"]


def test_the_local_runner_killed_then_resumed_counts_spend_exactly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    journal = out / "stages" / "00-respond" / "outputs.jsonl"
    finished = lambda: len(journal.read_bytes().splitlines()) if journal.exists() else 0  # noqa: E731
    figures = kill_and_resume(tmp_path, str(out), {"DATATAILOR_CACHE_DIR": str(tmp_path / "c")}, finished=finished)
    usage = json.loads((out / "usage.json").read_text())
    _check(figures, usage)
    assert "resuming respond:" in figures["stderr"] or json.loads((out / "manifest.json").read_text())["resumed"]["respond"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"]["respond"] >= 400 // 3
    ids = [r["id"] for r in read_jsonl(out / "data.jsonl")]
    assert len(ids) == len(set(ids)) == 400


def test_the_local_runner_on_s3_killed_then_resumed_counts_spend_exactly(tmp_path: Path) -> None:
    from tests.s3_support import make_bucket, moto_s3

    with moto_s3() as env:
        make_bucket(env, "spend")
        staging = tmp_path / "staging"
        extra = {**env, "DATATAILOR_CACHE_DIR": str(tmp_path / "c"), "DATATAILOR_STAGING_DIR": str(staging)}

        def finished() -> int:
            found = list(staging.glob("*/stages/00-respond/outputs.jsonl"))
            return len(found[0].read_bytes().splitlines()) if found else 0

        figures = kill_and_resume(tmp_path, "s3://spend/run", extra, finished=finished)
        s3 = make_bucket(env, "checks")
        usage = json.loads(s3.cat_file("spend/run/usage.json"))
        data = s3.cat_file("spend/run/data.jsonl").decode().splitlines()
    _check(figures, usage)
    ids = [json.loads(line)["id"] for line in data]
    assert len(ids) == len(set(ids)) == 400


def test_usage_json_of_an_old_run_is_kept_as_the_base() -> None:
    from datatailor.llm.spend_log import base_of

    old = {"run": {"roles": {}}, "total": {"roles": {"strong": {"requests": 7}}, "stages": {"respond": {"requests": 7}}}}
    assert base_of(old) == {"roles": {"strong": {"requests": 7}}, "stages": {"respond": {"requests": 7}}}
    new = {"from_spend_logs": True, "base": {"roles": {"strong": {"requests": 7}}}, "total": {"roles": {"strong": {"requests": 99}}}}
    assert base_of(new) == {"roles": {"strong": {"requests": 7}}}
    assert base_of({}) == {}
