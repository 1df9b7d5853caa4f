"""The run's batches: collect requests, submit them as batches, wait for them, resolve each call by its custom_id.

One `BatchHub` per run (built by the `ModelPool`), shared by every batched role, so one journal holds every batch
of the run. Requests are queued per endpoint (server, key variable and model: a batch holds one model's requests).

A call's way through it:

1. `call` registers a future for the request's custom_id (identical requests in flight share it) and routes it:
   a request already in a batch of this run waits for that batch, or is answered from its stored files; a new one
   is queued.
2. The collector sends the queue as one batch once no request arrived for `batch_collect_s`, its first request has
   waited `batch_collect_max_s`, or it is full (`batch_max_requests`, `batch_max_bytes`).
3. Submitting: the budget check (the batch's worst case, with the batches still pending, must fit), then the input
   file and the `planned` row, the upload, the creation — each recorded in the journal once it happened.
4. The driver polls the batch (`batch_poll_s`, growing ×1.5 to `batch_poll_max_s`) until it ends, or until its
   completion window and `batch_wait_margin_s` have passed (then it cancels it and takes what it answered);
   downloads its output and error files; and settles every waiting request: an answer, a failure, or a retry
   (in the next batch, or online with `batch_fallback: online`; at most `batch_max_attempts` batches).

After a crash the journal says which batches exist: a request of a pending batch waits for it (its driver starts
when the endpoint is first used), a batch whose creation was not recorded is looked up on the server by its tag,
and a batch planned but never uploaded is dropped (its requests are batched again when their records ask).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatailor.errors import BudgetExhausted, LLMCallFailure, RunAbort
from datatailor.llm.base import CALL_OWNER, Completion, CompletionRequest
from datatailor.llm.batch.client import BatchClient, BatchRejected
from datatailor.llm.batch.journal import ENDED, METADATA_KEY, BatchJournal, LocalBatch
from datatailor.llm.batch.results import Outcome, ResultFiles, outcome_of, unanswered
from datatailor.llm.config import OpenAIModel
from datatailor.llm.usage import UsageLedger

# After cancelling a batch that outlived its window + margin: how long to wait for the server to end it.
CANCEL_GRACE_S = 600.0


@dataclass
class _Waiting:
    """A request some record waits for."""

    future: asyncio.Future[Completion]
    request: CompletionRequest
    line: str  # its line in a batch input file
    owner: str | None
    worst: tuple[float, int]  # worst-case ($, tokens) of the request at the batch price
    config: OpenAIModel
    online: Callable[[CompletionRequest], Awaitable[Completion]]


@dataclass
class _Endpoint:
    """One server + key variable + model: its client and its queue for the next batch."""

    config: OpenAIModel
    client: BatchClient
    queue: list[str] = field(default_factory=list)
    queue_bytes: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    collector: asyncio.Task[None] | None = None
    resumed: bool = False


def endpoint_key(model: str, base_url: str, api_key_env: str | None) -> tuple[str, str, str | None]:
    return base_url.rstrip("/"), model, api_key_env


class BatchHub:
    def __init__(self, folder: Path, ledger: UsageLedger | None = None, on_change: Callable[[], None] | None = None):
        self.journal = BatchJournal(folder)
        self.ledger = ledger
        self.on_change = on_change or (lambda: None)
        self.results = ResultFiles(self.journal)
        self.counters: Counter[str] = Counter()  # created, answered, retried, online, failed, refused (this invocation)
        self._endpoints: dict[tuple[str, str, str | None], _Endpoint] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what backends call -------------------------------------------------------------------------------

    def endpoint(self, config: OpenAIModel, transport: Any = None) -> _Endpoint:
        key = endpoint_key(config.model, config.base_urls[0], config.api_key_env)
        if key not in self._endpoints:
            self._endpoints[key] = _Endpoint(config, BatchClient(config, transport=transport))
        return self._endpoints[key]

    async def call(self, endpoint: _Endpoint, cid: str, line: str, request: CompletionRequest, worst: tuple[float, int],
                   config: OpenAIModel, online: Callable[[CompletionRequest], Awaitable[Completion]]) -> Completion:
        """The reply to one request, through a batch (see the module docstring)."""
        if not endpoint.resumed:
            endpoint.resumed = True
            self._resume(endpoint)
        waiting = self._waiting.get(cid)
        if waiting is None:
            future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
            waiting = self._waiting[cid] = _Waiting(future, request, line, CALL_OWNER.get(), worst, config, online)
            self._route(endpoint, cid, waiting)
        else:
            self.counters["coalesced"] += 1
        # shielded: a record that is cancelled (Ctrl-C) must not cancel the answer others wait for
        return await asyncio.shield(waiting.future)

    def summary(self) -> dict[str, Any]:
        return {**self.journal.summary(), **{k: v for k, v in self.counters.items()}}

    async def aclose(self) -> None:
        tasks = [*self._tasks, *self._drivers.values(), *(e.collector for e in self._endpoints.values() if e.collector)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for waiting in self._waiting.values():
            waiting.future.cancel()
        self._waiting.clear()
        for endpoint in self._endpoints.values():
            await endpoint.client.aclose()
        self._endpoints.clear()

    # -- routing and settling -------------------------------------------------------------------------------

    def _route(self, endpoint: _Endpoint, cid: str, waiting: _Waiting) -> None:
        where = self.journal.where.get(cid)
        if where is None:
            self._enqueue(endpoint, cid, waiting)
            return
        batch = self.journal.batches[where[0]]
        if batch.pending:
            self._drive_if_idle(endpoint, batch)  # its driver settles the request when the batch ends
        elif batch.dropped is not None:
            self._enqueue(endpoint, cid, waiting)
        else:
            self._settle(endpoint, cid, batch, self.results.lookup(batch, cid, waiting.request))

    def _settle(self, endpoint: _Endpoint, cid: str, batch: LocalBatch, outcome: Outcome) -> None:
        waiting = self._waiting.get(cid)
        if waiting is None:
            return  # nobody asked for it (yet): the answer stays in the batch's files
        if isinstance(outcome, Completion):
            self.counters["answered"] += 1
            self._resolve(cid, outcome)
            return
        where = f"batch {batch.batch_id or batch.tag}"
        if not outcome.retryable:
            self.counters["failed"] += 1
            self._resolve(cid, LLMCallFailure(f"{endpoint.client.base_url} ({where}): {outcome.message}"))
        elif waiting.config.batch_fallback == "online":
            self.counters["online"] += 1
            self._spawn(self._online(cid, waiting))
        elif self.journal.where[cid][1] >= waiting.config.batch_max_attempts:
            self.counters["failed"] += 1
            self._resolve(cid, LLMCallFailure(
                f"{endpoint.client.base_url}: no answer after {self.journal.where[cid][1]} batch(es); last, {where}: {outcome.message}"
            ))
        else:
            self.counters["retried"] += 1
            self._enqueue(endpoint, cid, waiting)

    async def _online(self, cid: str, waiting: _Waiting) -> None:
        try:
            completion = await waiting.online(waiting.request)
        except BaseException as exc:  # handed to the record waiting for it
            self._resolve(cid, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._resolve(cid, completion)

    def _resolve(self, cid: str, result: Completion | BaseException) -> None:
        waiting = self._waiting.pop(cid, None)
        if waiting is None or waiting.future.done():
            return
        if isinstance(result, BaseException):
            waiting.future.set_exception(result)
        else:
            waiting.future.set_result(result)

    # -- collecting -----------------------------------------------------------------------------------

    def _enqueue(self, endpoint: _Endpoint, cid: str, waiting: _Waiting) -> None:
        cfg = endpoint.config
        size = len(waiting.line.encode("utf-8"))
        if size > cfg.batch_max_bytes:
            self._resolve(cid, LLMCallFailure(f"the request is {size} bytes, more than batch_max_bytes={cfg.batch_max_bytes}"))
            return
        if endpoint.queue and endpoint.queue_bytes + size > cfg.batch_max_bytes:
            self._flush(endpoint)
        now = asyncio.get_running_loop().time()
        if not endpoint.queue:
            endpoint.first_at = now
        endpoint.queue.append(cid)
        endpoint.queue_bytes += size
        endpoint.last_at = now
        if len(endpoint.queue) >= cfg.batch_max_requests:
            self._flush(endpoint)
        elif endpoint.collector is None:
            endpoint.collector = asyncio.ensure_future(self._collect(endpoint))

    async def _collect(self, endpoint: _Endpoint) -> None:
        """Wait until the queue has been quiet for `batch_collect_s` (at most `batch_collect_max_s`), then send it."""
        cfg = endpoint.config
        loop = asyncio.get_running_loop()
        try:
            while endpoint.queue:
                due = min(endpoint.last_at + cfg.batch_collect_s, endpoint.first_at + cfg.batch_collect_max_s)
                if loop.time() >= due:
                    self._flush(endpoint)
                    break
                await asyncio.sleep(due - loop.time())
        finally:
            endpoint.collector = None

    def _flush(self, endpoint: _Endpoint) -> None:
        cids, endpoint.queue, endpoint.queue_bytes = endpoint.queue, [], 0
        if cids:
            self._submit(endpoint, cids)

    # -- submitting --------------------------------------------------------------------------------------

    def _submit(self, endpoint: _Endpoint, cids: list[str]) -> None:
        items = [(cid, self._waiting[cid]) for cid in cids if cid in self._waiting]
        fit = self._fit_budget(items)
        if fit < len(items):
            self.counters["refused"] += len(items) - fit
            refusal = self._refusal(items[fit:])
            for cid, _ in items[fit:]:
                self._resolve(cid, refusal)
        items = items[:fit]
        if not items:
            return
        try:
            self._plan(endpoint, items)
        except Exception as exc:  # e.g. the disk is full: the records fail with it rather than wait forever
            for cid, _ in items:
                self._resolve(cid, exc)

    def _plan(self, endpoint: _Endpoint, items: list[tuple[str, _Waiting]]) -> None:
        cfg = endpoint.config
        batch = self.journal.plan(
            [w.line for _, w in items], [c for c, _ in items], [w.owner for _, w in items],
            sum(w.worst[0] for _, w in items), sum(w.worst[1] for _, w in items),
            model=cfg.model, base_url=endpoint.client.base_url, api_key_env=cfg.api_key_env,
        )
        self.on_change()
        self._drive_if_idle(endpoint, batch, fresh=True)

    def _fit_budget(self, items: list[tuple[str, _Waiting]]) -> int:
        """How many of `items`, in order, can go into the next batch without risking the budget: their worst case,
        with what the pending batches may still bill, must fit in what is left."""
        if self.ledger is None or (self.ledger.budget.max_usd is None and self.ledger.budget.max_tokens is None):
            return len(items)
        pending_usd, pending_tokens = self.journal.reserved()
        usd = [pending_usd]
        tokens = [pending_tokens]
        for _, w in items:
            usd.append(usd[-1] + w.worst[0])
            tokens.append(tokens[-1] + w.worst[1])

        def fits(n: int) -> bool:
            try:
                self.ledger.check_worst_case(usd[n], tokens[n])  # type: ignore[union-attr]
            except BudgetExhausted:
                return False
            return True

        if fits(len(items)):
            return len(items)
        lo, hi = 0, len(items)  # fits(lo) may be False too: then nothing is sent
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _refusal(self, refused: list[tuple[str, _Waiting]]) -> BudgetExhausted:
        usd = sum(w.worst[0] for _, w in refused)
        pending_usd, _ = self.journal.reserved()
        spent_usd, spent_tokens = self.ledger.spent() if self.ledger else (0.0, 0)
        budget = self.ledger.budget if self.ledger else None
        limit = f"${budget.max_usd:.4f}" if budget and budget.max_usd is not None else f"{budget.max_tokens if budget else '?'} tokens"
        return BudgetExhausted(
            f"budget: stopped submitting batches: {len(refused)} more request(s) could cost up to ${usd:.4f} (worst case: "
            f"every reply at max_tokens), on top of ${spent_usd:.4f} / {spent_tokens} tokens spent and ${pending_usd:.4f} "
            f"that pending batches may still bill, over the budget of {limit}. Raise the budget and re-run to continue"
        )

    # -- driving one batch --------------------------------------------------------------------------------

    def _resume(self, endpoint: _Endpoint) -> None:
        """Drive the batches an earlier invocation left pending on this endpoint."""
        key = endpoint_key(endpoint.config.model, endpoint.client.base_url, endpoint.config.api_key_env)
        for batch in self.journal.pending():
            if endpoint_key(batch.model, batch.base_url, batch.api_key_env) == key:
                self._drive_if_idle(endpoint, batch)

    def _drive_if_idle(self, endpoint: _Endpoint, batch: LocalBatch, fresh: bool = False) -> None:
        task = self._drivers.get(batch.tag)
        if task is None or task.done():
            self._drivers[batch.tag] = asyncio.ensure_future(self._drive(endpoint, batch, fresh))

    async def _drive(self, endpoint: _Endpoint, batch: LocalBatch, fresh: bool) -> None:
        try:
            if batch.batch_id is None and not await self._create(endpoint, batch, fresh):
                return
            info = await self._wait(endpoint, batch)
            await self._download(endpoint, batch, info)
        except asyncio.CancelledError:
            raise
        except BatchRejected as exc:
            self.journal.append({"event": "finished", "tag": batch.tag, "status": "failed", "error": str(exc)})
        except RunAbort as exc:  # the server is down or refuses the key: the records stop, the run is resumable
            self._fail_batch(batch, exc)
            return
        except Exception as exc:  # a bug or a reply we cannot read: the records fail instead of waiting forever
            self._fail_batch(batch, LLMCallFailure(f"batch {batch.batch_id or batch.tag}: {type(exc).__name__}: {exc}"))
            return
        self._settle_batch(endpoint, batch)
        self.on_change()

    async def _create(self, endpoint: _Endpoint, batch: LocalBatch, fresh: bool) -> bool:
        """Upload and create a planned batch; after a crash, first find out whether it was created. False when the
        batch is dropped instead (its waiting requests are queued again)."""
        client, cfg = endpoint.client, endpoint.config
        if not fresh:
            found = await client.find(METADATA_KEY, batch.tag, batch.planned_at) if batch.file_id is not None else None
            if found is None:
                why = "never uploaded" if batch.file_id is None else "its creation was not recorded and the server has no such batch"
                self.journal.append({"event": "dropped", "tag": batch.tag, "why": why})
                for cid in batch.cids or []:
                    if cid in self._waiting and self.journal.where[cid][0] == batch.tag:
                        self._enqueue(endpoint, cid, self._waiting[cid])
                return False
            self._created(batch, found)
            return True
        if batch.file_id is None:
            file_id = await client.upload(self.journal.input_path(batch.tag))
            self.journal.append({"event": "uploaded", "tag": batch.tag, "file_id": file_id})
        info = await client.create(batch.file_id, cfg.batch_completion_window, METADATA_KEY, batch.tag)  # type: ignore[arg-type]
        self._created(batch, info)
        self.counters["created"] += 1
        self.on_change()
        return True

    def _created(self, batch: LocalBatch, info: dict[str, Any]) -> None:
        self.journal.append({"event": "created", "tag": batch.tag, "batch_id": info["id"],
                             "created_at": info.get("created_at") or time.time(), "status": info.get("status")})

    async def _wait(self, endpoint: _Endpoint, batch: LocalBatch) -> dict[str, Any]:
        """Poll until the batch ends; past its window + margin, cancel it and wait `CANCEL_GRACE_S` more at most."""
        cfg, client = endpoint.config, endpoint.client
        deadline = (batch.created_at or time.time()) + cfg.batch_window_s + cfg.batch_wait_margin_s
        interval, gave_up = cfg.batch_poll_s, False
        while True:
            info = await client.retrieve(batch.batch_id)  # type: ignore[arg-type]
            status, counts = info.get("status"), info.get("request_counts") or {}
            if status in ENDED:
                return info
            if status != batch.status or counts != batch.counts:
                self.journal.append({"event": "status", "tag": batch.tag, "status": status, "counts": counts})
                self.on_change()
            now = time.time()
            if now > deadline and not gave_up:
                gave_up = True
                self.journal.append({"event": "status", "tag": batch.tag, "status": status, "counts": counts,
                                     "note": f"still {status} {cfg.batch_completion_window} + {cfg.batch_wait_margin_s:g} s after "
                                             "its creation: cancelled, its unanswered requests are retried"})
                await client.cancel(batch.batch_id)  # type: ignore[arg-type]
                deadline = now + CANCEL_GRACE_S
            elif now > deadline:
                return {**info, "status": "expired", "error_note": "did not end after being cancelled"}
            await asyncio.sleep(max(0.0, min(interval, deadline - now)) or cfg.batch_poll_s)
            interval = min(cfg.batch_poll_max_s, interval * 1.5)

    async def _download(self, endpoint: _Endpoint, batch: LocalBatch, info: dict[str, Any]) -> None:
        client = endpoint.client
        if info.get("output_file_id"):
            await client.download(info["output_file_id"], self.journal.output_path(batch.tag))
        if info.get("error_file_id"):
            await client.download(info["error_file_id"], self.journal.errors_path(batch.tag))
        errors = (info.get("errors") or {}).get("data") or []
        error = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))[:500] or info.get("error_note")
        self.journal.append({"event": "finished", "tag": batch.tag, "status": info.get("status"),
                             "counts": info.get("request_counts") or {}, "output_file_id": info.get("output_file_id"),
                             "error_file_id": info.get("error_file_id"), "error": error or None})

    def _settle_batch(self, endpoint: _Endpoint, batch: LocalBatch) -> None:
        """Settle every request waiting for this (finished) batch, reading its files once, line by line."""
        mine = {cid for cid in batch.cids or [] if cid in self._waiting and self.journal.where[cid][0] == batch.tag}
        for row in self.results.rows(batch):
            cid = row["custom_id"]
            if cid in mine and cid in self._waiting:
                mine.discard(cid)
                self._settle(endpoint, cid, batch, outcome_of(row, self._waiting[cid].request, batch.batch_id))
        for cid in mine:
            self._settle(endpoint, cid, batch, unanswered(batch))
        batch.cids = None

    def _fail_batch(self, batch: LocalBatch, exc: BaseException) -> None:
        for cid in batch.cids or []:
            if cid in self._waiting and self.journal.where[cid][0] == batch.tag:
                self._resolve(cid, exc)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
