"""The embedded backend: a GGUF model run in-process by llama-cpp-python.

One `Llama` object is not thread-safe, so every call holds one lock around it; calls run in a
worker thread (`asyncio.to_thread`) so the event loop keeps serving the rest of the run while the
model generates. The model loads on the first call. Structured output is native: llama.cpp turns
the JSON schema into a grammar that constrains sampling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from datatailor.errors import LLMCallFailure, UserError
from datatailor.llm.base import Completion, CompletionRequest
from datatailor.llm.config import LlamaCppModel
from datatailor.llm.local_models import INSTALL_HINT, is_local_name, resolve_local_model

log = logging.getLogger(__name__)


def resolve_gguf(model: str) -> Path:
    """A `local:` name or a path → an existing GGUF file."""
    if is_local_name(model):
        return resolve_local_model(model)
    path = Path(model).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF model file not found: {model} (give a path or a local: name; see `datatailor models list`)")
    return path


class LlamaCppBackend:
    native_json_schema = True

    def __init__(self, config: LlamaCppModel):
        self.config = config
        self._llm: Any = None
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    def _load(self) -> Any:
        """Called with the lock held."""
        if self._llm is not None:
            return self._llm
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}") from None
        path = resolve_gguf(self.config.model)
        start = time.perf_counter()
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=self.config.n_ctx,
                n_threads=self.config.n_threads or os.cpu_count() or 1,
                chat_format=self.config.effective_chat_format(),
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python reports an unreadable model as ValueError
            raise UserError(f"cannot load GGUF model {path}: {exc}") from None
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s (%s) in %.1f s", self.config.model, path, self.load_seconds)
        return self._llm

    def _complete_sync(self, request: CompletionRequest) -> Completion:
        s = request.sampling
        kwargs: dict[str, Any] = {
            "messages": [m.model_dump() for m in request.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "stop": s.stop or None,
        }
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if request.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}
        with self._lock:
            llm = self._load()
            try:
                response = llm.create_chat_completion(**kwargs)
            except ValueError as exc:
                message = str(exc)
                if "context window" in message:
                    raise LLMCallFailure(
                        f"{self.config.model}: the prompt does not fit the context window "
                        f"(n_ctx={self.config.n_ctx}): {message}",
                        kind="prompt_too_long",
                    ) from None
                raise LLMCallFailure(f"{self.config.model}: {message}") from None
            except RuntimeError as exc:  # llama_decode failures surface as RuntimeError
                raise LLMCallFailure(f"{self.config.model}: generation failed: {exc}") from None
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason"),
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        return await asyncio.to_thread(self._complete_sync, request)

    def _close(self) -> None:
        with self._lock:  # waits for a call in progress
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)
