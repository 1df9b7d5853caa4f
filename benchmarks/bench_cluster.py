"""Scale-out on a 3-node Ray cluster on one machine, with the run directory in S3 (a local moto server).

A Ray head (no CPU for work) and two worker nodes (1 CPU each, their own temp and spool folders) on 127.0.0.1,
moto's S3 server and the mock OpenAI server as separate processes. The input is uploaded to S3 and the run writes
to `--out s3://bench/...`; the driver is a separate `datatailor run --executor ray --address …` process.

Jobs over N records of `respond` (one request each):

* full: one run from start to end. Prints wall time, records/s, requests at the server, the driver's peak RSS
  (wait4), the largest peak RSS of a worker process (VmHWM of the `MapWorker` processes, sampled every second),
  the bytes the run left in the store and in the driver's staging folder.
* kill: the same command, SIGKILLed when half the records were answered, then run again to the end. Prints the
  requests the server received beyond N (repeated), and what the resumed run's usage.json says.
* upload: no run; the peak RSS of one process that uploads a --upload-mb file of JSONL to S3 as a whole object
  (`RunStore.put_file`: data.jsonl at the end) and as a journal push (`JournalPusher`), each in a fresh process.

    python benchmarks/bench_cluster.py --records 20000                  # a quick check, a few minutes
    python benchmarks/bench_cluster.py --records 1000000 --jobs full    # the issue's figure (long on 2 cores)

Records the machine's load (`uptime`) before and after: other work on the machine slows every figure.

To see where the driver's memory goes: `--timeline FILE` runs the driver under a sampler (this script's
`--driver-timeline` mode) that writes, every 0.5 s, its RSS and the innermost datatailor function of each thread
(JSON lines), and prints the peak and the largest RSS seen in each function. `--executor local` and
`--out-kind local` give the comparisons (the local runner; a local --out folder instead of S3).

    python benchmarks/bench_cluster.py --records 50000 --jobs full --timeline /tmp/ray-s3.jsonl
    python benchmarks/bench_cluster.py --jobs upload --upload-mb 300 --records 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from datatailor.testing import MockConfig, MockServerProcess

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


class WorkerRss:
    """Samples the peak RSS (VmHWM) of Ray's MapWorker processes every second."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if b"MapWorker" not in (entry / "cmdline").read_bytes():
                        continue
                    for line in (entry / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    continue


def run_driver(cmd: list[str], env: dict[str, str], kill_when: Any = None, answered: Any = None) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MB, exit code, stderr tail) of one driver process; SIGKILLed once `kill_when()` is true.
    Prints the answers so far every minute (`answered()`), so a run cut short still gives its rate."""
    started = time.perf_counter()
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    stop = threading.Event()

    def report() -> None:
        while answered is not None and not stop.wait(60):
            print(f"  … {time.perf_counter() - started:.0f} s: {answered()} answered", flush=True)

    threading.Thread(target=report, daemon=True).start()
    if kill_when is not None:
        while proc.poll() is None and not kill_when():
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    elapsed = time.perf_counter() - started
    err.seek(0)
    return elapsed, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")[-2000:]


def where(frame: Any) -> str:
    """The innermost datatailor function on a thread's stack (`module.function`), or the innermost function."""
    innermost = None
    while frame is not None:
        name = frame.f_code.co_filename
        label = f"{Path(name).stem}.{frame.f_code.co_name}"
        innermost = innermost or label
        if "/datatailor/" in name:
            return label
        frame = frame.f_back
    return innermost or "?"


def driver_with_timeline(path: Path, argv: list[str]) -> int:
    """Run `datatailor <argv>` in this process, sampling its RSS and where each thread is every 0.5 s."""
    page = os.sysconf("SC_PAGE_SIZE")
    started = time.monotonic()
    out = path.open("w", buffering=1)

    def sample() -> None:
        me = threading.get_ident()
        while True:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page / 1e6
            frames = {str(t): where(f) for t, f in sys._current_frames().items() if t != me}
            out.write(json.dumps({"t": round(time.monotonic() - started, 2), "rss_mb": round(rss, 1), "where": frames}) + "\n")
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True, name="bench-timeline").start()
    from datatailor.cli import main as cli_main

    sys.argv = ["datatailor", *argv]
    return int(cli_main() or 0)


def measure_upload(kind: str, local: Path, url: str) -> int:
    """In this process: upload `local` to `url` as a whole object or a journal; print the peak RSS (MB) before
    and after."""
    import resource

    from datatailor.storage import JournalPusher, RunStore

    store = RunStore(url)
    store.exists("")  # the client set up before the measure
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if kind == "put":
        store.put_file(local, "data.jsonl")
    else:
        JournalPusher(store, local, "stages/00-x/outputs.jsonl").push()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{before:.0f} {peak:.0f} {time.perf_counter() - started:.1f}")
    return 0


