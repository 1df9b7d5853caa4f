"""Model entries of a recipe: one validated config class per backend, selected by `backend`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from datatailor.llm.base import Sampling


class _ModelBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model name as the backend knows it, or a `local:` packaged model.")
    max_concurrency: int = Field(4, ge=1, description="Most requests in flight at once for this model.")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = Field(0, description="Base sampling seed; each call derives its own from it.")
    price_per_mtok_in: float = Field(0.0, ge=0.0, description="$ per million prompt tokens.")
    price_per_mtok_out: float = Field(0.0, ge=0.0, description="$ per million completion tokens.")
    max_parse_retries: int = Field(2, ge=0, description="Re-asks after a reply that does not parse.")
    record_to: str | None = Field(
        None, description="Append every real (non-cached) exchange to this JSONL, for scripted replay."
    )

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, seed=self.seed
        )

    def identity(self, base_dir: Path | None = None) -> dict[str, Any]:
        """What makes two model entries the same model for the request cache (see `llm.fingerprint`)."""
        from datatailor.llm.fingerprint import model_identity

        return model_identity(self, base_dir)


# How a role is paid and delivered, not what it answers: left out of the request cache key and of the recipe's hash.
BATCH_SETTINGS = (
    "batch", "batch_discount", "batch_price_per_mtok_in", "batch_price_per_mtok_out", "batch_fallback", "batch_max_attempts",
    "batch_max_requests", "batch_max_bytes", "batch_collect_s", "batch_collect_max_s", "batch_poll_s", "batch_poll_max_s",
    "batch_completion_window", "batch_wait_margin_s", "batch_records_in_flight",
)


class OpenAIModel(_ModelBase):
    """Any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp server, Ollama, TGI)."""

    backend: Literal["openai"] = "openai"
    base_url: str | list[str] = Field(
        "https://api.openai.com/v1",
        description="The server's URL, or a list of replicas serving the same model: requests go round-robin over them.",
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the key (never the key)."
    )
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    circuit_breaker_failures: int = Field(
        8, ge=1, description="Consecutive transport failures after which the run stops."
    )
    retry_backoff_s: float = Field(
        0.5, gt=0, description="Base of the exponential backoff between retries (full jitter): attempt n waits up to base·2^n."
    )
    retry_backoff_max_s: float = Field(20.0, gt=0, description="Longest backoff between two retries.")
    retry_after_max_s: float = Field(
        120.0, ge=0, description="Longest server `Retry-After` honoured; a longer one is cut to this."
    )
    json_mode: Literal["json_schema", "json_object", "guided_json", "none"] = Field(
        "json_schema",
        description=(
            "How to ask the server for structured output: OpenAI response_format json_schema; "
            "json_object with a `schema` (llama-cpp-python server, Anyscale/Together style); "
            "vLLM guided_json; or not at all (the schema goes into the prompt and the reply is parsed)."
        ),
    )
    extra_body: dict[str, Any] = Field(default_factory=dict)
    revision: str | None = Field(
        None,
        description=(
            "What the server serves under `model` (a checkpoint tag, a date, a commit): part of the request cache's "
            "key, so answers cached from an older deployment of the same name are not reused."
        ),
    )

    # -- the provider's batch API (llm/batch, docs/batch.md) ------------------------------------------------------
    batch: bool = Field(
        False,
        description=(
            "Send this role's requests through the provider's batch API (POST /v1/files + /v1/batches): about half "
            "the price, results within `batch_completion_window`. Checkpointed in the run directory's `batches/`."
        ),
    )
    batch_discount: float = Field(
        0.5, gt=0.0, le=1.0, description="Batch price as a share of the online price (OpenAI: 0.5), unless batch prices are given."
    )
    batch_price_per_mtok_in: float | None = Field(None, ge=0.0, description="$ per million prompt tokens in a batch.")
    batch_price_per_mtok_out: float | None = Field(None, ge=0.0, description="$ per million completion tokens in a batch.")
    batch_fallback: Literal["none", "online"] = Field(
        "none",
        description=(
            "What becomes of a request that comes back with a retryable error or from an expired/failed batch: "
            "none: it goes into a new batch (up to `batch_max_attempts` batches); online: it is sent online at once."
        ),
    )
    batch_max_attempts: int = Field(3, ge=1, description="Batches one request may go through before its record fails.")
    batch_max_requests: int = Field(50_000, ge=1, description="Most requests in one batch input file (OpenAI: 50,000).")
    batch_max_bytes: int = Field(200_000_000, ge=1024, description="Largest batch input file in bytes (OpenAI: 200 MB).")
    batch_collect_s: float = Field(
        1.5, gt=0.0, description="A batch is sent once no new request arrived for this long (or it is full)."
    )
    batch_collect_max_s: float = Field(
        60.0, gt=0.0, description="...or once its first request has waited this long, even while requests keep coming."
    )
    batch_poll_s: float = Field(10.0, gt=0.0, description="First wait between two status checks of a batch.")
    batch_poll_max_s: float = Field(300.0, gt=0.0, description="Longest wait between two status checks (the wait grows ×1.5).")
    batch_completion_window: str = Field("24h", pattern=r"^[1-9][0-9]*h$", description="The batch's completion window (OpenAI: 24h).")
    batch_wait_margin_s: float = Field(
        3600.0, ge=0.0,
        description=(
            "A batch still unfinished this long after its completion window has passed is cancelled and its "
            "unanswered requests retried (the bound on waiting for one batch)."
        ),
    )
    batch_records_in_flight: int = Field(
        10_000, ge=1,
        description=(
            "Records a stage that uses this role keeps in flight (instead of its `concurrency`), so that one "
            "batch gathers many requests; memory grows with it (about 20 KB per REFED record)."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _some_url(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one URL")
        return value

    @model_validator(mode="after")
    def _one_server_for_batches(self) -> "OpenAIModel":
        if self.batch and len(self.base_urls) > 1:
            raise ValueError("batch: true needs one base_url (a batch's files live on one server), not a list of replicas")
        return self

    @model_serializer(mode="wrap")
    def _drop_default_batch_settings(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Recipes that do not batch dump (and hash) as before the batch settings existed, so their runs still resume.
        data = handler(self)
        for name in BATCH_SETTINGS:
            if name in data and data[name] == type(self).model_fields[name].default:
                del data[name]
        return data

    def batch_prices(self) -> tuple[float, float]:
        """$ per million (prompt, completion) tokens of a batched request."""
        p_in = self.batch_price_per_mtok_in if self.batch_price_per_mtok_in is not None else self.price_per_mtok_in * self.batch_discount
        p_out = self.batch_price_per_mtok_out if self.batch_price_per_mtok_out is not None else self.price_per_mtok_out * self.batch_discount
        return p_in, p_out

    @property
    def batch_window_s(self) -> float:
        return float(self.batch_completion_window[:-1]) * 3600.0

    @property
    def base_urls(self) -> list[str]:
        return [u.rstrip("/") for u in ([self.base_url] if isinstance(self.base_url, str) else self.base_url)]


class LlamaCppModel(_ModelBase):
    """A GGUF model run in-process by llama-cpp-python. `model` is a path or a `local:` name."""

    backend: Literal["llamacpp"] = "llamacpp"
    max_concurrency: int = Field(1, ge=1)
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = Field(
        None, ge=1,
        description="CPU threads; default: half the CPUs this process may use (at least 1). More threads than free cores "
        "make llama.cpp's threads wait on each other: on a busy 2-core machine 2 threads ran 4-8x slower than 1.",
    )
    timeout_s: float = Field(600.0, gt=0, description="Longest one call may generate; past it the call fails as `timeout`.")
    chat_format: str | None = Field(
        None, description="llama.cpp chat format; default: the GGUF's own template (for `local:gemma-3-270m`: gemma)."
    )

    def effective_chat_format(self) -> str | None:
        if self.chat_format is None and self.model.startswith("local:"):
            from datatailor.llm.local_models import LOCAL_MODELS

            spec = LOCAL_MODELS.get(self.model.removeprefix("local:"))
            return spec.chat_format if spec else None
        return self.chat_format


class HFModel(_ModelBase):
    """A transformers model: an HF directory, an adapter directory, or a `local:` GGUF."""

    backend: Literal["hf"] = "hf"
    max_concurrency: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    adapter: str | None = Field(None, description="A PEFT adapter directory to load on top of `model`.")
    timeout_s: float = Field(
        600.0, gt=0, description="Longest one generate() batch may run; rows still generating then fail as `timeout`."
    )



class ScriptedRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str = Field(".*", description="Regex searched in the last user message (DOTALL).")
    template: str | None = Field(
        None, description="Only for requests rendered from this prompt template (e.g. `codec/encode.j2`)."
    )
    reply: str | None = Field(None, description="Jinja2 text; sees `prompt`, `messages`, `m` (match groups).")
    choices: list[str] | None = Field(
        None, description="Several replies; one is picked by a stable hash of the request."
    )
    error: Literal["server_error", "timeout", "unavailable"] | None = None


class ScriptedModel(_ModelBase):
    """Deterministic offline backend: rules, a Python handler, or a replay of a recorded run."""

    backend: Literal["scripted"] = "scripted"
    max_concurrency: int = Field(16, ge=1)
    rules: list[ScriptedRule] = Field(default_factory=list)
    handler: str | None = Field(None, description="`module:function` taking (CompletionRequest) -> str.")
    replay: str | None = Field(None, description="JSONL written by `record_to`; served before rules.")
    latency_s: float = Field(0.0, ge=0.0)


ModelConfig = Annotated[
    Union[OpenAIModel, LlamaCppModel, HFModel, ScriptedModel], Field(discriminator="backend")
]


def force_batch(models: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """`datatailor run --batch`: every role whose backend has a batch API set to `batch: true`.

    Returns the new model entries, the roles switched (or already batched), and the roles left online with why."""
    out: dict[str, Any] = {}
    switched: list[str] = []
    online: dict[str, str] = {}
    for role, config in models.items():
        if isinstance(config, OpenAIModel) and len(config.base_urls) == 1:
            out[role] = config if config.batch else config.model_copy(update={"batch": True})
            switched.append(role)
        else:
            out[role] = config
            online[role] = ("a list of replicas (a batch lives on one server)" if isinstance(config, OpenAIModel)
                            else f"the {config.backend} backend has no batch API")
    return out, switched, online


def batched_roles(models: dict[str, Any]) -> list[str]:
    return [role for role, config in models.items() if getattr(config, "batch", False)]
