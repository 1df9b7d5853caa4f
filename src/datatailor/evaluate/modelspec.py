"""Model specs for the evaluation commands: a models file by role, and one-word shorthands.

Shorthands (what `--candidate/--reference/--judge` accept):

    local:NAME                a packaged GGUF (e.g. local:gemma-3-270m) run by llama.cpp
    llamacpp:PATH.gguf        any GGUF file, run by llama.cpp
    hf:MODEL[+ADAPTER]        a transformers model (HF folder, or local:NAME) with an optional PEFT
                              adapter folder, e.g. hf:local:gemma-3-270m+runs/tuned; hf:DIR of a
                              `datatailor train` output loads what its train_report.json says (base + adapter)
    openai:MODEL[@BASE_URL]   an OpenAI-compatible server (key from $OPENAI_API_KEY; a base URL on
                              127.0.0.1/localhost needs no key)
    role:NAME                 the model of role NAME in the --models file (e.g. role:strong of a recipe)

A models file is YAML: either a recipe (its `models:` section is used) or a mapping of role names to
model entries exactly as in a recipe's `models:`. Roles named `candidate`, `reference` and `judge`
are used when no flag names them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import TypeAdapter, ValidationError

from datatailor.errors import UserError
from datatailor.io import read_yaml
from datatailor.llm.config import HFModel, LlamaCppModel, ModelConfig, OpenAIModel

_ADAPTER: TypeAdapter[Any] = TypeAdapter(ModelConfig)
SHORTHANDS = "local:NAME, llamacpp:PATH, hf:MODEL[+ADAPTER], openai:MODEL[@BASE_URL], role:NAME"


def load_models_file(path: Path) -> dict[str, Any]:
    """Role → validated model config, from a recipe or a plain role mapping."""
    data = read_yaml(path, "models file")
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        data = data["models"]
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of role names to model entries (or a recipe with `models:`)")
    models: dict[str, Any] = {}
    for role, entry in data.items():
        try:
            models[str(role)] = _ADAPTER.validate_python(entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise UserError(f"{path}: models.{role}{'.' + loc if loc else ''}: {err['msg']}") from None
    return models


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def parse_model_spec(spec: str, models: dict[str, Any] | None = None, base_dir: Path | None = None) -> Any:
    """A model config from a shorthand (see the module docstring)."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep or not rest:
        raise UserError(f"model spec {spec!r}: expected one of {SHORTHANDS}")
    kind = kind.lower()
    if kind == "local":
        return LlamaCppModel(model=spec.strip())
    if kind == "llamacpp":
        return LlamaCppModel(model=str(_path(rest, base_dir)))
    if kind == "hf":
        model, plus, adapter = rest.partition("+")
        if plus and not adapter:
            raise UserError(f"model spec {spec!r}: nothing after '+' (expected an adapter folder)")
        if not plus and (trained := _trained_model(_path(model, base_dir))) is not None:
            return trained
        model_ref = model if model.startswith("local:") else str(_path(model, base_dir))
        return HFModel(model=model_ref, adapter=str(_path(adapter, base_dir)) if adapter else None)
    if kind == "openai":
        model, at, base_url = rest.partition("@")
        if at and not base_url.startswith(("http://", "https://")):
            raise UserError(f"model spec {spec!r}: the base URL after '@' must start with http:// or https://")
        fields: dict[str, Any] = {"model": model}
        if base_url:
            fields["base_url"] = base_url
            if _is_loopback(base_url):
                fields["api_key_env"] = None
        return OpenAIModel(**fields)
    if kind == "role":
        if not models or rest not in models:
            known = ", ".join(sorted(models or {})) or "none (pass --models FILE)"
            raise UserError(f"model spec {spec!r}: no role {rest!r} in the models file (roles: {known})")
        return models[rest]
    raise UserError(f"model spec {spec!r}: unknown kind {kind!r}; expected one of {SHORTHANDS}")


def _trained_model(folder: Path) -> Any | None:
    """The model entry a `datatailor train` output folder describes (its train_report.json `use_as`)."""
    report = folder / "train_report.json"
    if not report.is_file():
        return None
    try:
        use_as = json.loads(report.read_text(encoding="utf-8"))["use_as"]
        return HFModel.model_validate(use_as)
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(f"{report}: cannot read the trained model's `use_as` entry: {exc}") from None


def _path(text: str, base_dir: Path | None) -> Path:
    p = Path(text).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def resolve_role(
    role: str, flag: str | None, models: dict[str, Any], base_dir: Path | None = None, required: bool = True
) -> Any | None:
    """The model for `role`: the flag's spec if given, else the models file's entry of that name."""
    if flag:
        return parse_model_spec(flag, models, base_dir)
    if role in models:
        return models[role]
    if required:
        raise UserError(f"no {role} model: pass --{role} ({SHORTHANDS}) or give a `{role}` role in --models")
    return None


def describe_model(config: Any) -> dict[str, Any]:
    """What a report says about a model: backend, name, and where it lives (never a key)."""
    out: dict[str, Any] = {"backend": config.backend, "model": config.model}
    for name in ("base_url", "adapter"):
        value = getattr(config, name, None)
        if value:
            out[name] = value
    return out


def model_label(description: Any) -> str:
    """One line for reports: backend:model, plus the adapter folder's name; "stored answers" for stored."""
    if description == "stored":
        return "stored answers"
    text = f"{description['backend']}:{description['model']}"
    adapter = description.get("adapter")
    return text + (f" + {Path(adapter).name}" if adapter else "")
