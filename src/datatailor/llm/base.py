"""The request/response types every backend speaks, and the Backend protocol.

A backend turns one `CompletionRequest` into one `Completion`. It owns transport concerns only:
connections, admission (concurrency, backpressure), transport retries and timeouts. Caching,
usage, budget and structured-output repair live in `llm.models.RoleModel`, above every backend.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """Sampling parameters of one call. Every field takes part in the cache key."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = 0
    stop: list[str] = Field(default_factory=list)
    # Ask for the log-probabilities of this many alternatives at each generated position (where the
    # backend exposes them: llama.cpp, transformers, OpenAI `logprobs`); None asks for none.
    top_logprobs: int | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message]
    sampling: Sampling = Field(default_factory=Sampling)
    # A JSON schema the reply must follow; backends with native constraints enforce it.
    json_schema: dict[str, Any] | None = None
    # The prompt template that produced `messages` (its name, e.g. "codec/encode.j2"), for routing in
    # scripted test models and for logs. Not sent to any server and not part of any cache key: the
    # template's content hash is.
    template: str | None = None
    # The variables the template was rendered with, for scripted test models (excluded from dumps, never sent).
    variables: dict[str, Any] | None = Field(None, exclude=True)


class PositionLogprobs(BaseModel):
    """One generated token with its log-probability and those of the most likely alternatives."""

    model_config = ConfigDict(extra="forbid")

    token: str
    logprob: float
    top: dict[str, float] = Field(default_factory=dict)


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # "stop" (the model ended), "length" (cut by max_tokens: the text is truncated), or what the server said.
    finish_reason: str | None = None
    logprobs: list[PositionLogprobs] | None = None
    # The provider batch that answered (llm/batch); None for an online reply. Priced at the batch price, and
    # named in the lineage of the records that used the reply.
    batch_id: str | None = None


# Which stage and record a model call is made for ("stage:record id"), set by the runner around each record's work.
# The batch journal writes it beside each request (llm/batch), so a run directory says which record waits on which batch.
CALL_OWNER: ContextVar[str | None] = ContextVar("datatailor_call_owner", default=None)


@runtime_checkable
class Backend(Protocol):
    """One model behind one async interface.

    A backend may also set `batched = True` (llm/batch): its calls wait for a provider batch, so `RoleModel` does not
    hold them to the model's `max_concurrency`, and stages using it keep many records in flight.
    """

    # True when the backend constrains output to `json_schema` itself (grammar, guided decoding).
    native_json_schema: bool

    async def complete(self, request: CompletionRequest) -> Completion: ...

    async def aclose(self) -> None: ...


class TokenLogprobs(BaseModel):
    """Per-token log-likelihood of a given response under a model (membership-inference input)."""

    tokens: list[str]
    logprobs: list[float]

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / max(1, len(self.logprobs))
