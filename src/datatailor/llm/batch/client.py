"""HTTP for the provider's files and batches endpoints (OpenAI's Batch API, and servers that copy it).

    POST /files (purpose=batch)      upload an input file          GET /files/{id}/content    download a file
    POST /batches                    create a batch                GET /batches/{id}          its status
    GET  /batches?after=&limit=      list the account's batches    POST /batches/{id}/cancel  cancel it

Every call is bounded: each attempt by `timeout_s` (file transfers by `TRANSFER_TIMEOUT_S`), and a call by
`max_retries` retries with backoff (full jitter, never shorter than the server's Retry-After). 429, 5xx, timeouts
and connection errors are retried; 401/403/404 and exhausted retries raise `ServerUnavailable` (the run stops,
resumably: every batch it submitted is in the journal); another 4xx raises `BatchRejected` (that batch fails, its
requests are retried). `circuit_breaker_failures` transport failures in a row stop the run too.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import httpx2

from datatailor.errors import ServerUnavailable
from datatailor.llm.config import OpenAIModel
from datatailor.llm.openai import _server_message, parse_retry_after

# Longest one upload or download of a batch file may take (OpenAI's files are up to 200 MB).
TRANSFER_TIMEOUT_S = 1800.0
# Pages of the account's batch list read to find a batch whose creation was not recorded (100 batches a page).
MAX_LIST_PAGES = 50


class BatchRejected(Exception):
    """The server refused one batch request (a 4xx other than 401/403/404/408/409/429)."""


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BatchClient:
    def __init__(self, config: OpenAIModel, *, transport: httpx2.AsyncBaseTransport | None = None):
        self.config = config
        self.base_url = config.base_urls[0]
        headers = {"Accept": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ServerUnavailable(
                    f"model {config.model!r} at {self.base_url}: environment variable {config.api_key_env} is not set; "
                    "put the API key in it (or set `api_key_env: null` for a server that needs no key)"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx2.AsyncClient(
            headers=headers, transport=transport,
            timeout=httpx2.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0)),
        )
        self._rng = random.Random()
        self._failures_in_a_row = 0
        self.calls = 0  # HTTP attempts, for tests and benchmarks

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the endpoints ----------------------------------------------------------------------------

    async def upload(self, path: Path) -> str:
        async def send() -> httpx2.Response:
            with path.open("rb") as fh:
                return await self._client.post(f"{self.base_url}/files", data={"purpose": "batch"},
                                               files={"file": (path.name, fh, "application/jsonl")})

        data = await self._call(f"upload {path.name}", send, TRANSFER_TIMEOUT_S)
        return str(data["id"])

    async def create(self, file_id: str, window: str, tag_key: str, tag: str) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window,
                "metadata": {tag_key: tag}}
        return await self._call(f"create batch {tag}", lambda: self._client.post(f"{self.base_url}/batches", json=body))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._call(f"status of batch {batch_id}", lambda: self._client.get(f"{self.base_url}/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call(f"cancel batch {batch_id}", lambda: self._client.post(f"{self.base_url}/batches/{batch_id}/cancel"))

    async def find(self, tag_key: str, tag: str, since: float) -> dict[str, Any] | None:
        """The account's batch whose metadata carries `tag`, looking back to batches created an hour before `since`."""
        after: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self._call("list batches", lambda p=params: self._client.get(f"{self.base_url}/batches", params=p))
            rows = page.get("data") or []
            for row in rows:
                if (row.get("metadata") or {}).get(tag_key) == tag:
                    return row
            oldest = min((r.get("created_at") or 0 for r in rows), default=0)
            if not page.get("has_more") or not rows or oldest < since - 3600:
                return None
            after = rows[-1].get("id")
        return None

    async def download(self, file_id: str, path: Path) -> None:
        """A file's content into `path`, atomically (a temp file renamed once complete)."""
        url = f"{self.base_url}/files/{file_id}/content"

        async def fetch() -> httpx2.Response:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    async with self._client.stream("GET", url) as response:
                        if response.status_code != 200:
                            await response.aread()
                            return response
                        async for chunk in response.aiter_bytes():
                            fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
                return response
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        await self._call(f"download {file_id}", fetch, TRANSFER_TIMEOUT_S, json_reply=False)

    # -- retries ------------------------------------------------------------------------------------

    async def _call(self, what: str, send: Any, timeout_s: float | None = None, json_reply: bool = True) -> Any:
        attempts = self.config.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                return await self._attempt(what, send, timeout_s or self.config.timeout_s, json_reply)
            except _Retry as retry:
                last = str(retry)
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= self.config.circuit_breaker_failures:
                    raise ServerUnavailable(f"{self.base_url} looks down: {self._failures_in_a_row} batch API calls in a row "
                                            f"failed; last: {what}: {last}. Re-run to resume: submitted batches are kept") from None
                if attempt + 1 < attempts:
                    cap = min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * 2 ** attempt)
                    delay = self._rng.uniform(0.0, cap)
                    if retry.retry_after is not None:
                        delay = max(delay, min(retry.retry_after, self.config.retry_after_max_s))
                    await asyncio.sleep(delay)
        raise ServerUnavailable(f"{self.base_url}: {what} failed after {attempts} attempt(s); last error: {last}. "
                                "Re-run to resume: submitted batches are kept")

    async def _attempt(self, what: str, send: Any, timeout_s: float, json_reply: bool) -> Any:
        self.calls += 1
        try:
            async with asyncio.timeout(timeout_s):
                response = await send()
        except (httpx2.TimeoutException, TimeoutError):
            raise _Retry(f"no reply within {timeout_s:g} s") from None
        except httpx2.RequestError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc or 'connection failed'}") from None
        status = response.status_code
        if 200 <= status < 300:
            self._failures_in_a_row = 0
            if not json_reply:
                return None
            try:
                return json.loads(response.content)
            except ValueError:
                raise _Retry(f"HTTP {status} with a body that is not JSON") from None
        message = f"HTTP {status}: {_server_message(response)}"
        if status == 429 or status >= 500 or status in (408, 409):
            raise _Retry(message, parse_retry_after(response.headers))
        self._failures_in_a_row = 0
        if status in (401, 403):
            where = f"check the key in ${self.config.api_key_env}" if self.config.api_key_env else "the server wants a key"
            raise ServerUnavailable(f"{self.base_url} refused the API key for {what} ({message}); {where}")
        if status == 404:
            raise ServerUnavailable(
                f"{self.base_url}: {what}: {message}. Does this server have the files and batches endpoints? If not, "
                "set `batch: false` for this role (or run without --batch)"
            )
        raise BatchRejected(f"{what}: {message}")
