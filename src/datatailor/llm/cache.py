"""Persistent request cache (SQLite).

The key covers everything that can change a reply: the model's identity, the messages, the sampling
parameters, the JSON schema and the hash of the prompt template that produced the messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from datatailor.llm.base import Completion, CompletionRequest


def default_cache_path() -> Path:
    root = os.environ.get("DATATAILOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "datatailor"
    )
    return Path(root) / "requests.sqlite"


def cache_key(identity: dict[str, Any], request: CompletionRequest, template_hash: str | None) -> str:
    sampling = request.sampling.model_dump()
    if sampling.get("top_logprobs") is None:
        del sampling["top_logprobs"]  # keys of requests that ask for no logprobs stay as they were
    payload = {
        "model": identity,
        "messages": [m.model_dump() for m in request.messages],
        "sampling": sampling,
        "schema": request.json_schema,
        "template": template_hash,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def request_key(request: CompletionRequest) -> str:
    """Key of a request alone (no model identity, no template): what recordings are replayed by."""
    return cache_key({}, request, None)


class RequestCache:
    """A small key -> Completion store shared by all models of a run (safe across threads/processes)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        self._db.commit()

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM completions WHERE key = ?", (key,)).fetchone()
        return Completion.model_validate_json(row[0]) if row else None

    def put(self, key: str, completion: Completion) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO completions (key, value) VALUES (?, ?)",
                (key, completion.model_dump_json()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