def upload_job(root: Path, mb: int, env: dict[str, str]) -> None:
    local = root / "upload.jsonl"
    line = (json.dumps({"src": "x" * 20, "text": "y" * 470}) + "\n").encode()
    with local.open("wb") as fh:
        for _ in range(mb * 2000):
            fh.write(line)
    for kind in ("put", "push"):
        out = subprocess.run([sys.executable, __file__, "--measure-upload", kind, str(local), f"s3://bench/upload-{kind}"],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
        print(f"upload ({kind}) of {local.stat().st_size / 1e6:.0f} MB: peak RSS {out[1]} MB "
              f"(+{float(out[1]) - float(out[0]):.0f} MB over the process before it) in {out[2]} s", flush=True)


def timeline_summary(path: Path) -> str:
    """The peak RSS and where the threads were then, and the largest RSS seen while each function was running."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return "timeline: no sample"
    peak = max(rows, key=lambda r: r["rss_mb"])
    by_fn: dict[str, tuple[float, float]] = {}  # function -> (largest RSS, first time seen)
    for r in rows:
        for fn in set(r["where"].values()):
            if fn.startswith(("threading.", "selectors.", "queue.", "bench_cluster.")):
                continue
            top, first = by_fn.get(fn, (0.0, r["t"]))
            by_fn[fn] = (max(top, r["rss_mb"]), first)
    lines = [(f"timeline: {len(rows)} samples over {rows[-1]['t']:.0f} s; peak {peak['rss_mb']:.0f} MB at "
              f"{peak['t']:.0f} s in {sorted(set(peak['where'].values()))}")]
    for fn, (top, first) in sorted(by_fn.items(), key=lambda kv: kv[1][1]):
        lines.append(f"  from {first:7.1f} s  max {top:6.0f} MB  {fn}")
    return "\n".join(lines)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--jobs", default="full,kill", help="full, kill, upload (comma-separated)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--flush-records", type=int, default=1024)
    parser.add_argument("--flush-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.002)
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray", help="local: the local runner (no cluster)")
    parser.add_argument("--out-kind", choices=("s3", "local"), default="s3", help="local: --out is a folder, not S3")
    parser.add_argument("--timeline", type=Path, default=None,
                        help="write the driver's RSS and where its threads are every 0.5 s to this file (JSON lines)")
    parser.add_argument("--upload-mb", type=int, default=300, help="the file's size for the upload job")
    if sys.argv[1:2] == ["--driver-timeline"]:  # the sampled driver itself (see --timeline)
        return driver_with_timeline(Path(sys.argv[2]), sys.argv[3:])
    if sys.argv[1:2] == ["--measure-upload"]:  # one upload, measured in a fresh process (the upload job)
        return measure_upload(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
    args = parser.parse_args()
    import ray
    import s3fs
    from ray.cluster_utils import Cluster

    jobs = args.jobs.split(",")
    ray_cluster = args.executor == "ray" and bool({"full", "kill"} & set(jobs))
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    root.mkdir(parents=True, exist_ok=True)
    n = args.records
    print(f"records={n} workers={args.workers} shard_size={args.shard_size} flush_records={args.flush_records} "
          f"concurrency={args.concurrency} latency={args.latency}s cpu_count={os.cpu_count()} ray={ray.__version__}")
    print(f"load before: {uptime()}", flush=True)
    port = free_port()
    moto = start_moto(port)
    s3env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    fs = s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs={"endpoint_url": s3env["AWS_ENDPOINT_URL"]})
    fs.mkdir("bench")
    server = MockServerProcess(MockConfig(latency_s=args.latency, reply_chars=200)).start()
    os.environ.update(s3env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cluster = Cluster(initialize_head=False)
    try:
        for name, cpus in (("head", 0), ("w1", 1), ("w2", 1)) if ray_cluster else ():
            os.environ["DATATAILOR_SPOOL_DIR"] = str(root / f"spool-{name}")
            extra = {"include_dashboard": False} if name == "head" else {}
            cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1", temp_dir=tempfile.mkdtemp(prefix=f"rb{name}", dir="/tmp"),
                             object_store_memory=200 * 1024 * 1024, **extra)
        if ray_cluster:
            cluster.wait_for_nodes()
        started = time.perf_counter()
        with (root / "input.jsonl").open("w") as fh:
            for i in range(n):
                fh.write(json.dumps({"instruction": f"Task {i}: write two sentences about river number {i} for reader {i * 7919 % 100003}."}) + "\n")
        fs.put(str(root / "input.jsonl"), "bench/input.jsonl")
        print(f"input: {n} records, {(root / 'input.jsonl').stat().st_size / 1e6:.1f} MB, uploaded in {time.perf_counter() - started:.1f} s")
        model = {"backend": "openai", "model": "mock-model", "base_url": server.url, "api_key_env": None,
                 "max_concurrency": args.concurrency, "max_tokens": 64, "timeout_s": 60}
        (root / "r.yaml").write_text(yaml.safe_dump({"name": "bench-cluster", "input": "s3://bench/input.jsonl", "cache": False,
                                                     "models": {"strong": model},
                                                     "stages": [{"type": "respond", "role": "strong", "concurrency": args.concurrency}]}))

        def cmd(out: str, timeline: Path | None = None) -> list[str]:
            if args.out_kind == "local":
                out = str(root / out.rsplit("/", 1)[-1])
            head = [sys.executable, __file__, "--driver-timeline", str(timeline)] if timeline else [sys.executable, "-m", "datatailor"]
            run = [*head, "run", str(root / "r.yaml"), "--out", out, "--no-progress"]
            if args.executor == "local":
                return run
            return [*run, "--executor", "ray", "--address", cluster.address, "--workers", str(args.workers), "--shard-size",
                    str(args.shard_size), "--flush-records", str(args.flush_records), "--flush-seconds", str(args.flush_seconds)]

        def env(staging: str) -> dict[str, str]:
            return {**os.environ, **s3env, "DATATAILOR_STAGING_DIR": str(root / staging),
                    "DATATAILOR_CACHE_DIR": str(root / "cache"), "PYTHONPATH": str(REPO / "src")}

        def requests() -> int:
            return int(server.stats().get("requests", 0))

        def answered() -> int:
            return int(server.stats().get("answered", 0))

        if "upload" in jobs:
            upload_job(root, args.upload_mb, env("staging-upload"))
        if "full" in jobs:
            before = requests()
            with WorkerRss() as rss:
                wall, driver_mb, code, err = run_driver(cmd("s3://bench/full", args.timeline), env("staging-full"), answered=answered)
            if code != 0:
                print(f"full run failed ({code}):\n{err}")
                return 1
            fs.invalidate_cache()
            if args.out_kind == "s3":
                stored = fs.du("bench/full")
                objects = len(fs.find("bench/full"))
                data_rows = len(fs.cat_file("bench/full/data.jsonl").splitlines())
                usage = json.loads(fs.cat_file("bench/full/usage.json"))["run"]["all"]
            else:
                files = [p for p in (root / "full").rglob("*") if p.is_file()]
                stored, objects = sum(p.stat().st_size for p in files), len(files)
                data_rows = len((root / "full" / "data.jsonl").read_bytes().splitlines())
                usage = json.loads((root / "full" / "usage.json").read_text())["run"]["all"]
            staging_mb = sum(p.stat().st_size for p in (root / "staging-full").rglob("*") if p.is_file()) / 1e6
            print(f"full ({args.executor} executor, --out {args.out_kind}): {n} records in {wall:.1f} s ({n / wall:.0f}/s); "
                  f"server requests {requests() - before}; "
                  f"usage.json requests {usage['requests']}; data rows {data_rows}; driver peak RSS {driver_mb:.0f} MB; "
                  f"worker peak RSS {f'{rss.peak_kb / 1024:.0f} MB' if args.executor == 'ray' else 'n/a'}; at the end {stored / 1e6:.1f} MB in {objects} objects; "
                  f"staging folder {staging_mb:.1f} MB", flush=True)
            if args.timeline:
                print(timeline_summary(args.timeline), flush=True)
        if "kill" in jobs:
            before, answered_before = requests(), answered()
            wall1, _, code1, _ = run_driver(cmd("s3://bench/kill"), env("staging-kill"),
                                            kill_when=lambda: answered() - answered_before >= n // 2)
            time.sleep(2)
            at_kill = requests() - before
            wall2, driver_mb, code2, err = run_driver(cmd("s3://bench/kill"), env("staging-kill"))
            if code2 != 0:
                print(f"resumed run failed ({code2}):\n{err}")
                return 1
            fs.invalidate_cache()
            total = requests() - before
            usage = json.loads(fs.cat_file("bench/kill/usage.json"))
            data_rows = len(fs.cat_file("bench/kill/data.jsonl").splitlines())
            print(f"kill: SIGKILL after {wall1:.1f} s with {at_kill} requests at the server; resumed run {wall2:.1f} s "
                  f"(driver peak RSS {driver_mb:.0f} MB); server requests in all {total} for {n} records: "
                  f"{total - n} repeated; resumed usage.json: this run {usage['run']['all']['requests']}, total "
                  f"{usage['total']['all']['requests']} + up to {usage['total']['unaccounted_requests']} unaccounted; "
                  f"data rows {data_rows}", flush=True)
    finally:
        cluster.shutdown()
        server.stop()
        moto.terminate()
        moto.wait()
        print(f"load after: {uptime()}")
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
