"""The model facade: what stages call. One `RoleModel` per recipe role.

It hides, from the code that generates: the request cache, usage and budget accounting, the
per-model concurrency limit, structured output (native constraint, else parse → repair → re-ask),
and recording of real exchanges for offline replay. Transport retries and backpressure live in
the backends.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel

from datatailor.errors import LLMCallFailure, ParseFailure, UserError
from datatailor.llm.base import Backend, Completion, CompletionRequest, Message, PositionLogprobs, Sampling
from datatailor.llm.cache import RequestCache, cache_key, request_key
from datatailor.llm.config import ModelConfig
from datatailor.llm.structured import parse_model, schema_instructions
from datatailor.llm.usage import UsageLedger
from datatailor.prompts import Prompt, load_prompt
from datatailor.records import LineageEvent, derive_seed

T = TypeVar("T")


@dataclass
class Generation(Generic[T]):
    """A finished call: the final reply text, its parsed value, and what the whole exchange cost."""

    text: str
    value: T
    role: str
    model: str
    template_hash: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    cached: bool = False
    # Of the reply that was kept: "length" means max_tokens cut it (see `truncated`).
    finish_reason: str | None = None
    logprobs: list[PositionLogprobs] | None = None
    # The provider batch that answered the kept reply (llm/batch); named in the lineage event.
    batch_id: str | None = None

    @property
    def truncated(self) -> bool:
        """True when the kept reply was cut off by max_tokens (it may end mid-sentence)."""
        return self.finish_reason == "length"

    def event(self, stage: str, decision: str | None = None, reason: str | None = None, **details: Any) -> LineageEvent:
        if self.truncated:
            details = {**details, "truncated": True}
        if self.batch_id is not None:
            details = {**details, "batch_id": self.batch_id}
        return LineageEvent(
            stage=stage,
            role=self.role,
            model=self.model,
            template_hash=self.template_hash,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd,
            decision=decision,
            reason=reason,
            details=details,
        )

    def shared(self) -> "Generation[T]":
        """This call as seen by a record that did not make it: same reply, no tokens or $ (counted once, by its owner)."""
        return replace(self, prompt_tokens=0, completion_tokens=0, cost_usd=0.0)


def _price(config: Any, completion: Completion) -> float:
    """$ of one reply: at the batch price when a provider batch answered it (`OpenAIModel.batch_prices`)."""
    if completion.batch_id is not None and hasattr(config, "batch_prices"):
        p_in, p_out = config.batch_prices()
    else:
        p_in, p_out = config.price_per_mtok_in, config.price_per_mtok_out
    return (completion.prompt_tokens * p_in + completion.completion_tokens * p_out) / 1e6


class RoleModel:
    """A recipe role bound to a backend, with cache, usage, budget and structured output."""

    def __init__(
        self,
        role: str,
        config: Any,
        backend: Backend,
        cache: RequestCache | None,
        ledger: UsageLedger,
        semaphore: asyncio.Semaphore | None = None,
        *,
        run_seed: int = 0,
        base_dir: Path | None = None,
    ):
        self.role = role
        self.config = config
        self.backend = backend
        self.cache = cache
        self.ledger = ledger
        self.run_seed = run_seed
        self.base_dir = base_dir
        self._semaphore = semaphore or asyncio.Semaphore(config.max_concurrency)
        self._record_lock = threading.Lock()
        self._identity: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """The model's cache identity, content-fingerprinted once per run (see `llm.fingerprint`)."""
        if self._identity is None:
            self._identity = self.config.identity(self.base_dir)
        return self._identity

    @property
    def name(self) -> str:
        return self.config.model

    def sampling(self, seed_key: Any = None, **overrides: Any) -> Sampling:
        """The call's sampling parameters. Its seed derives from the model's seed, the run's seed and
        `seed_key` (the call's place in the run), so a different run seed gives different samples."""
        base = self.config.sampling().model_dump()
        base.update({k: v for k, v in overrides.items() if v is not None})
        if base.get("seed") is not None:
            base["seed"] = derive_seed(base["seed"], self.run_seed, seed_key)
        return Sampling.model_validate(base)

    async def generate(
        self,
        prompt: Prompt | str | None = None,
        variables: dict[str, Any] | None = None,
        *,
        messages: list[Message] | None = None,
        schema: type[BaseModel] | None = None,
        parse: Callable[[str], T] | None = None,
        accept_last: Callable[[Any], T] | None = None,
        seed_key: Any = None,
        stage: str | None = None,
        **sampling: Any,
    ) -> Generation[Any]:
        """Render `prompt` with `variables` (or send `messages`), call the model, parse the reply.

        `schema` asks for JSON matching a pydantic model; `parse` is a plain-text parser that raises
        ValueError. A reply that does not parse is re-asked `max_parse_retries` times with the error;
        after that the call raises `ParseFailure` — unless `accept_last` is given: then the last reply is
        read by it (it gets the reply text, or the schema's object when the reply matched the schema but not
        a stricter check in `parse`), and only a reply it cannot read either fails. Use it to take "7 of the
        10 instructions asked for" after the re-asks, and record the shortfall.
        """
        if isinstance(prompt, str):
            prompt = load_prompt(prompt)
        if prompt is not None:
            messages = prompt.render(**(variables or {}))
        if not messages:
            raise ValueError("generate() needs a prompt or messages")
        template_hash = prompt.hash if prompt is not None else None
        json_schema = schema.model_json_schema() if schema is not None else None
        if json_schema is not None and not self.backend.native_json_schema:
            last = messages[-1]
            messages = messages[:-1] + [
                Message(
                    role=last.role,
                    content=f"{last.content}\n\nReply with one JSON value only, following this JSON schema:\n{schema_instructions(json_schema)}",
                )
            ]
        request = CompletionRequest(
            messages=list(messages),
            sampling=self.sampling(seed_key, **sampling),
            json_schema=json_schema,
            template=prompt.name if prompt is not None else None,
            variables=variables if prompt is not None else None,
        )

        total_in = total_out = 0
        total_cost = 0.0
        all_cached = True
        error = ""
        completion: Completion | None = None
        attempts = self.config.max_parse_retries + 1
        for attempt in range(1, attempts + 1):
            completion, cached = await self._complete(request, template_hash, stage)
            all_cached &= cached
            total_in += completion.prompt_tokens
            total_out += completion.completion_tokens
            total_cost += _price(self.config, completion)
            try:
                if schema is not None:
                    value: Any = parse_model(completion.text, schema)
                    if parse is not None:
                        value = parse(value)  # a stricter check of the parsed object (e.g. how many items)
                elif parse is not None:
                    value = parse(completion.text)
                else:
                    value = completion.text
            except ValueError as exc:
                error = str(exc)
                if attempt == attempts and accept_last is not None:
                    try:
                        value = accept_last(parse_model(completion.text, schema) if schema is not None else completion.text)
                    except ValueError:
                        break
                else:
                    request = self._reask(request, completion.text, error, schema is not None)
                    continue
            return Generation(
                text=completion.text,
                value=value,
                role=self.role,
                model=self.name,
                template_hash=template_hash,
                prompt_tokens=total_in,
                completion_tokens=total_out,
                cost_usd=round(total_cost, 10),
                attempts=attempt,
                cached=all_cached,
                finish_reason=completion.finish_reason,
                logprobs=completion.logprobs,
                batch_id=completion.batch_id,
            )
        snippet = (completion.text if completion else "")[:160].replace("\n", "\\n")
        raise ParseFailure(
            f"{self.role} ({self.name}): reply did not parse after {attempts} attempt(s): {error}; "
            f"last reply began {snippet!r}"
        )

    def _reask(self, request: CompletionRequest, reply: str, error: str, wants_json: bool) -> CompletionRequest:
        repair = load_prompt("repair.j2").render(error=error, wants_json=wants_json)[-1].content
        return request.model_copy(
            update={
                "messages": request.messages
                + [Message(role="assistant", content=reply), Message(role="user", content=repair)]
            }
        )

    async def _complete(self, request: CompletionRequest, template_hash: str | None, stage: str | None = None) -> tuple[Completion, bool]:
        key = cache_key(self.identity, request, template_hash) if self.cache is not None else None
        if key is not None and (hit := self.cache.get(key)) is not None:  # type: ignore[union-attr]
            self.ledger.record_cache_hit(self.role, stage)
            return hit, True
        self.ledger.check_budget()
        if getattr(self.backend, "batched", False):
            # Waits for its batch (bounded by the batch's window, see llm/batch); not held to max_concurrency, so
            # one batch can gather the requests of every record in flight.
            completion = await self._call_backend(request, stage)
        else:
            async with self._semaphore:
                completion = await self._call_backend(request, stage)
        cost = _price(self.config, completion)
        self.ledger.record_request(
            self.role, completion.prompt_tokens, completion.completion_tokens, cost,
            truncated=completion.finish_reason == "length", stage=stage,
        )
        if key is not None:
            self.cache.put(key, completion)  # type: ignore[union-attr]
        if self.config.record_to:
            self._record(request_key(request), request, completion)
        return completion, False

    async def _call_backend(self, request: CompletionRequest, stage: str | None) -> Completion:
        if not getattr(self.backend, "batched", False):
            # (a batched request cut off by a crash is not lost: the resumed run collects it from its batch)
            self.ledger.request_started(self.role, stage)
        try:
            return await self.backend.complete(request)
        except LLMCallFailure:
            self.ledger.record_failure(self.role, stage)
            raise

    def _record(self, key: str, request: CompletionRequest, completion: Completion) -> None:
        line = json.dumps(
            {"key": key, "request": request.model_dump(), "completion": completion.model_dump()},
            ensure_ascii=False,
        )
        with self._record_lock:
            path = Path(self.config.record_to)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def _backend_key(config: Any) -> str:
    skip = {"temperature", "top_p", "max_tokens", "seed", "price_per_mtok_in", "price_per_mtok_out",
            "max_parse_retries", "record_to"}
    return json.dumps({k: v for k, v in config.model_dump().items() if k not in skip}, sort_keys=True)


