"""A 200,000-record run in `datatailor view`: the first records page comes quickly and the server's memory stays
bounded while the whole run is indexed. The bounds here are generous (a loaded CI machine); the figures on an
idle machine — first page within 2 s, under 300 MB — are measured by benchmarks/bench_viewer.py and reported in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

pytest.importorskip("starlette")

RECORDS = 200_000
FIRST_PAGE_BOUND_S = 15.0  # the goal is 2 s on an idle machine; a loaded 2-core CI runner is given room
PEAK_RSS_BOUND_MB = 600.0  # the goal is 300 MB


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_viewer", REPO / "benchmarks" / "bench_viewer.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc (Linux)")
def test_a_200k_record_run_shows_its_first_page_quickly_in_bounded_memory(tmp_path: Path) -> None:
    run = _bench().make_synthetic(tmp_path / "made", RECORDS, words=(3, 8), stage_records=False)  # type: ignore[attr-defined]
    kept = sum(1 for _ in (run / "data.jsonl").open("rb"))
    failed = sum(1 for _ in (run / "failures.jsonl").open("rb"))
    assert kept + failed == RECORDS
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "view", str(run), "--port", "0", "--index-dir", str(tmp_path / "idx")],
                            env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "cache")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line
        with urllib.request.urlopen(url.group(0), timeout=30) as reply:  # one run: the start page redirects to it
            base = reply.url.rstrip("/") + "/"
        assert base.endswith("/run/made-run/")
        while True:  # the first page: served while the index is still being built
            status, body = _get(base + "records")
            if status == 200 and body.count('<tr class="status-final"') == 50:
                break
            assert time.perf_counter() - started < FIRST_PAGE_BOUND_S, f"no first page within {FIRST_PAGE_BOUND_S} s"
            time.sleep(0.05)
        first_page_s = time.perf_counter() - started
        deadline = time.time() + 240
        while json.loads(_get(base.replace("/run/", "/api/run/") + "status")[1])["index"]["phase"] != "ready":
            assert time.time() < deadline, "the index was not built within 240 s"
            time.sleep(0.2)
        status, body = _get(base + "records?page=3000&q=river")
        assert status == 200
        assert f"{kept:,} rows" in _get(base + "records")[1]
        peak = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n200K records: first page after {first_page_s:.2f} s (server start included), peak RSS {peak:.0f} MB")
    assert peak < PEAK_RSS_BOUND_MB, f"the server's peak RSS was {peak:.0f} MB"
