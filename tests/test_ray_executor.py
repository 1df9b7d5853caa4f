"""`--executor ray` on a local Ray (127.0.0.1, 2 CPUs, 2 workers): the same bytes as the local runner, every id
exactly once when a worker or the driver is killed, faults lose nothing, distributed dedup decides as the local one.

Run with `python -m pytest -m ray` (CI runs them as their own step, after `pip install -e '.[ray]'`)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray")

from datatailor.executors import RaySettings  # noqa: E402
from datatailor.executors.ray_executor import RayExecutor  # noqa: E402
from datatailor.io import read_records  # noqa: E402
from datatailor.recipe import parse_recipe  # noqa: E402
from datatailor.runner import run_recipe  # noqa: E402
from datatailor.testing import MockConfig, MockServerProcess  # noqa: E402
from tests.conftest import cli_env  # noqa: E402
from tests.support import questions, read_jsonl, write_rows  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray() -> Any:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")  # a Ray of its own, even when another (a test cluster, `ray start`) runs here
    yield ray
    ray.shutdown()


def echo(latency: float = 0.0) -> dict[str, Any]:
    return {"backend": "scripted", "model": "echo", "latency_s": latency,
            "rules": [{"match": r"Question number (\d+)", "reply": "Answer for {{ m[1] }}."}, {"match": ".*", "reply": "ok"}]}


def recipe(tmp: Path, rows: list[dict[str, Any]], stages: list[dict[str, Any]], models: dict[str, Any] | None = None, **extra: Any):
    write_rows(tmp / "input.jsonl", rows)
    return parse_recipe({"models": models or {"strong": echo()}, "input": "input.jsonl", "stages": stages, **extra}, "ray-test", tmp)


def run(r: Any, out: Path, executor: Any = None, **kw: Any):
    return asyncio.run(run_recipe(r, out, show_progress=False, executor=executor, **kw))


def ray_exec(**kw: Any) -> RayExecutor:
    return RayExecutor(RaySettings(workers=2, shard_size=kw.pop("shard_size", 25), **kw))


def test_same_bytes_as_the_local_runner(tmp_path: Path, local_ray: Any) -> None:
    rows = questions(300) + questions(40) + [{"instruction": "Question number 999: How can I improve my time management skills?"}]
    # repeats: dedup drops them; the Vicuna question: decontam drops it (a map, spread like respond)
    stages = [{"type": "respond", "role": "strong", "concurrency": 8}, {"type": "decontam", "testsets": ["vicuna80"]}, {"type": "dedup"}]
    local = run(recipe(tmp_path, rows, stages, cache=False), tmp_path / "local")
    distributed = run(recipe(tmp_path, rows, stages, cache=False), tmp_path / "ray", ray_exec())
    assert local.status == distributed.status == "complete" and distributed.records == 300
    for name in ("data.jsonl", "failures.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    usage = json.loads((tmp_path / "ray" / "usage.json").read_text())["run"]
    assert usage["all"]["requests"] == 341  # every record once; the workers' usage reached the run's
    assert [f["kind"] for f in read_jsonl(tmp_path / "ray" / "failures.jsonl")].count("contaminated") == 1
    assert not list((tmp_path / "ray").glob("stages/*/parts/*")) and not list((tmp_path / "ray").glob("stages/*/shards"))


def test_killing_a_worker_mid_stage_loses_and_repeats_nothing(tmp_path: Path, local_ray: Any) -> None:
    rows = questions(600)
    stages = [{"type": "respond", "role": "strong", "concurrency": 8}]
    expected = run(recipe(tmp_path, rows, stages, cache=False), tmp_path / "local")
    r = recipe(tmp_path, rows, stages, models={"strong": echo(latency=0.05)}, cache=False)
    parts = tmp_path / "ray" / "stages" / "00-respond" / "parts"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for f in parts.glob("*.outputs.jsonl") if parts.exists() else []:
                if len(f.read_text().splitlines()) >= 40:
                    pid = int(f.name.split("-")[-2])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    result = run(r, tmp_path / "ray", ray_exec())
    thread.join()
    assert killed, "no worker was killed"
    assert result.status == "complete"
    assert (tmp_path / "ray" / "data.jsonl").read_bytes() == (tmp_path / "local" / "data.jsonl").read_bytes()
    ids = [row["src"] for row in read_jsonl(tmp_path / "ray" / "stages" / "00-respond" / "outputs.jsonl")]
    assert len(ids) == len(set(ids)) == 600  # exactly once, although the dead worker's shard ran again
    assert expected.records == 600


def test_faults_on_the_server_lose_no_row(tmp_path: Path, local_ray: Any) -> None:
    mock = MockConfig(latency_s=0.005, seed=3, rate_429=0.05, rate_500=0.05, rate_timeout=0.05, rate_truncated=0.05,
                      retry_after_s=0.2, hang_s=5.0)
    with MockServerProcess(mock) as server:
        model = {"backend": "openai", "model": "mock-model", "base_url": server.url, "api_key_env": None, "max_concurrency": 16,
                 "timeout_s": 0.5, "max_retries": 2, "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2}
        result = run(recipe(tmp_path, questions(400), [{"type": "respond", "role": "strong", "concurrency": 16}],
                            models={"strong": model}, cache=False), tmp_path / "ray", ray_exec())
    assert result.status == "complete"
    data, failures = read_jsonl(tmp_path / "ray" / "data.jsonl"), read_jsonl(tmp_path / "ray" / "failures.jsonl")
    ids = [r["id"] for r in data] + [f["id"] for f in failures]
    assert sorted(ids) == sorted(r.id for r in read_records(tmp_path / "input.jsonl"))
    assert failures, "with 20 % faults and 2 retries a few rows exhaust them (reported, not lost)"


def planted_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """30 % copies of an earlier row: half exact (upper-cased), half with one word of 20-30 changed."""
    rng = random.Random(seed)
    words = "sun moon river stone field cloud frost ember grove tide spark dune cedar heron amber quill".split()
    out: list[str] = []
    while len(out) < n:
        if out and rng.random() < 0.3:
            original = rng.choice(out)
            if rng.random() < 0.5:
                out.append(original.upper())
            else:
                w = original.split()
                w[rng.randrange(len(w))] = rng.choice(words)
                out.append(" ".join(w))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 30))) + f" {rng.randrange(10**6)}")
    return [{"instruction": t} for t in out]


def test_distributed_dedup_decides_as_the_local_stage(tmp_path: Path, local_ray: Any) -> None:
    rows = planted_rows(20_000)
    stages = [{"type": "dedup", "compare": "instruction", "shingle_words": 2}]
    run(recipe(tmp_path, rows, stages), tmp_path / "local")
    run(recipe(tmp_path, rows, stages), tmp_path / "ray", ray_exec(shard_size=2000))
    kinds = [f["kind"] for f in read_jsonl(tmp_path / "local" / "failures.jsonl")]
    assert kinds.count("duplicate") > 2000 and kinds.count("near_duplicate") > 2000  # the planted copies were found
    for name in ("data.jsonl", "failures.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_killing_the_driver_then_resuming_repeats_no_finished_record(tmp_path: Path) -> None:
    rows = questions(500)
    write_rows(tmp_path / "input.jsonl", rows)
    with MockServerProcess(MockConfig(latency_s=0.05)) as server:
        model = {"backend": "openai", "model": "mock-model", "base_url": server.url, "api_key_env": None, "max_concurrency": 8}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models": {"strong": model}, "input": "input.jsonl",
                                                          "stages": [{"type": "respond", "role": "strong", "concurrency": 8}]}))
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "datatailor", "run", str(tmp_path / "r.yaml"), "--out", str(out), "--no-progress",
               "--executor", "ray", "--workers", "2", "--shard-size", "20"]
        # The driver's own Ray keeps its files (and its processes' command lines) under a folder of its own, so
        # killing that Ray cannot touch the module's Ray or this test process (`ray stop` would kill them all).
        ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
        env = cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c1"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=ray_tmp)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        parts = out / "stages" / "00-respond" / "parts"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "ended early"
            if parts.exists() and sum(len(f.read_text().splitlines()) for f in parts.glob("*.outputs.jsonl")) >= 100:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver
        proc.wait(timeout=20)
        _kill_processes_mentioning(ray_tmp)  # and the Ray it started
        finished = {row["src"] for f in parts.glob("*.outputs.jsonl") for row in _complete_rows(f)}
        finished |= {row["src"] for row in _complete_rows(out / "stages" / "00-respond" / "outputs.jsonl")}
        assert 100 <= len(finished) < 500
        before = server.stats()["requests"]
        done = subprocess.run(cmd, env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c2"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                                               RAY_TMPDIR=ray_tmp), capture_output=True, text=True, timeout=300)
        _kill_processes_mentioning(ray_tmp)
        assert done.returncode == 0, done.stderr
        resumed = server.stats()["requests"] - before
    assert resumed == 500 - len(finished)  # a fresh cache, so only the unfinished records were asked again
    ids = [r["id"] for r in read_jsonl(out / "data.jsonl")]
    assert len(ids) == len(set(ids)) == 500


def _kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains `text` (here: one Ray's temp folder), and their
    descendants (Ray's workers rename themselves, so their command lines do not mention it)."""
    from datatailor.executors.reaper import session_processes, stop

    stop(session_processes(text), signal.SIGKILL)
    time.sleep(0.5)


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


