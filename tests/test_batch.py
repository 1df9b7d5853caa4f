"""The batch engine on the mock server: collecting into files within the limits, retries of per-request errors and of
expired or failed batches (each request counted once), the online fallback, a request that cannot succeed, coalescing,
the resume cases of the journal, the wait bound, the budget's worst case, progress, `--batch` and `datatailor batches`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datatailor.errors import BudgetExhausted, LLMCallFailure
from datatailor.llm.base import CALL_OWNER, CompletionRequest, Message, Sampling
from datatailor.llm.batch import BatchJournal, custom_id, worst_case
from datatailor.llm.batch import driver as driver_module
from datatailor.llm.batch.client import BatchClient
from datatailor.llm.config import OpenAIModel, force_batch
from datatailor.llm.models import ModelPool
from datatailor.llm.openai import encode_body
from datatailor.llm.usage import Budget, UsageLedger
from datatailor.recipe import parse_recipe
from datatailor.testing import MockConfig, MockOpenAIServer

FAST = {"batch_collect_s": 0.05, "batch_poll_s": 0.02, "batch_poll_max_s": 0.05}


def config(url: str, **extra: Any) -> OpenAIModel:
    return OpenAIModel.model_validate({"model": "mock-model", "base_url": url, "api_key_env": None, "json_mode": "none",
                                       "max_retries": 1, "batch": True, "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0,
                                       **FAST, **extra})


def serve(**settings: Any) -> MockOpenAIServer:
    return MockOpenAIServer(MockConfig(**settings))


@pytest.fixture
def mock() -> Iterator[MockOpenAIServer]:
    with serve() as server:
        yield server


def ask(n: int, prefix: str = "question") -> list[list[Message]]:
    return [[Message(role="user", content=f"{prefix} {i}")] for i in range(n)]


async def generate_all(pool: ModelPool, prompts: list[list[Message]], role: str = "t") -> list[Any]:
    model = pool.role(role)
    try:
        return await asyncio.gather(*(model.generate(messages=m) for m in prompts), return_exceptions=True)
    finally:
        await pool.aclose()


def run_pool(tmp_path: Path, cfg: OpenAIModel, prompts: list[list[Message]], ledger: UsageLedger | None = None) -> tuple[list[Any], UsageLedger]:
    ledger = ledger or UsageLedger()
    pool = ModelPool({"t": cfg}, ledger, None, None, run_dir=tmp_path)
    return asyncio.run(generate_all(pool, prompts)), ledger


def journal_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "batches" / "journal.jsonl").read_text().splitlines()]


def planned(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in journal_rows(tmp_path) if r["event"] == "planned"]


# ----------------------------------------------------------------------------- collecting


def test_requests_are_collected_into_files_within_the_request_and_byte_limits(tmp_path: Path, mock: MockOpenAIServer) -> None:
    gens, ledger = run_pool(tmp_path, config(mock.url, batch_max_requests=3), ask(7))
    assert [g.text for g in gens] == [f"Mock reply to: question {i}" for i in range(7)]
    assert [len(p["requests"]) for p in planned(tmp_path)] == [3, 3, 1]
    assert mock.stats["batches_created"] == 3 and ledger.run["t"].requests == 7

    line = len((tmp_path / "batches" / f"{planned(tmp_path)[0]['tag']}.input.jsonl").read_text().splitlines()[0]) + 1
    sub = tmp_path / "bytes"
    run_pool(sub, config(mock.url, batch_max_bytes=max(1024, 2 * line + 10)), ask(5, "q" * 300))
    assert all(p["bytes"] <= max(1024, 2 * line + 10) for p in planned(sub)) and sum(len(p["requests"]) for p in planned(sub)) == 5


def test_input_lines_are_chat_requests_named_by_the_hash_of_their_body(tmp_path: Path, mock: MockOpenAIServer) -> None:
    run_pool(tmp_path, config(mock.url), ask(2))
    tag = planned(tmp_path)[0]["tag"]
    lines = [json.loads(line) for line in (tmp_path / "batches" / f"{tag}.input.jsonl").read_text().splitlines()]
    assert {(x["method"], x["url"]) for x in lines} == {("POST", "/v1/chat/completions")}
    assert [x["custom_id"] for x in lines] == [custom_id(x["body"]) for x in lines]
    assert lines[0]["body"]["messages"] == [{"role": "user", "content": "question 0"}] and lines[0]["body"]["model"] == "mock-model"
    assert mock.batch_api.batches["batch_mock_1"]["metadata"] == {"datatailor_batch": tag}


def test_a_batched_role_is_not_held_to_max_concurrency_and_identical_requests_are_sent_once(tmp_path: Path, mock: MockOpenAIServer) -> None:
    gens, ledger = run_pool(tmp_path, config(mock.url, max_concurrency=1), ask(10) + ask(10))
    assert mock.stats["batches_created"] == 1 and mock.stats["batch_lines"] == 10
    assert [g.text for g in gens[:10]] == [g.text for g in gens[10:]]
    assert ledger.run["t"].requests == 20  # each caller got the reply (and RoleModel counts each call it made)


def test_each_request_names_its_stage_and_record_in_the_journal(tmp_path: Path, mock: MockOpenAIServer) -> None:
    async def main() -> None:
        pool = ModelPool({"t": config(mock.url)}, UsageLedger(), None, None, run_dir=tmp_path)
        model = pool.role("t")

        async def one(i: int) -> None:
            CALL_OWNER.set(f"respond:rec{i}")
            await model.generate(messages=[Message(role="user", content=f"q{i}")])

        await asyncio.gather(*(one(i) for i in range(3)))
        await pool.aclose()

    asyncio.run(main())
    assert sorted(o for _, o in planned(tmp_path)[0]["requests"]) == ["respond:rec0", "respond:rec1", "respond:rec2"]


# ----------------------------------------------------------------------------- retries, each counted once


def billed(mock: MockOpenAIServer) -> int:
    return mock.stats["batch_prompt_tokens"] + mock.stats["batch_completion_tokens"]


def test_per_request_errors_are_retried_in_a_new_batch_and_counted_once(tmp_path: Path) -> None:
    with serve(batch_error_rate=0.3, seed=3) as mock:
        gens, ledger = run_pool(tmp_path, config(mock.url, batch_max_attempts=8), ask(20))
    assert all(not isinstance(g, BaseException) for g in gens)
    assert mock.stats["batch_errors"] > 0 and mock.stats["batches_created"] >= 2
    assert mock.stats["batch_answered"] == 20 and mock.stats["batch_answered_again"] == 0
    usage = ledger.run["t"]
    assert usage.requests == 20 and usage.failed_requests == 0
    assert usage.tokens == billed(mock)  # what the server billed, counted once
    # the retry batch holds exactly the requests that failed
    assert len(planned(tmp_path)[1]["requests"]) == mock.batch_api.batches["batch_mock_1"]["request_counts"]["failed"]


def test_an_expired_batch_keeps_its_answers_and_retries_the_rest(tmp_path: Path) -> None:
    with serve(batch_expire=1) as mock:
        gens, ledger = run_pool(tmp_path, config(mock.url), ask(10))
    assert [g.text for g in gens] == [f"Mock reply to: question {i}" for i in range(10)]
    assert mock.stats["batches_expired"] == 1 and mock.stats["batches_created"] == 2
    assert [len(p["requests"]) for p in planned(tmp_path)] == [10, 5]
    assert mock.stats["batch_answered"] == 10 and mock.stats["batch_answered_again"] == 0
    assert ledger.run["t"].requests == 10 and ledger.run["t"].tokens == billed(mock)
    assert {g.batch_id for g in gens} == {"batch_mock_1", "batch_mock_2"}


def test_a_failed_batch_is_retried_whole(tmp_path: Path) -> None:
    with serve(batch_fail=1) as mock:
        gens, _ = run_pool(tmp_path, config(mock.url), ask(4))
    assert {g.batch_id for g in gens} == {"batch_mock_2"}
    finished = [r for r in journal_rows(tmp_path) if r["event"] == "finished"]
    assert finished[0]["status"] == "failed" and "injected validation failure" in finished[0]["error"]


def test_a_request_that_never_succeeds_fails_its_record_after_max_attempts(tmp_path: Path) -> None:
    with serve(batch_error_rate=1.0) as mock:
        gens, ledger = run_pool(tmp_path, config(mock.url, batch_max_attempts=2), ask(3))
    assert all(isinstance(g, LLMCallFailure) for g in gens)
    assert "no answer after 2 batch(es)" in str(gens[0]) and "error 500" in str(gens[0])
    assert mock.stats["batches_created"] == 2 and ledger.run["t"].requests == 0 and ledger.run["t"].failed_requests == 3


def test_a_client_error_is_not_retried(tmp_path: Path) -> None:
    with serve(batch_error_rate=1.0, batch_error_status=400) as mock:
        gens, _ = run_pool(tmp_path, config(mock.url), ask(2))
    assert all(isinstance(g, LLMCallFailure) and "HTTP 400" in str(g) for g in gens)
    assert mock.stats["batches_created"] == 1


def test_online_fallback_sends_the_unanswered_requests_online_at_the_online_price(tmp_path: Path) -> None:
    with serve(batch_expire=1) as mock:
        gens, ledger = run_pool(tmp_path, config(mock.url, batch_fallback="online"), ask(10))
        chat = mock.stats["requests"]
    assert [g.batch_id for g in gens] == ["batch_mock_1"] * 5 + [None] * 5
    assert mock.stats["batches_created"] == 1 and chat == 5
    # prompt 2 words, reply 5 words: $1 and $2 per M online, half in the batch
    assert [g.cost_usd for g in gens] == [pytest.approx(6e-6)] * 5 + [pytest.approx(12e-6)] * 5


# ----------------------------------------------------------------------------- resume


def leave_a_pending_batch(tmp_path: Path, server: MockOpenAIServer, prompts: list[list[Message]]) -> None:
    """A run that stops (its calls cancelled, as by Ctrl-C or a crash) while its first batch is pending."""
    async def main() -> None:
        pool = ModelPool({"t": config(server.url)}, UsageLedger(), None, None, run_dir=tmp_path)
        model = pool.role("t")
        tasks = [asyncio.ensure_future(model.generate(messages=m)) for m in prompts]
        while server.stats["batches_created"] == 0:
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.aclose()

    asyncio.run(main())


def test_a_resumed_run_waits_for_its_pending_batch_instead_of_submitting_again(tmp_path: Path) -> None:
    with serve(batch_delay_s=0.5) as mock:
        leave_a_pending_batch(tmp_path, mock, ask(6))
        gens, ledger = run_pool(tmp_path, config(mock.url), ask(6) + ask(2, "new"))
    assert [g.text for g in gens[:6]] == [f"Mock reply to: question {i}" for i in range(6)]
    assert {g.batch_id for g in gens[:6]} == {"batch_mock_1"} and {g.batch_id for g in gens[6:]} == {"batch_mock_2"}
    assert mock.stats["batch_lines"] == 8 and mock.stats["batch_answered_again"] == 0


def test_answers_of_a_finished_batch_are_read_back_from_its_stored_files(tmp_path: Path, mock: MockOpenAIServer) -> None:
    first, _ = run_pool(tmp_path, config(mock.url), ask(4))
    again, ledger = run_pool(tmp_path, config(mock.url), ask(4))  # no request cache: the journal answers
    assert [g.text for g in again] == [g.text for g in first] and mock.stats["batches_created"] == 1
    assert ledger.run["t"].requests == 4


def _plan_uploaded(tmp_path: Path, mock: MockOpenAIServer, create_on_server: bool) -> str:
    """A journal whose batch was uploaded, and (maybe) created on the server, but whose creation was never written:
    the process was killed between the HTTP call and the journal row."""
    cfg = config(mock.url)
    journal = BatchJournal(tmp_path / "batches")
    lines, cids = [], []
    for m in ask(3):
        body = encode_body(cfg, CompletionRequest(messages=m, sampling=cfg.sampling()))
        cids.append(custom_id(body))
        lines.append(json.dumps({"custom_id": cids[-1], "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    batch = journal.plan(lines, cids, [None] * 3, 0.0, 0, model="mock-model", base_url=mock.url, api_key_env=None)

    async def upload_and_create() -> None:
        client = BatchClient(cfg)
        file_id = await client.upload(journal.input_path(batch.tag))
        journal.append({"event": "uploaded", "tag": batch.tag, "file_id": file_id})
        if create_on_server:
            await client.create(file_id, "24h", "datatailor_batch", batch.tag)
        await client.aclose()

    asyncio.run(upload_and_create())
    return batch.tag


def test_a_batch_created_but_not_recorded_is_found_by_its_tag_and_not_paid_twice(tmp_path: Path, mock: MockOpenAIServer) -> None:
    tag = _plan_uploaded(tmp_path, mock, create_on_server=True)
    gens, _ = asyncio.run(_ask_with_seed_zero(tmp_path, mock))
    assert mock.stats["batches_created"] == 1 and mock.stats["batch_answered"] == 3
    assert {g.batch_id for g in gens} == {"batch_mock_1"}
    assert any(r["event"] == "created" and r["tag"] == tag for r in journal_rows(tmp_path))


def test_a_batch_never_created_is_dropped_and_its_requests_batched_again(tmp_path: Path, mock: MockOpenAIServer) -> None:
    tag = _plan_uploaded(tmp_path, mock, create_on_server=False)
    gens, _ = asyncio.run(_ask_with_seed_zero(tmp_path, mock))
    assert [g.text for g in gens] == [f"Mock reply to: question {i}" for i in range(3)]
    assert mock.stats["batches_created"] == 1
    rows = journal_rows(tmp_path)
    assert any(r["event"] == "dropped" and r["tag"] == tag for r in rows)
    assert len([r for r in rows if r["event"] == "planned"]) == 2


async def _ask_with_seed_zero(tmp_path: Path, mock: MockOpenAIServer) -> tuple[list[Any], UsageLedger]:
    """The three requests `_plan_uploaded` wrote, asked as a stage would (seed 0: no run seed mixed in)."""
    ledger = UsageLedger()
    pool = ModelPool({"t": config(mock.url)}, ledger, None, None, run_dir=tmp_path)
    model = pool.role("t")
    model.sampling = lambda seed_key=None, **o: model.config.sampling()  # type: ignore[method-assign]
    try:
        return list(await asyncio.gather(*(model.generate(messages=m) for m in ask(3)))), ledger
    finally:
        await pool.aclose()


def test_a_batch_that_outlives_its_window_is_cancelled_and_its_requests_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time

    class Clock:  # a day and a half passes between two polls of the first batch
        @staticmethod
        def time() -> float:
            return real() + (36 * 3600 if mock.stats["batches_created"] == 1 else 0)

    with serve(batch_delay_s=30.0) as mock:
        monkeypatch.setattr(driver_module, "time", Clock)
        mock.config.batch_delay_s = 30.0
        gens: Any = None

        async def main() -> list[Any]:
            pool = ModelPool({"t": config(mock.url, batch_wait_margin_s=60)}, UsageLedger(), None, None, run_dir=tmp_path)
            model = pool.role("t")
            first = asyncio.ensure_future(asyncio.gather(*(model.generate(messages=m) for m in ask(2))))
            while mock.stats["batches_cancelled"] == 0:
                await asyncio.sleep(0.01)
            mock.config.batch_delay_s = 0.0  # the retry batch is quick
            out = await asyncio.wait_for(first, 10)
            await pool.aclose()
            return list(out)

        gens = asyncio.run(main())
    assert {g.batch_id for g in gens} == {"batch_mock_2"}
    notes = [r.get("note", "") for r in journal_rows(tmp_path) if r["event"] == "status"]
    assert any("cancelled, its unanswered requests are retried" in n for n in notes)


# ----------------------------------------------------------------------------- budget


def test_worst_case_prices_max_tokens_at_the_batch_price(mock: MockOpenAIServer) -> None:
    cfg = config(mock.url, max_tokens=1000)
    request = CompletionRequest(messages=[Message(role="user", content="x" * 300)], sampling=Sampling(max_tokens=1000))
    usd, tokens = worst_case(cfg, request)
    assert tokens == 100 + 4 + 1000
    assert usd == pytest.approx((104 * 0.5 + 1000 * 1.0) / 1e6)


def test_the_budget_stops_submitting_when_the_next_batch_could_exceed_it(tmp_path: Path) -> None:
    # The batches stay pending a while, so all three are planned against the budget's worst case before any spend
    # comes back (with no delay a finished batch's true, smaller spend could let the last requests fit).
    with serve(batch_delay_s=0.5) as mock:
        cfg = config(mock.url, max_tokens=100, batch_max_requests=4)
        one = worst_case(cfg, CompletionRequest(messages=ask(1)[0], sampling=cfg.sampling()))[0]
        ledger = UsageLedger(budget=Budget(max_usd=one * 6.5))  # room for 6 requests' worst case
        gens, _ = run_pool(tmp_path, cfg, ask(10), ledger)
        answered = [g for g in gens if not isinstance(g, BaseException)]
        refused = [g for g in gens if isinstance(g, BudgetExhausted)]
        assert len(answered) + len(refused) == 10 and len(refused) >= 1
        assert "stopped submitting batches" in str(refused[0]) and "Raise the budget" in str(refused[0])
        # what was submitted fits the budget in the worst case; the spend is far below it
        assert sum(p["worst_usd"] for p in planned(tmp_path)) <= one * 6.5
        assert mock.stats["batch_lines"] == len(answered)


# ----------------------------------------------------------------------------- settings, --batch and the recipe hash


def test_batch_settings_change_neither_the_dump_of_other_recipes_nor_the_recipe_hash(tmp_path: Path) -> None:
    online = OpenAIModel(model="m")
    assert not any(k.startswith("batch") for k in online.model_dump())
    models = {"teacher": {"backend": "openai", "model": "m", "api_key_env": None}}
    stages = [{"type": "respond", "role": "teacher"}]
    a = parse_recipe({"models": models, "stages": stages}, "a", tmp_path)
    b = parse_recipe({"models": {"teacher": {**models["teacher"], "batch": True, "batch_discount": 0.4}}, "stages": stages}, "b", tmp_path)
    assert a.content_hash() == b.content_hash()
    assert b.to_json()["models"]["teacher"]["batch"] is True  # recipe.json says how it was run
    c = parse_recipe({"models": {"teacher": {**models["teacher"], "max_tokens": 9}}, "stages": stages}, "c", tmp_path)
    assert c.content_hash() != a.content_hash()


def test_batch_prices_default_to_the_discount_or_are_given() -> None:
    cfg = OpenAIModel(model="m", price_per_mtok_in=0.15, price_per_mtok_out=0.60)
    assert cfg.batch_prices() == pytest.approx((0.075, 0.30))
    assert OpenAIModel(model="m", price_per_mtok_in=1, batch_price_per_mtok_in=0.3).batch_prices()[0] == 0.3
    with pytest.raises(ValueError, match="one base_url"):
        OpenAIModel(model="m", base_url=["http://a/v1", "http://b/v1"], batch=True)


def test_force_batch_switches_the_roles_that_can_and_says_why_others_cannot() -> None:
    recipe = parse_recipe({"models": {
        "teacher": {"backend": "openai", "model": "m", "api_key_env": None},
        "replicas": {"backend": "openai", "model": "m", "base_url": ["http://a/v1", "http://b/v1"], "api_key_env": None},
        "target": {"backend": "scripted", "model": "t", "rules": [{"reply": "x"}]},
    }, "stages": [{"type": "respond", "role": "teacher"}]}, "r", Path("."))
    models, switched, online = force_batch(dict(recipe.models))
    assert switched == ["teacher"] and models["teacher"].batch and not getattr(models["target"], "batch", False)
    assert "no batch API" in online["target"] and "replicas" in online["replicas"]


def test_a_batched_role_needs_a_run_directory() -> None:
    pool = ModelPool({"t": OpenAIModel(model="m", api_key_env=None, batch=True)}, UsageLedger())
    with pytest.raises(Exception, match="needs a run directory"):
        pool.role("t")
