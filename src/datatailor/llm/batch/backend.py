"""`BatchedBackend`: the `Backend` of a role with `batch: true`. Each call waits for the batch that answers it.

It encodes the request exactly as the online backend would (the body of one batch input line), names it by a
custom_id derived from that body, and hands it to the run's `BatchHub`. The custom_id is a hash of everything the
server sees (model, messages, sampling, seed, schema, extra_body), so a resumed run that asks the same request
again finds it in the batch it was already submitted in, and identical requests in flight are sent once.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from datatailor.llm.base import Completion, CompletionRequest
from datatailor.llm.batch.hub import BatchHub
from datatailor.llm.config import OpenAIModel
from datatailor.llm.openai import OpenAIBackend, encode_body

# Worst-case prompt tokens: one token per 3 characters (English text averages about 4) plus a few per message for
# the chat format. The completion's worst case is exact: max_tokens.
CHARS_PER_TOKEN_WORST = 3
TOKENS_PER_MESSAGE = 4


def custom_id(body: dict[str, Any]) -> str:
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "dt-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:40]


def worst_case(config: OpenAIModel, request: CompletionRequest) -> tuple[float, int]:
    """The most ($, tokens) one request can cost at the batch price: its prompt (estimated with a margin, see above)
    and a reply of `max_tokens`."""
    chars = sum(len(m.content) for m in request.messages)
    if request.json_schema is not None:
        chars += len(json.dumps(request.json_schema))
    prompt = math.ceil(chars / CHARS_PER_TOKEN_WORST) + TOKENS_PER_MESSAGE * len(request.messages)
    completion = request.sampling.max_tokens
    p_in, p_out = config.batch_prices()
    return (prompt * p_in + completion * p_out) / 1e6, prompt + completion


class BatchedBackend:
    """Chat completions through the provider's batch API (see llm/batch/__init__.py)."""

    batched = True

    def __init__(self, config: OpenAIModel, hub: BatchHub, *, transport: Any = None):
        self.config = config
        self.native_json_schema = config.json_mode != "none"
        self.hub = hub
        self.endpoint = hub.endpoint(config, transport)  # a missing key variable fails here, before any request
        self._transport = transport
        self._online_backend: OpenAIBackend | None = None

    async def complete(self, request: CompletionRequest) -> Completion:
        body = encode_body(self.config, request)
        cid = custom_id(body)
        line = json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body},
                          ensure_ascii=False) + "\n"
        return await self.hub.call(self.endpoint, cid, line, request, worst_case(self.config, request), self.config, self._online)

    async def _online(self, request: CompletionRequest) -> Completion:
        """`batch_fallback: online`: the request, sent online (priced online)."""
        if self._online_backend is None:
            self._online_backend = OpenAIBackend(self.config, transport=self._transport)
        return await self._online_backend.complete(request)

    async def aclose(self) -> None:
        if self._online_backend is not None:
            await self._online_backend.aclose()
            self._online_backend = None
