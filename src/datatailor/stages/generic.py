"""Generic stages: `respond` (answer each instruction) and `generate` (a template → a field)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, create_model

from datatailor.errors import RecordFailure
from datatailor.records import WRITABLE_FIELD, Record
from datatailor.stages.base import RECORD_VARIABLES, MapStage, StageConfig, record_variables, register
from datatailor.stages.contract import Contract


class RespondConfig(StageConfig):
    type: Literal["respond"] = "respond"
    role: str = Field("strong", description="Model role that answers.")
    template: str = Field("respond.j2", description="Prompt template (packaged name or path).")
    overwrite: bool = Field(True, description="Replace an existing response (false: keep it and skip the call).")
    max_tokens: int | None = Field(None, description="Override the model's max_tokens for this stage.")
    keep_truncated: bool = Field(
        False, description="Keep answers cut off by max_tokens (default: such a record fails as `truncated`, so a cut answer is never a training target)."
    )


@register("respond")
class Respond(MapStage[RespondConfig]):
    """Answer each record's instruction (and input) with a model role. An empty answer fails as `empty_response`,
    one cut off by max_tokens as `truncated` (unless `keep_truncated`)."""

    Config = RespondConfig
    needs = ("instruction",)
    provides = ("response",)
    templates = {"template": RECORD_VARIABLES}

    async def process(self, record: Record) -> list[Record]:
        if record.response and not self.config.overwrite:
            return [record]
        gen = await self.answer(
            self.config.role, record, template_field="template", seed_key=(self.name, record.id),
            keep_truncated=self.config.keep_truncated, max_tokens=self.config.max_tokens,
        )
        return [record.with_event(gen.event(self.name, decision="responded"), response=gen.text.strip())]


_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list[str]}


class GenerateConfig(StageConfig):
    type: Literal["generate"] = "generate"
    role: str = "strong"
    template: str = Field(description="Prompt template (packaged name or path); sees the record's fields and `vars`.")
    output: str = Field(
        "response",
        description="Where the result goes: instruction, input, response, or metadata.<key>.",
        pattern=WRITABLE_FIELD,
    )
    schema_fields: dict[str, Literal["str", "int", "float", "bool", "list[str]"]] | None = Field(
        None, description="Ask for JSON with these fields (structured output); the object is stored."
    )
    vars: dict[str, Any] = Field(default_factory=dict, description="Extra template variables.")
    max_tokens: int | None = None
    temperature: float | None = None
    keep_truncated: bool = Field(False, description="Keep a reply cut off by max_tokens (default: the record fails as `truncated`).")


@register("generate")
class Generate(MapStage[GenerateConfig]):
    """Render a template for each record and store the model's text (or JSON object) in a field; a reply cut off
    by max_tokens fails as `truncated` unless `keep_truncated`."""

    Config = GenerateConfig
    templates = {"template": (*RECORD_VARIABLES, "vars")}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        return Contract.of(provides=[config.output] if config is not None else [])

    def __init__(self, config: GenerateConfig, ctx: Any):
        super().__init__(config, ctx)
        self.schema = None
        if config.schema_fields:
            self.schema = create_model(
                "GeneratedFields", **{k: (_TYPES[t], ...) for k, t in config.schema_fields.items()}
            )

    async def process(self, record: Record) -> list[Record]:
        gen = await self.call(
            self.config.role,
            "template",
            {**record_variables(record), "vars": self.config.vars},
            schema=self.schema,
            seed_key=(self.name, record.id),
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
        )
        if gen.truncated and not self.config.keep_truncated:
            raise RecordFailure(
                f"{self.config.role} ({gen.model})'s reply was cut off by max_tokens; raise max_tokens (or set keep_truncated)",
                kind="truncated",
            )
        value: Any = gen.value.model_dump() if self.schema is not None else gen.text.strip()
        event = gen.event(self.name, decision="generated", field=self.config.output)
        if self.config.output.startswith("metadata."):
            key = self.config.output.split(".", 1)[1]
            return [record.with_event(event, metadata={**record.metadata, key: value})]
        if not isinstance(value, str):
            value = json.dumps(value, ensure_ascii=False)
        return [record.with_event(event, **{self.config.output: value})]
