"""`examples/quickstart.yaml` end to end on the embedded model, through the installed console script.

Run once; run the same command again (zero requests, same bytes); run it into a fresh directory
with the same request cache (zero requests, every call a cache hit, same bytes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

RECIPE = REPO / "examples" / "quickstart.yaml"
SEEDS = REPO / "examples" / "data" / "quickstart_seeds.jsonl"


def _datatailor() -> str:
    script = Path(sys.executable).parent / "datatailor"
    if script.exists():
        return str(script)
    found = shutil.which("datatailor")
    assert found, "the datatailor console script is not installed (pip install -e .)"
    return found


def _run(out: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_datatailor(), "run", str(RECIPE), "--out", str(out), "--no-progress"],
        cwd=REPO,
        env=cli_env(DATATAILOR_CACHE_DIR=str(cache_dir)),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _usage(out: Path) -> dict:
    return json.loads((out / "usage.json").read_text())["run"]["all"]


@pytest.mark.integration
def test_quickstart_runs_and_reruns_for_free(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    out = tmp_path / "run"
    seeds = [json.loads(line) for line in SEEDS.read_text().splitlines() if line.strip()]

    first = _run(out, cache_dir)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [s["turns"][0] for s in seeds]
    assert all(r["response"].strip() for r in rows)
    assert (out / "failures.jsonl").read_text().strip() == ""
    usage = _usage(out)
    assert usage["requests"] == len(seeds) and usage["cache_hits"] == 0
    assert usage["completion_tokens"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    data = (out / "data.jsonl").read_bytes()

    again = _run(out, cache_dir)
    assert again.returncode == 0, again.stderr
    assert _usage(out)["requests"] == 0
    assert (out / "data.jsonl").read_bytes() == data

    fresh = tmp_path / "fresh"
    third = _run(fresh, cache_dir)
    assert third.returncode == 0, third.stderr
    usage = _usage(fresh)
    assert usage["requests"] == 0 and usage["cache_hits"] == len(seeds)
    assert (fresh / "data.jsonl").read_bytes() == data
