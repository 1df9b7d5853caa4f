"""The `openai` backend against the local mock server on 127.0.0.1: retries, backpressure, breaker, runs."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx2
import pytest
import yaml
from pydantic import BaseModel

from datatailor.cli import main as cli_main
from datatailor.errors import LLMCallFailure, ServerUnavailable, UserError
from datatailor.io import read_records
from datatailor.llm.base import CompletionRequest, Message, Sampling
from datatailor.llm.config import OpenAIModel
from datatailor.llm.models import RoleModel, build_backend
from datatailor.llm.openai import AdaptiveLimiter, OpenAIBackend, parse_retry_after
from datatailor.llm.usage import UsageLedger
from datatailor.testing import MockConfig, MockOpenAIServer
from tests.conftest import cli_env
from tests.support import questions, read_jsonl, write_rows


@pytest.fixture
def mock() -> Iterator[MockOpenAIServer]:
    with MockOpenAIServer(MockConfig()) as server:
        yield server


def serve(**config: Any) -> MockOpenAIServer:
    return MockOpenAIServer(MockConfig(**config))


def model_config(url: str, **overrides: Any) -> OpenAIModel:
    fields: dict[str, Any] = {
        "model": "mock-model",
        "base_url": url,
        "api_key_env": None,
        "retry_backoff_s": 0.01,
        "retry_backoff_max_s": 0.05,
        "timeout_s": 5.0,
        **overrides,
    }
    return OpenAIModel(**fields)


def ask(text: str = "hello there", **sampling: Any) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content=text)], sampling=Sampling(**sampling))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one backend


async def test_success_sends_sampling_and_reads_usage(mock: MockOpenAIServer) -> None:
    backend = build_backend(model_config(mock.url, extra_body={"top_k": 5}))
    assert isinstance(backend, OpenAIBackend)
    try:
        completion = await backend.complete(ask("say something nice", temperature=0.3, seed=7, stop=["###"], max_tokens=50))
    finally:
        await backend.aclose()
    assert completion.text == "Mock reply to: say something nice"
    assert completion.prompt_tokens == 3 and completion.completion_tokens == 6
    assert completion.finish_reason == "stop"
    body = mock.bodies[-1]
    assert body["model"] == "mock-model" and body["messages"] == [{"role": "user", "content": "say something nice"}]
    assert (body["temperature"], body["seed"], body["stop"], body["max_tokens"], body["top_k"]) == (0.3, 7, ["###"], 50, 5)
    assert "response_format" not in body
    assert backend.stats.successes == 1 and backend.stats.retries == 0


async def test_usage_is_estimated_when_the_server_reports_none() -> None:
    with serve(include_usage=False) as server:
        backend = OpenAIBackend(model_config(server.url))
        try:
            completion = await backend.complete(ask("x" * 40))
        finally:
            await backend.aclose()
    assert completion.prompt_tokens == 10  # 40 characters at ~4 a token
    assert completion.completion_tokens > 0


async def test_server_errors_are_retried_until_success() -> None:
    with serve(script=["500", "503", "500"], retry_after_s=0) as server:
        backend = OpenAIBackend(model_config(server.url))
        try:
            completion = await backend.complete(ask())
        finally:
            await backend.aclose()
        assert server.stats["500"] == 2 and server.stats["503"] == 1 and server.stats["ok"] == 1
    assert completion.text.startswith("Mock reply to:")
    assert backend.stats.retries == 3 and backend.stats.http_5xx == 2 and backend.stats.http_503 == 1


async def test_429_waits_for_retry_after_and_shrinks_the_limit() -> None:
    with serve(script=["429"], retry_after_s=1) as server:
        backend = OpenAIBackend(model_config(server.url, max_concurrency=8))
        started = time.monotonic()
        try:
            completion = await backend.complete(ask())
        finally:
            await backend.aclose()
    elapsed = time.monotonic() - started
    assert completion.text.startswith("Mock reply to:")
    assert elapsed >= 1.0, f"Retry-After: 1 was not honoured (retried after {elapsed:.3f} s)"
    assert backend.stats.http_429 == 1 and backend.stats.retries == 1
    assert backend.limiter.min_limit_seen <= 4  # halved from 8


def test_retry_after_accepts_seconds_http_dates_and_milliseconds() -> None:
    assert parse_retry_after(httpx2.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx2.Headers({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=5), usegmt=True)
    assert 3.0 < parse_retry_after(httpx2.Headers({"Retry-After": soon})) <= 5.0  # type: ignore[operator]
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=50), usegmt=True)
    assert parse_retry_after(httpx2.Headers({"Retry-After": past})) == 0.0
    assert parse_retry_after(httpx2.Headers({"Retry-After": "soon-ish"})) is None
    assert parse_retry_after(httpx2.Headers({})) is None


async def test_timeouts_are_retried() -> None:
    with serve(script=["timeout"], hang_s=10) as server:
        backend = OpenAIBackend(model_config(server.url, timeout_s=0.3))
        started = time.monotonic()
        try:
            completion = await backend.complete(ask())
        finally:
            await backend.aclose()
    assert completion.text.startswith("Mock reply to:")
    assert backend.stats.timeouts == 1 and backend.stats.retries == 1
    assert 0.3 <= time.monotonic() - started < 5


async def test_exhausted_retries_fail_the_record_with_kind_timeout() -> None:
    with serve(script=["timeout"] * 3, hang_s=10) as server:
        backend = OpenAIBackend(model_config(server.url, timeout_s=0.2, max_retries=2, circuit_breaker_failures=10))
        try:
            with pytest.raises(LLMCallFailure) as info:
                await backend.complete(ask())
        finally:
            await backend.aclose()
    assert info.value.kind == "timeout"
    assert "gave up after 3 attempt(s)" in str(info.value) and server.url in str(info.value)


async def test_truncated_json_body_is_retried() -> None:
    with serve(script=["truncated", "truncated"]) as server:
        backend = OpenAIBackend(model_config(server.url))
        try:
            completion = await backend.complete(ask("complete me"))
        finally:
            await backend.aclose()
    assert completion.text == "Mock reply to: complete me"
    assert backend.stats.invalid_bodies == 2 and backend.stats.retries == 2


async def test_other_4xx_fails_only_the_record_without_retrying() -> None:
    with serve(script=["400"]) as server:
        backend = OpenAIBackend(model_config(server.url))
        try:
            with pytest.raises(LLMCallFailure) as info:
                await backend.complete(ask())
            # the run goes on: the next call works
            assert (await backend.complete(ask())).text.startswith("Mock reply to:")
        finally:
            await backend.aclose()
        assert server.stats["requests"] == 2
    assert info.value.kind == "llm_error"
    assert "HTTP 400" in str(info.value) and "maximum context length exceeded" in str(info.value)


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_key_stops_the_run_and_names_the_variable(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DT_TEST_KEY", "sk-very-secret-value")
    seen: list[str] = []

    def refuse(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["authorization"])
        return httpx2.Response(status, json={"error": {"message": "Incorrect API key provided"}})

    config = model_config("http://127.0.0.1:9/v1", api_key_env="DT_TEST_KEY")
    backend = OpenAIBackend(config, transport=httpx2.MockTransport(refuse))
    try:
        with pytest.raises(ServerUnavailable) as info:
            await backend.complete(ask())
        with pytest.raises(ServerUnavailable):  # once open, later calls fail without a request
            await backend.complete(ask())
    finally:
        await backend.aclose()
    assert seen == ["Bearer sk-very-secret-value"]
    assert "$DT_TEST_KEY" in str(info.value) and f"HTTP {status}" in str(info.value)
    assert "sk-very-secret-value" not in str(info.value)


async def test_not_found_stops_the_run_and_points_at_base_url_and_model() -> None:
    def missing(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(404, json={"error": {"message": "The model `gpt-nope` does not exist"}})

    backend = OpenAIBackend(model_config("http://127.0.0.1:9/v1", model="gpt-nope"), transport=httpx2.MockTransport(missing))
    try:
        with pytest.raises(ServerUnavailable, match="check `base_url`.*'gpt-nope'") as info:
            await backend.complete(ask())
    finally:
        await backend.aclose()
    assert "does not exist" in str(info.value) and backend.stats.attempts == 1


def test_missing_key_variable_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DT_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="DT_TEST_KEY"):
        OpenAIBackend(model_config("http://127.0.0.1:9/v1", api_key_env="DT_TEST_KEY"))


async def test_circuit_breaker_opens_fast_on_a_dead_port() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(model_config(url, max_concurrency=4, circuit_breaker_failures=4, max_retries=6))
    started = time.monotonic()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(backend.complete(ask(f"q{i}")) for i in range(10)), return_exceptions=True), 10
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, ServerUnavailable) for r in results), results
        assert url in str(results[0]) and "circuit breaker" in str(results[0]) and "ConnectError" in str(results[0])
        assert elapsed < 5
        # once open, a call fails at once without touching the network
        attempts = backend.stats.attempts
        quick = time.monotonic()
        with pytest.raises(ServerUnavailable):
            await backend.complete(ask())
        assert time.monotonic() - quick < 0.05 and backend.stats.attempts == attempts
    finally:
        await backend.aclose()


async def test_backpressure_keeps_up_with_a_server_ceiling() -> None:
    with serve(max_inflight=3, latency_s=0.01, retry_after_s=0.05) as server:
        backend = OpenAIBackend(model_config(server.url, max_concurrency=12))
        try:
            results = await asyncio.gather(*(backend.complete(ask(f"question {i}")) for i in range(120)))
        finally:
            await backend.aclose()
        assert server.stats["429_ceiling"] > 0  # the ceiling was hit, so the limiter had to react
        assert server.stats["ok"] == 120
    assert [r.text for r in results] == [f"Mock reply to: question {i}" for i in range(120)]
    assert backend.limiter.min_limit_seen <= 6
    # a 429 is a busy server, not a dead one: the breaker never opened
    assert backend.stats_snapshot()["breaker_open"] is False


async def test_limiter_grows_back_and_shrinks_when_latency_rises() -> None:
    limiter = AdaptiveLimiter(8)
    await limiter.acquire()
    limiter.release()
    limiter.on_overload(None)
    assert limiter.limit == 4.0
    for _ in range(40):
        limiter.on_success(0.1)
    assert 4.0 < limiter.limit <= 8.0
    grown = limiter.limit
    limiter._last_decrease = -1e9  # let the next signal count at once
    for _ in range(10):
        limiter.on_success(1.0)  # ten times slower: the server is queueing
    assert limiter.limit < grown


async def test_limiter_pause_holds_admissions_until_retry_after() -> None:
    limiter = AdaptiveLimiter(4)
    await limiter.acquire()
    limiter.on_overload(0.2)
    limiter.release()
    started = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - started >= 0.19
    limiter.release()


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]


@pytest.mark.parametrize(
    ("json_mode", "field", "expected"),
    [
        ("json_schema", "response_format", lambda s: {"type": "json_schema", "json_schema": {"name": "Person", "schema": s}}),
        ("json_object", "response_format", lambda s: {"type": "json_object", "schema": s}),
        ("guided_json", "guided_json", lambda s: s),
    ],
)
async def test_structured_output_uses_the_native_constraint(mock: MockOpenAIServer, json_mode: str, field: str, expected: Any) -> None:
    config = model_config(mock.url, json_mode=json_mode)
    backend = OpenAIBackend(config)
    assert backend.native_json_schema is True
    role = RoleModel("strong", config, backend, cache=None, ledger=UsageLedger())
    try:
        gen = await role.generate(messages=[Message(role="user", content="Describe a person.")], schema=Person)
    finally:
        await backend.aclose()
    assert isinstance(gen.value, Person) and gen.value.age == 1
    body = mock.bodies[-1]
    assert body[field] == expected(Person.model_json_schema())
    # with a native constraint the schema is not pasted into the prompt
    assert body["messages"][-1]["content"] == "Describe a person."


async def test_json_mode_none_leaves_structure_to_the_prompt(mock: MockOpenAIServer) -> None:
    backend = OpenAIBackend(model_config(mock.url, json_mode="none"))
    try:
        assert backend.native_json_schema is False
        await backend.complete(CompletionRequest(messages=[Message(role="user", content="hi")], json_schema={"type": "object"}))
    finally:
        await backend.aclose()
    assert "response_format" not in mock.bodies[-1] and "guided_json" not in mock.bodies[-1]


# ----------------------------------------------------------------------------- whole runs


def write_recipe(tmp_path: Path, model: dict[str, Any], rows: list[dict[str, Any]], **extra: Any) -> Path:
    write_rows(tmp_path / "input.jsonl", rows)
    recipe = {
        "models": {"strong": {"backend": "openai", "model": "mock-model", **model}},
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong", "concurrency": 8}],
        "cache": False,
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def run_cli(recipe: Path, out: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datatailor", "run", str(recipe), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=timeout, env=env or cli_env(),
    )


def test_run_against_a_dead_server_stops_fast_with_exit_2(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    recipe = write_recipe(tmp_path, {"base_url": url, "api_key_env": None, "max_concurrency": 4}, questions(40))
    started = time.monotonic()
    result = run_cli(recipe, tmp_path / "out", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert url in result.stderr and "circuit breaker" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 30
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "interrupted" and url in manifest["message"]
    assert not (tmp_path / "out/data.jsonl").exists()


def test_missing_key_exits_2_and_a_given_key_never_reaches_the_run_dir(tmp_path: Path) -> None:
    secret = "sk-test-DO-NOT-LEAK-0123456789abcdef"
    with serve() as server:
        recipe = write_recipe(tmp_path, {"base_url": server.url, "api_key_env": "DT_SECRET_KEY"}, questions(3))
        env = cli_env()
        env.pop("DT_SECRET_KEY", None)
        missing = run_cli(recipe, tmp_path / "out", env=env)
        assert missing.returncode == 2
        assert "DT_SECRET_KEY" in missing.stderr and "Traceback" not in missing.stderr

        ok = run_cli(recipe, tmp_path / "out", env=cli_env(DT_SECRET_KEY=secret))
        assert ok.returncode == 0, ok.stderr
    assert len(read_jsonl(tmp_path / "out/data.jsonl")) == 3
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the key leaked into {path}"
    assert secret not in ok.stdout + ok.stderr + missing.stdout + missing.stderr


def test_run_with_20_percent_faults_accounts_for_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = questions(80)
    faults = {"rate_429": 0.05, "rate_500": 0.05, "rate_timeout": 0.05, "rate_truncated": 0.05}
    with serve(latency_s=0.005, retry_after_s=0.1, hang_s=5, seed=3, **faults) as server:
        model = {
            "base_url": server.url, "api_key_env": None, "max_concurrency": 8, "timeout_s": 0.5,
            "max_retries": 2, "retry_backoff_s": 0.02, "retry_backoff_max_s": 0.1, "circuit_breaker_failures": 20,
        }
        recipe = write_recipe(tmp_path, model, rows)
        monkeypatch.chdir(tmp_path)
        code = cli_main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"])
        stats = dict(server.stats)
    assert code == 0
    assert sum(stats[k] for k in ("429", "500", "timeout", "truncated")) > 0.1 * stats["requests"]
    data = read_jsonl(tmp_path / "out/data.jsonl")
    failures = read_jsonl(tmp_path / "out/failures.jsonl")
    input_ids = [r.id for r in read_records(tmp_path / "input.jsonl")]
    data_ids, failed_ids = [r["id"] for r in data], [f["id"] for f in failures]
    assert sorted(data_ids + failed_ids) == sorted(input_ids)  # every row once, none lost
    assert not set(data_ids) & set(failed_ids)
    assert {f["kind"] for f in failures} <= {"llm_error", "timeout"}
    for row in data:
        assert row["response"].startswith("Mock reply to:") and row["instruction"][:20] in row["response"]
    usage = json.loads((tmp_path / "out/usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["requests"] == len(data) and usage["completion_tokens"] > 0
