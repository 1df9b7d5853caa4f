"""The mock server's files and batches endpoints (OpenAI's Batch API), for tests and benchmarks of `batch: true`.

    POST /v1/files                   upload (multipart: purpose, file)   GET /v1/files/{id}[/content]
    POST /v1/batches                 create {input_file_id, endpoint, completion_window, metadata}
    GET  /v1/batches[?after=&limit=] list, newest first                  GET /v1/batches/{id}
    POST /v1/batches/{id}/cancel     cancel

A batch is `in_progress` for `batch_delay_s` after it is created, then ends at once: every line is answered as the
chat endpoint would answer it (same replies, same usage), except

* `batch_error_rate`: a request gets an error line (status `batch_error_status`, 500 by default) in the error file,
  drawn per (seed, custom_id, times that custom_id was seen), so a retried request gets a fresh draw;
* `batch_expire`: the first N batches created expire: the first half of their lines are answered, the rest get a
  `batch_expired` error line;
* `batch_fail`: the first N batches created fail validation (status `failed`, no output at all).

`stats` counts what it did: batches_created, batch_lines (requests received), batch_answered (200 lines),
batch_errors, batches_expired, batches_failed, batches_cancelled, files_uploaded, batch_answered_again (a custom_id
answered by more than one batch: work paid twice), and the billed batch_prompt_tokens / batch_completion_tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from datatailor.testing.mock_openai import MockOpenAIServer, _Connection

ENDED = ("completed", "failed", "expired", "cancelled")


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, content) of a multipart/form-data body."""
    boundary = next((p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")), None)
    if not boundary:
        raise ValueError("multipart body without a boundary")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode("latin-1").split("\r\n") if line.lower().startswith("content-disposition")), "")
        fields = dict(p.strip().split("=", 1) for p in disposition.split(";")[1:] if "=" in p)
        name = fields.get("name", "").strip('"')
        filename = fields["filename"].strip('"') if "filename" in fields else None
        parts[name] = (filename, content[:-2] if content.endswith(b"\r\n") else content)
    return parts


