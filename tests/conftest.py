"""Shared fixtures. Every test gets its own request cache; the shared benchmark data sits beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("DATATAILOR_CACHE_DIR", str(cache_dir))
    return cache_dir


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running the `datatailor` CLI in a subprocess from the tests."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env
