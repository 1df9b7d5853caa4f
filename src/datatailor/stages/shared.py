"""Calls whose result many records share: made once, checkpointed, and paid for once.

CodecLM's Self-Rubrics are written once per metadata entry and used by every instruction of that
entry; REFED collects feedback once per reference and uses it for every pair synthesized from it. A
stage asks `SharedCalls.get(key, owner, make, parse)`:

* the first record to ask (the **owner**) makes the call; the others wait for the same task;
* the finished reply is appended to `shared_calls.jsonl` in the stage's folder as soon as it
  returns, so a resumed run reads it back instead of calling again (with or without the request cache);
* the owner's lineage carries the call's tokens and $; every other record gets the same reply with
  zero tokens and `shared_call` set, so summing tokens over records counts the call once. After a
  resume, the owner recorded in the file keeps that role. A call answered by a provider batch (a role with
  `batch: true`) keeps its batch id, so a record that reads the call back still names that batch in its lineage.

A call that fails is not recorded: each waiting record fails with it, and a re-run tries again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from datatailor.journal import append_row, read_journal
from datatailor.llm.models import Generation

T = TypeVar("T")
SHARED_FILE = "shared_calls.jsonl"


class SharedCalls:
    def __init__(self, folder: Path | None):
        self.path = folder / SHARED_FILE if folder is not None else None
        self._done: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            for row in read_journal(self.path):
                self._done[row["key"]] = row
        self._tasks: dict[str, asyncio.Task[Generation[Any]]] = {}
        self._owners: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._done)

    async def get(
        self,
        key: str,
        owner: str,
        make: Callable[[], Awaitable[Generation[T]]],
        parse: Callable[[str], T] | None = None,
    ) -> tuple[Generation[T], bool]:
        """The shared call's generation as seen by record `owner`, and whether that record owns its cost."""
        if key in self._done:
            row = self._done[key]
            gen = self._from_row(row, parse)
            mine = row["owner"] == owner
            return (gen if mine else gen.shared()), mine
        if key not in self._tasks:
            self._owners[key] = owner
            self._tasks[key] = asyncio.ensure_future(self._make_and_store(key, owner, make))
        gen = await asyncio.shield(self._tasks[key])
        mine = self._owners[key] == owner
        return (gen if mine else gen.shared()), mine

    async def _make_and_store(self, key: str, owner: str, make: Callable[[], Awaitable[Generation[T]]]) -> Generation[T]:
        try:
            gen = await make()
        except BaseException:
            self._tasks.pop(key, None)  # not recorded: the next record to ask tries again
            raise
        row = {
            "key": key, "owner": owner, "text": gen.text, "role": gen.role, "model": gen.model,
            "template_hash": gen.template_hash, "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens, "cost_usd": gen.cost_usd, "finish_reason": gen.finish_reason,
        }
        if gen.batch_id is not None:  # the provider batch that answered it (llm/batch), for its records' lineage
            row["batch_id"] = gen.batch_id
        self._done[key] = row
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                append_row(fh, row)
        return gen

    @staticmethod
    def _from_row(row: dict[str, Any], parse: Callable[[str], Any] | None) -> Generation[Any]:
        text = row["text"]
        return Generation(
            text=text,
            value=parse(text) if parse is not None else text,
            role=row["role"],
            model=row["model"],
            template_hash=row.get("template_hash"),
            prompt_tokens=row.get("prompt_tokens", 0),
            completion_tokens=row.get("completion_tokens", 0),
            cost_usd=row.get("cost_usd", 0.0),
            cached=True,
            finish_reason=row.get("finish_reason"),
            batch_id=row.get("batch_id"),
        )
