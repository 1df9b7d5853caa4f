"""A real cluster on one machine: a Ray head and two worker nodes (each its own temp folder and spool folder, on
127.0.0.1), `--out` in a local S3 server (moto), the driver a separate `datatailor run --address …` process.

No node reads the driver's staging folder: every Ray worker process runs with an audit hook (a `sitecustomize`
on its PYTHONPATH) that records any open or listing of a path under it, and the tests assert that none happened
(and that the hook was live in the workers). A worker node removed mid-run, and the driver killed mid-run then
run again, both end with every id once and no more requests repeated than were in flight or in one flush window,
checked against the mock server's own counters. Marked `ray`: CI runs them in their own step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("s3fs")

from ray.cluster_utils import Cluster  # noqa: E402

from datatailor.testing import MockConfig, MockServerProcess  # noqa: E402
from tests.conftest import REPO, cli_env  # noqa: E402
from tests.s3_support import make_bucket, moto_s3  # noqa: E402
from tests.support import questions, write_rows  # noqa: E402

pytestmark = pytest.mark.ray

N = 600
CONCURRENCY = 8  # the stage's, split over 2 workers
FLUSH = 2  # --flush-records: a worker lost with its node loses at most this many finished records

AUDIT = '''
import os, sys
_forbidden = os.environ.get("DT_AUDIT_FORBIDDEN")
if _forbidden:
    _log = os.environ["DT_AUDIT_LOG"]
    with open(os.path.join(os.environ["DT_AUDIT_MARKS"], str(os.getpid())), "w") as _fh:
        _fh.write(" ".join(sys.argv)[:200])
    def _hook(event, args, _f=_forbidden, _log=_log):
        if event in ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename") and args:
            path = args[0]
            if isinstance(path, (str, bytes, os.PathLike)):
                p = os.fsdecode(path) if not isinstance(path, int) else ""
                if p.startswith(_f):
                    with open(_log, "a") as fh:
                        fh.write(f"{os.getpid()} {event} {p}\\n")
    sys.addaudithook(_hook)
'''


class World:
    def __init__(self, root: Path, s3: dict[str, str], cluster: Cluster, nodes: dict[str, Any], server: MockServerProcess):
        self.root, self.s3, self.cluster, self.nodes, self.server = root, s3, cluster, nodes, server
        self.staging = root / "driver-staging"  # what no worker may touch
        self.audit_log = root / "audit.log"
        self.marks = root / "marks"
        self.fs = make_bucket(s3, "runs")

    def spool(self, node: str) -> Path:
        return self.root / f"spool-{node}"

    def driver_cmd(self, out: str) -> list[str]:
        return [sys.executable, "-m", "datatailor", "run", str(self.root / "r.yaml"), "--out", out, "--no-progress",
                "--executor", "ray", "--address", self.cluster.address, "--workers", "2", "--shard-size", "25",
                "--flush-records", str(FLUSH), "--flush-seconds", "1", "--stall-timeout", "120"]

    def driver_env(self) -> dict[str, str]:
        return cli_env(**self.s3, DATATAILOR_STAGING_DIR=str(self.staging), DATATAILOR_CACHE_DIR=str(self.root / "cache"),
                       RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")

    def answered(self) -> int:
        return int(self.server.stats().get("answered", 0))


def _node_env(root: Path, name: str, audit_dir: Path, world_staging: Path, s3: dict[str, str]) -> dict[str, str]:
    return {**s3, "DATATAILOR_SPOOL_DIR": str(root / f"spool-{name}"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONPATH": os.pathsep.join([str(audit_dir), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "DT_AUDIT_FORBIDDEN": str(world_staging), "DT_AUDIT_LOG": str(root / "audit.log"), "DT_AUDIT_MARKS": str(root / "marks")}


def _add_node(cluster: Cluster, root: Path, name: str, env: dict[str, str], **args: Any) -> Any:
    """A node whose processes get `env` (Ray's processes inherit the environment they are started with)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        temp = tempfile.mkdtemp(prefix=f"rt{name}", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
        if cluster.head_node is None:
            return cluster.add_node(node_ip_address="127.0.0.1", temp_dir=temp, include_dashboard=False, **args)
        return cluster.add_node(node_ip_address="127.0.0.1", temp_dir=temp, **args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("cluster")
    (root / "marks").mkdir()
    audit_dir = root / "audit"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT)
    write_rows(root / "input.jsonl", questions(N))
    with moto_s3() as s3, MockServerProcess(MockConfig(latency_s=0.05)) as server:
        model = {"backend": "openai", "model": "mock-model", "base_url": server.url, "api_key_env": None,
                 "max_concurrency": CONCURRENCY}
        (root / "r.yaml").write_text(yaml.safe_dump({"models": {"strong": model}, "input": "s3://runs/input.jsonl", "cache": False,
                                                     "stages": [{"type": "respond", "role": "strong", "concurrency": CONCURRENCY}]}))
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        cluster = Cluster(initialize_head=False)
        staging = root / "driver-staging"
        nodes = {"head": _add_node(cluster, root, "head", _node_env(root, "head", audit_dir, staging, s3), num_cpus=0)}
        for name in ("w1", "w2"):
            nodes[name] = _add_node(cluster, root, name, _node_env(root, name, audit_dir, staging, s3), num_cpus=1)
        cluster.wait_for_nodes()
        w = World(root, s3, cluster, nodes, server)
        w.fs.put(str(root / "input.jsonl"), "runs/input.jsonl")
        w.node_env = lambda name: _node_env(root, name, audit_dir, staging, s3)  # type: ignore[attr-defined]
        try:
            yield w
        finally:
            cluster.shutdown()


def _assert_no_worker_touched_the_staging_folder(w: World) -> None:
    assert not w.audit_log.exists(), w.audit_log.read_text()[:2000]
    workers = [p for p in w.marks.iterdir() if "default_worker" in p.read_text() or "ray::" in p.read_text()]
    assert workers, "the audit hook never ran in a Ray worker: the check proves nothing"


def _wait(predicate: Any, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (proc.stderr.read().decode()[-3000:] if proc.stderr else "the driver ended early")
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("the run did not get far enough in time")


def _data_ids(w: World, out: str) -> list[str]:
    w.fs.invalidate_cache()
    return [json.loads(line)["id"] for line in w.fs.cat_file(out.removeprefix("s3://") + "/data.jsonl").splitlines()]


def test_a_worker_node_lost_mid_run_loses_nothing_and_repeats_little(world: World) -> None:
    w = world
    out = "s3://runs/node-loss"
    before = int(w.server.stats().get("requests", 0))
    proc = subprocess.Popen(w.driver_cmd(out), env=w.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim: list[str] = []

    sizes: dict[str, int] = {}

    def busy_node() -> bool:  # a worker node whose worker is writing results right now (mid-shard)
        if w.answered() - before < N // 4:
            return False
        for name in ("w1", "w2"):
            size = sum(p.stat().st_size for p in w.spool(name).rglob("*.outputs.jsonl"))
            if sizes.get(name, size) < size:
                victim.append(name)
                return True
            sizes[name] = size
        return False

    _wait(busy_node, proc)
    dead = w.nodes[victim[0]]
    dead_id = dead.node_id
    w.cluster.remove_node(dead)
    stdout, stderr = proc.communicate(timeout=300)
    w.nodes[victim[0]] = _add_node(w.cluster, w.root, victim[0] + "b", w.node_env(victim[0]), num_cpus=1)  # type: ignore[attr-defined]
    assert proc.returncode == 0, stderr.decode()[-3000:]
    ids = _data_ids(w, out)
    assert len(ids) == len(set(ids)) == N
    repeated = int(w.server.stats().get("requests", 0)) - before - N
    # at most what the dead node's workers had in flight (the stage's concurrency at most) and one flush window each
    assert 0 <= repeated <= CONCURRENCY + 2 * FLUSH, repeated
    manifest = json.loads(w.fs.cat_file("runs/node-loss/manifest.json"))
    lost = manifest["executor"]["nodes_lost"]
    assert [n["node_id"] for n in lost] == [dead_id]
    assert f"worker node {dead_id[:12]}" in stderr.decode()
    # the dead node's shards ran again elsewhere, skipping what its workers had uploaded
    executor = manifest["executor"]
    # (a shard whose records had all been uploaded when the node died is rerun with every record skipped)
    assert executor["shards_rerun"] >= 1 and 0 <= executor["records_rerun"] <= executor["shards_rerun"] * 25
    assert executor["records_rerun"] + executor["records_skipped"] >= executor["shards_rerun"]
    assert "ran again:" in stderr.decode()
    usage = json.loads(w.fs.cat_file("runs/node-loss/usage.json"))
    # Spend: every request the logs hold reached the server. What the dead node's workers sent after their last
    # upload went down with the node: at most one flush window and their requests in flight each, and the user is
    # told so (the bound is in the note).
    logged = usage["run"]["all"]["requests"] + usage["run"]["unaccounted_requests"]
    assert usage["run"]["all"]["requests"] <= N + repeated
    assert N + repeated - logged <= 2 * (FLUSH + CONCURRENCY // 2), (N + repeated, logged)
    assert "requests sent since their last upload are not in usage.json" in stderr.decode()
    _assert_no_worker_touched_the_staging_folder(w)


def test_a_worker_process_killed_mid_run_costs_its_requests_in_flight_and_spend_adds_up(world: World) -> None:
    w = world
    out = "s3://runs/worker-kill"
    before = int(w.server.stats().get("requests", 0))
    proc = subprocess.Popen(w.driver_cmd(out), env=w.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed: list[int] = []

    def kill_a_worker() -> bool:  # a worker writing results right now: SIGKILL it (its node lives on)
        if w.answered() - before < N // 4:
            return False
        for name in ("w1", "w2"):
            for part in w.spool(name).rglob("*.outputs.jsonl"):
                pid = int(part.name.removesuffix(".outputs.jsonl").rsplit("-", 2)[1])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return True
        return False

    _wait(kill_a_worker, proc)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    ids = _data_ids(w, out)
    assert len(ids) == len(set(ids)) == N
    requests = int(w.server.stats().get("requests", 0)) - before
    # what the killed worker had finished is recovered from its node's spool; what it had in flight is asked again
    assert 0 <= requests - N <= CONCURRENCY // 2 + FLUSH, requests - N
    usage = json.loads(w.fs.cat_file("runs/worker-kill/usage.json"))
    run = usage["run"]
    # spend adds up: every request the server got is in the logs, answered or counted as unaccounted
    assert run["all"]["requests"] <= requests <= run["all"]["requests"] + run["unaccounted_requests"]
    assert run["unaccounted_requests"] <= CONCURRENCY // 2
    _assert_no_worker_touched_the_staging_folder(w)


def test_the_driver_killed_mid_run_then_resumed_repeats_at_most_what_was_in_flight(world: World) -> None:
    w = world
    out = "s3://runs/driver-kill"
    before = int(w.server.stats().get("requests", 0))
    proc = subprocess.Popen(w.driver_cmd(out), env=w.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _wait(lambda: w.answered() - before >= N // 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)
    time.sleep(1.0)
    at_kill = int(w.server.stats().get("requests", 0)) - before
    done = subprocess.run(w.driver_cmd(out), env=w.driver_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = _data_ids(w, out)
    assert len(ids) == len(set(ids)) == N
    total_requests = int(w.server.stats().get("requests", 0)) - before
    repeated = total_requests - N
    assert 0 <= repeated <= CONCURRENCY, (repeated, at_kill)  # the requests in flight when the driver died
    assert "resuming respond:" in done.stderr
    manifest = json.loads(w.fs.cat_file("runs/driver-kill/manifest.json"))
    assert manifest["resumed"]["respond"] >= at_kill - CONCURRENCY
    usage = json.loads(w.fs.cat_file("runs/driver-kill/usage.json"))
    # the resumed process asked for what the server got after the kill; the total adds up to the server's count
    assert usage["run"]["all"]["requests"] == total_requests - at_kill
    assert usage["total"]["all"]["requests"] <= total_requests <= usage["total"]["all"]["requests"] + usage["total"]["unaccounted_requests"]
    _assert_no_worker_touched_the_staging_folder(w)


def test_a_local_ray_started_by_a_killed_run_does_not_outlive_it(tmp_path: Path) -> None:
    from datatailor.executors.reaper import session_processes
    from tests.support import echo_model

    write_rows(tmp_path / "input.jsonl", questions(2000))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models": {"strong": {**echo_model(), "latency_s": 0.05}},
                                                      "input": "input.jsonl", "cache": False,
                                                      "stages": [{"type": "respond", "role": "strong", "concurrency": 4}]}))
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = cli_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=ray_tmp, DATATAILOR_CACHE_DIR=str(tmp_path / "c"))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                             "--no-progress", "--executor", "ray"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    parts = tmp_path / "out" / "stages" / "00-respond" / "parts"
    _wait(lambda: parts.exists() and any(p.stat().st_size > 0 for p in parts.glob("*.outputs.jsonl")), proc)
    assert session_processes(ray_tmp), "the run's Ray was not found under its temp folder"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its process group; Ray's processes are not in it
    proc.wait(timeout=20)
    deadline = time.time() + 30
    while session_processes(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    left = session_processes(ray_tmp)
    names = [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left if Path(f"/proc/{p}").exists()]
    assert not left, names  # no raylet, GCS, dashboard agent, runtime-env agent or worker left