def _resolve_paths(config: Any, base_dir: Path | None) -> Any:
    """Relative model/adapter paths in a recipe are relative to the recipe's folder."""
    if base_dir is None:
        return config
    updates: dict[str, str] = {}
    for name in ("model", "adapter"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value and not value.startswith("local:"):
            path = Path(value).expanduser()
            if not path.is_absolute() and (base_dir / path).exists() and not path.exists():
                updates[name] = str(base_dir / path)
    return config.model_copy(update=updates) if updates else config


def build_backend(config: Any, base_dir: Path | None = None) -> Backend:
    """Create the backend for a model entry. Imports are lazy: optional extras stay optional."""
    name = config.backend
    if name in ("llamacpp", "hf"):
        config = _resolve_paths(config, base_dir)
    if name == "scripted":
        from datatailor.llm.scripted import ScriptedBackend

        return ScriptedBackend(config, base_dir=base_dir)
    if name == "openai":
        from datatailor.llm.openai import OpenAIBackend

        return OpenAIBackend(config)
    if name == "llamacpp":
        from datatailor.llm.llamacpp import LlamaCppBackend

        return LlamaCppBackend(config)
    if name == "hf":
        from datatailor.llm.hf import HFBackend

        return HFBackend(config)
    raise UserError(f"unknown backend {name!r}")


@dataclass
class ModelPool:
    """The recipe's roles, built lazily; roles with identical backend settings share one backend.

    Roles with `batch: true` share the run's `BatchHub` (llm/batch), which keeps its state in `run_dir/batches`."""

    configs: dict[str, ModelConfig]
    ledger: UsageLedger
    cache: RequestCache | None = None
    base_dir: Path | None = None
    seed: int = 0
    run_dir: Path | None = None
    # Called when a batch is submitted, changes status or ends (progress display).
    on_batch_change: Callable[[], None] | None = None
    _roles: dict[str, RoleModel] = field(default_factory=dict)
    _backends: dict[str, tuple[Backend, asyncio.Semaphore]] = field(default_factory=dict)
    _hub: Any = None

    def role(self, name: str) -> RoleModel:
        if name in self._roles:
            return self._roles[name]
        if name not in self.configs:
            known = ", ".join(sorted(self.configs)) or "none"
            raise UserError(f"no model for role {name!r} in the recipe's `models` (defined: {known})")
        config = self.configs[name]
        key = _backend_key(config)
        if key not in self._backends:
            backend = self._batched(name, config) if getattr(config, "batch", False) else build_backend(config, self.base_dir)
            self._backends[key] = (backend, asyncio.Semaphore(config.max_concurrency))
        backend, semaphore = self._backends[key]
        self._roles[name] = RoleModel(
            name, config, backend, self.cache, self.ledger, semaphore, run_seed=self.seed, base_dir=self.base_dir
        )
        return self._roles[name]

    def _batched(self, name: str, config: Any) -> Backend:
        from datatailor.llm.batch import BatchedBackend, BatchHub

        if self.run_dir is None:
            raise UserError(
                f"role {name!r} has batch: true, which needs a run directory to keep its batches in: use it in a recipe run "
                "(`datatailor run`, datatailor.run) on the local executor, or set batch: false here"
            )
        if self._hub is None:
            self._hub = BatchHub(self.run_dir / "batches", self.ledger, self.on_batch_change)
        return BatchedBackend(config, self._hub)

    def records_in_flight(self, roles: Any, concurrency: int) -> int:
        """How many records a stage using `roles` keeps in flight: its `concurrency`, or, when one of the roles is
        batched, that role's `batch_records_in_flight` if larger (one batch should gather many records' requests)."""
        batched = [self.configs[r].batch_records_in_flight for r in roles
                   if r in self.configs and getattr(self.configs[r], "batch", False)]
        return max([concurrency, *batched])

    def batch_summary(self) -> dict[str, Any] | None:
        """The run's batches so far (llm/batch/journal.py `summary`), or None when no role is batched."""
        return self._hub.summary() if self._hub is not None else None

    async def aclose(self) -> None:
        if self._hub is not None:
            await self._hub.aclose()
        for backend, _ in self._backends.values():
            await backend.aclose()
        self._backends.clear()
        self._roles.clear()