class BatchEndpoints:
    """State and routes of the files and batches endpoints of one `MockOpenAIServer`."""

    def __init__(self, server: "MockOpenAIServer"):
        self.server = server
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._answered: set[str] = set()
        self._seen: dict[str, int] = {}

    def handles(self, route: str) -> bool:
        return "/files" in route or "/batches" in route

    def handle(self, conn: "_Connection", method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        route, _, query = path.partition("?")
        parts = [p for p in route.split("/") if p and p != "v1"]
        try:
            status, payload = self._route(method, parts, parse_qs(query), headers, body)
        except (ValueError, KeyError, TypeError) as exc:
            status, payload = 400, {"error": {"message": f"bad request: {exc}"}}
        if isinstance(payload, bytes):
            conn.send(status, payload)
        else:
            conn.send(status, json.dumps(payload).encode())

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]], headers: dict[str, str],
               body: bytes) -> tuple[int, Any]:
        if parts[:1] == ["files"]:
            if method == "POST" and len(parts) == 1:
                return self._upload(headers.get("content-type", ""), body)
            if method == "GET" and len(parts) >= 2 and parts[1] in self.files:
                f = self.files[parts[1]]
                if len(parts) == 3 and parts[2] == "content":
                    return 200, f["content"]
                return 200, {k: v for k, v in f.items() if k != "content"}
        if parts[:1] == ["batches"]:
            if method == "POST" and len(parts) == 1:
                return self._create(json.loads(body))
            if method == "GET" and len(parts) == 1:
                return 200, self._list(query)
            if len(parts) >= 2 and parts[1] in self.batches:
                batch = self.batches[parts[1]]
                if method == "GET" and len(parts) == 2:
                    return 200, self._public(batch)
                if method == "POST" and parts[2:] == ["cancel"]:
                    return 200, self._cancel(batch)
        return 404, {"error": {"message": f"no route {method} /v1/{'/'.join(parts)}"}}

    # -- files ---------------------------------------------------------------------------------------

    def _upload(self, content_type: str, body: bytes) -> tuple[int, Any]:
        form = parse_multipart(content_type, body)
        if "file" not in form:
            return 400, {"error": {"message": "no `file` in the upload"}}
        return 200, self._new_file(form["file"][0] or "upload.jsonl", form["file"][1],
                                   (form.get("purpose") or (None, b"batch"))[1].decode())

    def _new_file(self, name: str, content: bytes, purpose: str) -> dict[str, Any]:
        file_id = f"file-mock-{len(self.files) + 1}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": name, "purpose": purpose, "content": content}
        self.server.stats["files_uploaded" if purpose == "batch" else "files_written"] += 1
        return {k: v for k, v in self.files[file_id].items() if k != "content"}

    # -- batches -------------------------------------------------------------------------------------

    def _create(self, request: dict[str, Any]) -> tuple[int, Any]:
        source = self.files.get(request.get("input_file_id", ""))
        if source is None:
            return 400, {"error": {"message": f"no file {request.get('input_file_id')!r}"}}
        if request.get("endpoint") != "/v1/chat/completions":
            return 400, {"error": {"message": f"unsupported endpoint {request.get('endpoint')!r}"}}
        lines = [json.loads(line) for line in source["content"].splitlines() if line.strip()]
        n = len(self.batches) + 1
        batch_id = f"batch_mock_{n}"
        now = int(time.time())
        c = self.server.config
        batch = {
            "id": batch_id, "object": "batch", "endpoint": request["endpoint"], "input_file_id": source["id"],
            "completion_window": request.get("completion_window", "24h"), "status": "in_progress",
            "output_file_id": None, "error_file_id": None, "created_at": now, "errors": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": request.get("metadata") or {}, "_lines": lines,
            "_fate": "failed" if n <= c.batch_fail else "expired" if n <= c.batch_fail + c.batch_expire else "completed",
        }
        self.batches[batch_id] = batch
        self.server.stats["batches_created"] += 1
        self.server.stats["batch_lines"] += len(lines)
        loop = self.server._loop
        assert loop is not None
        batch["_timer"] = loop.call_later(c.batch_delay_s, self._finish, batch)
        return 200, self._public(batch)

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        rows = sorted(self.batches.values(), key=lambda b: int(b["id"].rsplit("_", 1)[1]), reverse=True)
        after = (query.get("after") or [None])[0]
        if after is not None:
            ids = [b["id"] for b in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        limit = int((query.get("limit") or ["20"])[0])
        page = rows[:limit]
        return {"object": "list", "data": [self._public(b) for b in page], "has_more": len(rows) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

    def _cancel(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] not in ENDED:
            batch["_timer"].cancel()
            batch["status"] = "cancelled"
            batch["cancelled_at"] = int(time.time())
            self.server.stats["batches_cancelled"] += 1
        return self._public(batch)

    def _public(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _finish(self, batch: dict[str, Any]) -> None:
        stats = self.server.stats
        fate, lines = batch["_fate"], batch["_lines"]
        if fate == "failed":
            batch.update(status="failed", errors={"object": "list", "data": [{"code": "invalid_request", "message": "injected validation failure"}]})
            stats["batches_failed"] += 1
            return
        answered = len(lines) // 2 if fate == "expired" else len(lines)
        out: list[bytes] = []
        errors: list[bytes] = []
        for i, line in enumerate(lines):
            cid = line["custom_id"]
            row: dict[str, Any] = {"id": f"batch_req_{batch['id']}_{i}", "custom_id": cid, "error": None}
            if i >= answered:
                row.update(response=None, error={"code": "batch_expired", "message": "not executed before the window expired"})
                errors.append(json.dumps(row).encode())
            elif self._draw_error(cid):
                status = self.server.config.batch_error_status
                row["response"] = {"status_code": status, "body": {"error": {"message": f"error {status} (injected)", "type": "mock"}}}
                stats["batch_errors"] += 1
                errors.append(json.dumps(row).encode())
            else:
                payload = self.server.completion_payload(line["body"])
                row["response"] = {"status_code": 200, "request_id": row["id"], "body": payload}
                stats["batch_answered"] += 1
                stats["batch_prompt_tokens"] += payload.get("usage", {}).get("prompt_tokens", 0)
                stats["batch_completion_tokens"] += payload.get("usage", {}).get("completion_tokens", 0)
                if cid in self._answered:
                    stats["batch_answered_again"] += 1
                self._answered.add(cid)
                out.append(json.dumps(row).encode())
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}
        if out:
            batch["output_file_id"] = self._new_file(f"{batch['id']}_output.jsonl", b"\n".join(out) + b"\n", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._new_file(f"{batch['id']}_errors.jsonl", b"\n".join(errors) + b"\n", "batch_output")["id"]
        batch["status"] = "expired" if fate == "expired" else "completed"
        stats["batches_expired" if fate == "expired" else "batches_completed"] += 1

    def _draw_error(self, cid: str) -> bool:
        rate = self.server.config.batch_error_rate
        if rate <= 0:
            return False
        seen = self._seen.get(cid, 0)
        self._seen[cid] = seen + 1
        digest = hashlib.blake2b(cid.encode(), digest_size=8).hexdigest()
        return random.Random(f"{self.server.config.seed}:{digest}:{seen}").random() < rate
