"""Model entries of a recipe: one validated config class per backend, selected by `backend`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

    @field_validator("base_url")
    @classmethod
    def _some_url(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one URL")
        return value

    @property
    def base_urls(self) -> list[str]:
        return [u.rstrip("/") for u in ([self.base_url] if isinstance(self.base_url, str) else self.base_url)]


class LlamaCppModel(_ModelBase):
    """A GGUF model run in-process by llama-cpp-python. `model` is a path or a `local:` name."""

    backend: Literal["llamacpp"] = "llamacpp"
    max_concurrency: int = Field(1, ge=1)
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = None
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
