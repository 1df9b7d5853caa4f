"""The model facade: concurrency limit, record/replay, structured output, progress output."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from pydantic import BaseModel

from datatailor.errors import BudgetExhausted, ParseFailure
from datatailor.llm.base import Completion, CompletionRequest, Message
from datatailor.llm.cache import RequestCache
from datatailor.llm.config import ScriptedModel
from datatailor.llm.models import ModelPool, RoleModel
from datatailor.llm.usage import Budget, UsageLedger
from datatailor.progress import RunProgress
from tests.support import echo_model, make_recipe, read_jsonl, run


class _CountingBackend:
    native_json_schema = False

    def __init__(self, reply: str = "ok", delay: float = 0.02):
        self.reply, self.delay = reply, delay
        self.in_flight = self.peak = self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        return Completion(text=self.reply, prompt_tokens=10, completion_tokens=2)

    async def aclose(self) -> None:
        return None


def _role(backend: _CountingBackend, **config: object) -> RoleModel:
    cfg = ScriptedModel(model="counting", **config)  # type: ignore[arg-type]
    return RoleModel("strong", cfg, backend, None, UsageLedger())  # type: ignore[arg-type]


def test_max_concurrency_is_respected() -> None:
    backend = _CountingBackend()
    role = _role(backend, max_concurrency=3)

    async def go() -> None:
        await asyncio.gather(*(role.generate(messages=[Message(role="user", content=f"q{i}")]) for i in range(20)))

    asyncio.run(go())
    assert backend.calls == 20 and backend.peak == 3


def test_schema_reply_is_parsed_and_schema_is_in_the_prompt() -> None:
    class Verdict(BaseModel):
        label: str
        confidence: float

    seen: list[CompletionRequest] = []

    class Backend(_CountingBackend):
        async def complete(self, request: CompletionRequest) -> Completion:
            seen.append(request)
            return Completion(text='Here you go: {"label": "yes", "confidence": 0.9}')

    role = _role(Backend())
    gen = asyncio.run(role.generate(messages=[Message(role="user", content="Is it?")], schema=Verdict))
    assert gen.value == Verdict(label="yes", confidence=0.9)
    assert seen[0].json_schema == Verdict.model_json_schema()
    assert '"confidence"' in seen[0].messages[-1].content  # no native constraint: the schema is described


def test_parse_failure_is_typed() -> None:
    role = _role(_CountingBackend(reply="not a list"), max_parse_retries=1)

    def numbers(text: str) -> list[int]:
        raise ValueError("expected numbers")

    with pytest.raises(ParseFailure, match="after 2 attempt"):
        asyncio.run(role.generate(messages=[Message(role="user", content="x")], parse=numbers))


def test_budget_checked_before_each_uncached_call(tmp_path: Path) -> None:
    backend = _CountingBackend()
    cfg = ScriptedModel(model="counting", price_per_mtok_in=1e5)
    cache = RequestCache(tmp_path / "c.sqlite")
    ledger = UsageLedger(budget=Budget(max_usd=1.5))
    role = RoleModel("strong", cfg, backend, cache, ledger)  # type: ignore[arg-type]
    msg = [Message(role="user", content="same")]
    asyncio.run(role.generate(messages=msg))  # costs $1.0
    asyncio.run(role.generate(messages=[Message(role="user", content="other")]))  # $2.0 > budget now
    with pytest.raises(BudgetExhausted):
        asyncio.run(role.generate(messages=[Message(role="user", content="third")]))
    # a cached call is free and still allowed
    asyncio.run(role.generate(messages=msg))
    assert backend.calls == 2 and ledger.run["strong"].cache_hits == 1


def test_record_then_replay_offline(tmp_path: Path) -> None:
    recording = tmp_path / "recording.jsonl"
    live = make_recipe(tmp_path, [{"type": "respond", "role": "strong"}], {"strong": echo_model(record_to=str(recording))})
    run(live, tmp_path / "live", cache=None)
    assert len(read_jsonl(recording)) == 5
    assert all("sk-" not in line for line in recording.read_text().splitlines())
    # replay: a scripted model with no rules at all answers from the recording
    replay = make_recipe(tmp_path, [{"type": "respond", "role": "strong"}],
                         {"strong": {"backend": "scripted", "model": "echo", "replay": str(recording)}}, cache=False)
    result = run(replay, tmp_path / "replayed")
    assert result.records == 5
    assert [r["response"] for r in read_jsonl(tmp_path / "replayed/data.jsonl")] == \
        [r["response"] for r in read_jsonl(tmp_path / "live/data.jsonl")]


def test_roles_with_the_same_backend_share_it() -> None:
    pool = ModelPool({"strong": ScriptedModel(model="m", temperature=0.7), "judge": ScriptedModel(model="m", temperature=0.0)},
                     UsageLedger())
    assert pool.role("strong").backend is pool.role("judge").backend
    assert pool.role("strong").sampling().temperature == 0.7 and pool.role("judge").sampling().temperature == 0.0


def test_plain_progress_log_when_not_a_tty(tmp_path: Path) -> None:
    stream = io.StringIO()
    progress = RunProgress(enabled=True, stream=stream, log_every_s=0)
    ledger = UsageLedger()
    progress.attach(ledger, ["respond"])
    with progress:
        progress.stage_started("respond", total=2)
        ledger.record_request("strong", 10, 5, 0.25)
        progress.advance("respond")
        progress.advance("respond", failed=True)
        progress.stage_finished("respond")
    text = stream.getvalue()
    assert "respond 2/2 (1 failed)" in text and "requests 1" in text and "$0.2500" in text and "tokens 15" in text


def test_seeds_differ_per_call_but_are_stable() -> None:
    role = _role(_CountingBackend())
    a, b = role.sampling(seed_key=("stage", "rec1")), role.sampling(seed_key=("stage", "rec2"))
    assert a.seed != b.seed and a.seed == role.sampling(seed_key=("stage", "rec1")).seed


def test_relative_model_paths_resolve_against_the_recipe_folder(tmp_path: Path) -> None:
    from datatailor.llm.config import HFModel
    from datatailor.llm.models import _resolve_paths

    (tmp_path / "tuned").mkdir()
    config = HFModel(model="local:gemma-3-270m", adapter="tuned")
    resolved = _resolve_paths(config, tmp_path)
    assert resolved.adapter == str(tmp_path / "tuned") and resolved.model == "local:gemma-3-270m"
    assert _resolve_paths(HFModel(model="local:gemma-3-270m", adapter="elsewhere"), tmp_path).adapter == "elsewhere"


def test_llamacpp_chat_format_is_part_of_the_cache_identity() -> None:
    from datatailor.llm.config import LlamaCppModel

    assert LlamaCppModel(model="local:gemma-3-270m").identity()["chat_format"] == "gemma"
    assert LlamaCppModel(model="local:qwen2.5-coder-0.5b-instruct").identity()["chat_format"] is None
    a = LlamaCppModel(model="x.gguf", chat_format="chatml").identity()
    assert a != LlamaCppModel(model="x.gguf", chat_format="gemma").identity()
