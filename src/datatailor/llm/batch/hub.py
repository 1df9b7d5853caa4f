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
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatailor.errors import LLMCallFailure, RunAbort
from datatailor.llm.base import CALL_OWNER, Completion, CompletionRequest
from datatailor.llm.batch.budget import fits_budget, refusal_message
from datatailor.llm.batch.client import BatchClient, BatchRejected
from datatailor.llm.batch.driver import (
    Endpoint,
    create,
    download,
    endpoint_key,
    find_created,
    wait,
)
from datatailor.llm.batch.journal import BatchJournal, LocalBatch
from datatailor.llm.batch.results import Outcome, ResultFiles, outcome_of, unanswered
from datatailor.llm.config import OpenAIModel
from datatailor.llm.usage import UsageLedger


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


class BatchHub:
    def __init__(self, folder: Path, ledger: UsageLedger | None = None, on_change: Callable[[], None] | None = None):
        self.journal = BatchJournal(folder)
        self.ledger = ledger
        self.on_change = on_change or (lambda: None)
        self.results = ResultFiles(self.journal)
        self.counters: Counter[str] = Counter()  # created, answered, retried, online, failed, refused (this invocation)
        self._endpoints: dict[tuple[str, str, str | None], Endpoint] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what backends call -------------------------------------------------------------------------------

    def endpoint(self, config: OpenAIModel, transport: Any = None) -> Endpoint:
        key = endpoint_key(config.model, config.base_urls[0], config.api_key_env)
        if key not in self._endpoints:
            self._endpoints[key] = Endpoint(config, BatchClient(config, transport=transport))
        return self._endpoints[key]

    async def call(self, endpoint: Endpoint, cid: str, line: str, request: CompletionRequest, worst: tuple[float, int],
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

    def _route(self, endpoint: Endpoint, cid: str, waiting: _Waiting) -> None:
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

    def _settle(self, endpoint: Endpoint, cid: str, batch: LocalBatch, outcome: Outcome) -> None:
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
        if isinstance(result, asyncio.CancelledError):
            waiting.future.cancel()
        elif isinstance(result, BaseException):
            waiting.future.set_exception(result)
        else:
            waiting.future.set_result(result)

    # -- collecting -----------------------------------------------------------------------------------

    def _enqueue(self, endpoint: Endpoint, cid: str, waiting: _Waiting) -> None:
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

    async def _collect(self, endpoint: Endpoint) -> None:
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

    def _flush(self, endpoint: Endpoint) -> None:
        cids, endpoint.queue, endpoint.queue_bytes = endpoint.queue, [], 0
        if cids:
            self._submit(endpoint, cids)

    # -- submitting --------------------------------------------------------------------------------------

    def _submit(self, endpoint: Endpoint, cids: list[str]) -> None:
        items = [(cid, self._waiting[cid]) for cid in cids if cid in self._waiting]
        worst = [w.worst for _, w in items]
        fit = fits_budget(self.ledger, self.journal.reserved(), worst)
        if fit < len(items):
            self.counters["refused"] += len(items) - fit
            refusal = refusal_message(self.ledger, self.journal.reserved(), worst[fit:])
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

    def _plan(self, endpoint: Endpoint, items: list[tuple[str, _Waiting]]) -> None:
        cfg = endpoint.config
        batch = self.journal.plan(
            [w.line for _, w in items], [c for c, _ in items], [w.owner for _, w in items],
            sum(w.worst[0] for _, w in items), sum(w.worst[1] for _, w in items),
            model=cfg.model, base_url=endpoint.client.base_url, api_key_env=cfg.api_key_env,
        )
        self.on_change()
        self._drive_if_idle(endpoint, batch, fresh=True)

    # -- driving one batch --------------------------------------------------------------------------------

    def _resume(self, endpoint: Endpoint) -> None:
        """Drive the batches an earlier invocation left pending on this endpoint."""
        key = endpoint_key(endpoint.config.model, endpoint.client.base_url, endpoint.config.api_key_env)
        for batch in self.journal.pending():
            if endpoint_key(batch.model, batch.base_url, batch.api_key_env) == key:
                self._drive_if_idle(endpoint, batch)

    def _drive_if_idle(self, endpoint: Endpoint, batch: LocalBatch, fresh: bool = False) -> None:
        task = self._drivers.get(batch.tag)
        if task is None or task.done():
            self._drivers[batch.tag] = asyncio.ensure_future(self._drive(endpoint, batch, fresh))

    async def _drive(self, endpoint: Endpoint, batch: LocalBatch, fresh: bool) -> None:
        """Create the batch (or find it after a crash), wait for it, store its files, settle its requests."""
        try:
            if batch.batch_id is None:
                if not fresh and not await find_created(self.journal, endpoint, batch):
                    self._requeue(endpoint, batch)
                    return
                if batch.batch_id is None:
                    await create(self.journal, endpoint, batch)
                    self.counters["created"] += 1
                    self.on_change()
            info = await wait(self.journal, endpoint, batch, self.on_change)
            await download(self.journal, endpoint, batch, info)
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

    def _settle_batch(self, endpoint: Endpoint, batch: LocalBatch) -> None:
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

    def _requeue(self, endpoint: Endpoint, batch: LocalBatch) -> None:
        """A dropped batch's waiting requests go into the next batch."""
        for cid in batch.cids or []:
            if cid in self._waiting and self.journal.where[cid][0] == batch.tag:
                self._enqueue(endpoint, cid, self._waiting[cid])

    def _fail_batch(self, batch: LocalBatch, exc: BaseException) -> None:
        for cid in batch.cids or []:
            if cid in self._waiting and self.journal.where[cid][0] == batch.tag:
                self._resolve(cid, exc)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