class DriverOnlyConfig(__import__("datatailor.stages.base", fromlist=["StageConfig"]).StageConfig):
    type: str = "test.driver_only"


def _register_driver_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage that cannot be spread, registered for one test only (so it never shows in the docs)."""
    from datatailor.stages import STAGES, load_all
    from datatailor.stages.base import MapStage

    class DriverOnly(MapStage[DriverOnlyConfig]):
        Config = DriverOnlyConfig
        distributed = False
        type_name = "test.driver_only"

        async def process(self, record):
            return [record.model_copy(update={"response": f"pid {os.getpid()}"})]

    load_all()
    monkeypatch.setitem(STAGES, "test.driver_only", DriverOnly)


def test_stages_that_cannot_be_spread_run_on_the_driver(tmp_path: Path, local_ray: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _register_driver_only(monkeypatch)
    spread: list[str] = []
    original = RayExecutor.run_map

    async def recording(self, runner, index, stage, cp, inputs):
        spread.append(stage.name)
        return await original(self, runner, index, stage, cp, inputs)

    monkeypatch.setattr(RayExecutor, "run_map", recording)
    stages = [{"type": "respond", "role": "strong"}, {"type": "test.driver_only"}]
    result = run(recipe(tmp_path, questions(30), stages, cache=False), tmp_path / "ray", ray_exec())
    assert result.status == "complete" and spread == ["respond"]
    assert {r["response"] for r in read_jsonl(tmp_path / "ray" / "data.jsonl")} == {f"pid {os.getpid()}"}



def test_the_budget_holds_across_workers(tmp_path: Path, local_ray: Any) -> None:
    budget = 6000
    r = recipe(tmp_path, questions(1000), [{"type": "respond", "role": "strong", "concurrency": 8}],
               models={"strong": echo(latency=0.1)}, cache=False, budget={"max_tokens": budget})
    result = run(r, tmp_path / "ray", ray_exec())
    assert result.status == "budget_exhausted"
    spent = json.loads((tmp_path / "ray" / "usage.json").read_text())["run"]["all"]
    tokens = spent["prompt_tokens"] + spent["completion_tokens"]
    # Each worker sees the others' spending every 0.5 s: two workers that ignored each other would spend
    # about twice the budget; the overshoot is the calls started within one refresh.
    assert budget <= tokens < 1.35 * budget, tokens
    assert not (tmp_path / "ray" / "data.jsonl").exists()


def test_a_stalled_stage_stops_as_interrupted_and_resumable(tmp_path: Path, local_ray: Any) -> None:
    # Last in this module: the hung workers keep their CPU slots for 20 s after the run has stopped.
    r = recipe(tmp_path, questions(60), [{"type": "respond", "role": "strong", "concurrency": 4}],
               models={"strong": {"backend": "scripted", "model": "hangs", "handler": "tests.support:hang_from_20"}}, cache=False)
    started = time.monotonic()
    result = run(r, tmp_path / "ray", ray_exec(shard_size=10, stall_timeout_s=3.0))
    assert result.status == "interrupted" and "no worker made progress for 3 s" in result.message
    assert time.monotonic() - started < 20
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and not (tmp_path / "ray" / "data.jsonl").exists()
    finished = read_jsonl(tmp_path / "ray" / "stages" / "00-respond" / "outputs.jsonl")
    assert 5 <= len(finished) <= 20 and len({row["src"] for row in finished}) == len(finished)
