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
    """A small key -> Completion store shared by all models of a run (safe across threads and processes).

    One SQLite file in WAL mode serves every process of one machine. WAL is not safe on a network filesystem,
    so processes on several machines use `writer`: each writes only its own file beside the main one
    (`requests.<writer>.sqlite`) and reads its own, the main file and every other writer's file."""

    def __init__(self, path: Path | str | None = None, writer: str | None = None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self._lock = threading.Lock()
        own = self.path if writer is None else self.path.with_name(f"{self.path.stem}.{writer}{self.path.suffix}")
        self._db = self._open(own)
        self._others: dict[Path, sqlite3.Connection] = {}

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.commit()
        return db

    def _readers(self) -> list[sqlite3.Connection]:
        """Per-writer mode: the main file and the other writers' files, opened read-only as they appear."""
        if self.writer is None:
            return []
        own = f"{self.path.stem}.{self.writer}{self.path.suffix}"
        for p in [self.path, *sorted(self.path.parent.glob(f"{self.path.stem}.*{self.path.suffix}"))]:
            if p.name != own and p not in self._others and p.exists():
                self._others[p] = sqlite3.connect(f"file:{p}?mode=ro", uri=True, check_same_thread=False, timeout=30)
        return list(self._others.values())

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM completions WHERE key = ?", (key,)).fetchone()
            if row is None:
                for db in self._readers():
                    try:
                        row = db.execute("SELECT value FROM completions WHERE key = ?", (key,)).fetchone()
                    except sqlite3.OperationalError:  # a writer's file still being created
                        row = None
                    if row is not None:
                        break
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
            for db in self._others.values():
                db.close()
            self._others.clear()
