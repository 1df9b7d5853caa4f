"""The pieces a many-process run relies on: replicas of one model, a request cache with one file per writer,
usage from several ledgers, and a budget that counts what other workers spent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datatailor.errors import BudgetExhausted
from datatailor.llm.base import Completion
from datatailor.llm.cache import RequestCache
from datatailor.llm.config import OpenAIModel
from datatailor.llm.fingerprint import model_identity
from datatailor.llm.openai import OpenAIBackend
from datatailor.llm.usage import Budget, UsageLedger
from datatailor.testing import MockConfig, MockOpenAIServer
from tests.conftest import cli_env
from tests.support import echo_model, questions, write_rows
from tests.test_openai_backend import ask, model_config


async def test_requests_go_round_robin_over_replicas() -> None:
    with MockOpenAIServer(MockConfig()) as a, MockOpenAIServer(MockConfig()) as b, MockOpenAIServer(MockConfig()) as c:
        backend = OpenAIBackend(model_config([a.url, b.url, c.url]))
        try:
            for i in range(30):
                await backend.complete(ask(f"question {i}"))
        finally:
            await backend.aclose()
        assert [len(s.bodies) for s in (a, b, c)] == [10, 10, 10]


async def test_a_dead_replica_costs_retries_not_records() -> None:
    with MockOpenAIServer(MockConfig()) as alive:
        backend = OpenAIBackend(model_config([alive.url, "http://127.0.0.1:9/v1"], max_retries=3, circuit_breaker_failures=50))
        try:
            replies = [await backend.complete(ask(f"q {i}")) for i in range(6)]
        finally:
            await backend.aclose()
    assert all(r.text.startswith("Mock reply") for r in replies) and len(alive.bodies) == 6


def test_replicas_are_one_model_for_the_cache_and_an_empty_list_is_refused() -> None:
    one = model_identity(OpenAIModel(model="m", base_url=["http://b/v1", "http://a/v1"], api_key_env=None))
    same = model_identity(OpenAIModel(model="m", base_url=["http://a/v1", "http://b/v1"], api_key_env=None))
    other = model_identity(OpenAIModel(model="m", base_url=["http://a/v1"], api_key_env=None))
    assert one == same and one != other
    assert model_identity(OpenAIModel(model="m", base_url="http://a/v1", api_key_env=None))["base_url"] == "http://a/v1"
    with pytest.raises(ValueError, match="at least one URL"):
        OpenAIModel(model="m", base_url=[], api_key_env=None)


def test_per_writer_cache_files_are_read_by_every_writer(tmp_path) -> None:
    main = tmp_path / "requests.sqlite"
    first, second = RequestCache(main, writer="host1-11"), RequestCache(main, writer="host2-22")
    try:
        first.put("k1", Completion(text="from one"))
        second.put("k2", Completion(text="from two"))
        assert second.get("k1").text == "from one" and first.get("k2").text == "from two"
        assert first.get("k3") is None
        assert sorted(p.name for p in tmp_path.glob("*.sqlite")) == ["requests.host1-11.sqlite", "requests.host2-22.sqlite"]
        assert len(first) == 1 and len(second) == 1  # each writes only its own file
    finally:
        first.close()
        second.close()
    later = RequestCache(main)  # the main file alone does not see them: per-writer files are for per-writer readers
    try:
        assert later.get("k1") is None
    finally:
        later.close()


def test_usage_of_workers_adds_up_and_the_budget_counts_what_others_spent() -> None:
    driver = UsageLedger(budget=Budget(max_tokens=100))
    worker = UsageLedger(budget=Budget(max_tokens=100))
    worker.record_request("strong", 20, 10, 0.01, stage="respond")
    worker.record_cache_hit("strong", stage="respond")
    driver.absorb(worker.as_json()["run"])
    driver.absorb(worker.as_json()["run"])
    run = driver.as_json()["run"]
    assert run["roles"]["strong"]["requests"] == 2 and run["roles"]["strong"]["prompt_tokens"] == 40
    assert run["stages"]["respond"]["cache_hits"] == 2
    assert worker.run_spent() == (0.01, 30)
    worker.check_budget()  # 30 of 100 tokens
    worker.elsewhere = (0.0, 70)  # the other workers spent 70
    with pytest.raises(BudgetExhausted, match="100 of 100 tokens"):
        worker.check_budget()


def test_the_local_path_never_imports_ray(tmp_path: Path) -> None:
    write_rows(tmp_path / "input.jsonl", questions(3))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models": {"strong": echo_model()}, "input": "input.jsonl",
                                                      "stages": [{"type": "respond", "role": "strong"}, {"type": "dedup"}]}))
    code = ("import sys; from datatailor.cli import main; "
            f"rc = main(['run', {str(tmp_path / 'r.yaml')!r}, '--out', {str(tmp_path / 'out')!r}, '--no-progress']); "
            "print('RAY' if 'ray' in sys.modules else 'NO-RAY', rc)")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "c")), capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["NO-RAY", "0"], out.stdout + out.stderr
