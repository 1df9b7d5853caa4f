"""`--out s3://…` (any fsspec URL): the driver works in a local staging folder mirrored to the object store.

The runner's code stays the one of a local run: it reads and writes the staging folder
(`$DATATAILOR_STAGING_DIR`, default `~/.cache/datatailor/staging/<hash of the URL>`). `StagedRun` mirrors it:

* `pull()` before the run: when the staging folder is the one that last wrote to the URL (the same token in
  both `.mirror.json`), it is at least as new and is kept; otherwise it is discarded and the run directory is
  downloaded (a resume on another machine).
* `push()` every `sync_s` seconds while the run goes on, after the driver merges its workers' parts, and at the
  end: files that changed are uploaded whole at their own path (manifest.json, data.jsonl, reports…); journals
  (a stage's outputs.jsonl and failures.jsonl, spend logs) as write-once segments of what was appended since the
  last push (`storage.RunStore`), so a 10 GB journal is never uploaded twice. A driver killed between two pushes
  loses nothing on its own machine; elsewhere the run resumes from the last push.

Ray workers never see the staging folder: they read their shards from, and write their part objects and spend
logs to, the object store directly (`executors.worker`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from datatailor.storage import LOG, JournalPusher, RunStore

STATE = ".mirror.json"


def staging_root() -> Path:
    env = os.environ.get("DATATAILOR_STAGING_DIR")
    return Path(env) if env else Path.home() / ".cache" / "datatailor" / "staging"


def run_key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def is_journal(rel: str) -> bool:
    """Append-only files, stored as segments: a stage's journals and the spend logs."""
    name = rel.rsplit("/", 1)[-1]
    return rel.endswith(".jsonl") and ((rel.startswith("stages/") and name != "records.jsonl") or rel.startswith("usage/"))


def mirrored(rel: str) -> bool:
    """What the driver mirrors: not its temp files, not what workers write to the store themselves."""
    parts = rel.split("/")
    name = parts[-1]
    if name == STATE or (name.startswith(".") and name.endswith(".tmp")) or name.endswith(".tmp"):
        return False
    return not (len(parts) > 2 and parts[0] == "stages" and parts[2] in ("parts", "shards"))


class StagedRun:
    """A run directory at a URL, worked on in a local staging folder."""

    def __init__(self, url: str, sync_s: float = 30.0):
        self.url = url.rstrip("/")
        self.store = RunStore(self.url)
        self.local = staging_root() / run_key(self.url)
        self.sync_s = sync_s
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._last_push = 0.0

    # -- state ----------------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.local / STATE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_state(self) -> None:
        tmp = self.local / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self._state), encoding="utf-8")
        os.replace(tmp, self.local / STATE)

    # -- pull -----------------------------------------------------------------------------------------

    def pull(self) -> str:
        """Make the staging folder hold the run at the URL. Returns what was done: kept, new or downloaded."""
        remote = json.loads(self.store.read_bytes(STATE) or b"{}")
        local = self._load_state()
        if local and remote.get("token") and local.get("token") == remote.get("token"):
            self._state = local
            return "kept"
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        self._state = {"token": uuid.uuid4().hex, "files": {}}
        listing = self.store.list("")
        if not listing:
            self.store.write_bytes(STATE, json.dumps({"token": self._state["token"]}).encode())
            self._save_state()
            return "new"
        journals: set[str] = set()
        for rel in listing:
            if LOG + "/" in rel:
                journals.add(rel.split(LOG + "/", 1)[0])
            elif mirrored(rel) and not rel.startswith("usage/"):
                target = self.local / rel
                self.store.download(rel, target)  # streamed: data.jsonl may be gigabytes
                st = target.stat()
                self._state["files"][rel] = {"kind": "whole", "inode": st.st_ino, "size": st.st_size, "mtime": st.st_mtime_ns}
        for rel in sorted(journals):
            if not mirrored(rel) or rel.startswith("usage/"):
                continue  # workers' parts and every spend log are read from the store where they are
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as fh:
                for chunk in self.store.journal_chunks(rel):
                    fh.write(chunk)
            generation, _ = self.store.journal_end(rel)
            self._state["files"][rel] = {"kind": "journal", "gen": generation, "at": target.stat().st_size,
                                         "inode": target.stat().st_ino}
        # A new token at once: a staging folder elsewhere that still holds the old one must not be trusted now.
        self.store.write_bytes(STATE, json.dumps({"token": self._state["token"]}).encode())
        self._save_state()
        return "downloaded"

    # -- push -----------------------------------------------------------------------------------------

    def due(self) -> bool:
        return time.monotonic() - self._last_push >= self.sync_s

    def push(self) -> int:
        """Upload what changed since the last push; returns the bytes uploaded."""
        with self._lock:
            files: dict[str, Any] = self._state.setdefault("files", {})
            sent = 0
            present: set[str] = set()
            for path in sorted(self.local.rglob("*")):
                rel = path.relative_to(self.local).as_posix()
                if not path.is_file() or not mirrored(rel):
                    continue
                present.add(rel)
                try:
                    if is_journal(rel):
                        pusher = JournalPusher(self.store, path, rel, files.get(rel) if (files.get(rel) or {}).get("kind") == "journal" else None)
                        sent += pusher.push()
                        files[rel] = pusher.state()
                        continue
                    st = path.stat()
                    known = files.get(rel) or {}
                    if (known.get("inode"), known.get("size"), known.get("mtime")) == (st.st_ino, st.st_size, st.st_mtime_ns):
                        continue
                    self.store.put_file(path, rel)
                    sent += st.st_size
                    files[rel] = {"kind": "whole", "inode": st.st_ino, "size": st.st_size, "mtime": st.st_mtime_ns}
                except FileNotFoundError:  # replaced or removed while we looked: the next push takes it
                    present.discard(rel)
            for rel in [r for r in files if r not in present]:
                self.store.delete(rel + LOG if files[rel].get("kind") == "journal" else rel)
                del files[rel]
            self.store.write_bytes(STATE, json.dumps({"token": self._state["token"]}).encode())
            self._save_state()
            self._last_push = time.monotonic()
            return sent
