"""Prompt templates: one Jinja2 file per prompt.

A template renders to chat messages. `{% block system %}` (optional) becomes the system message,
`{% block user %}` the user message; a template with no blocks is one user message. Few-shot turns
can be given as `{% block shot_1_user %}` / `{% block shot_1_assistant %}` pairs (up to 9).

The sha256 of a template's source is part of every cache key made with it, so editing a template
invalidates exactly the calls that used it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from datatailor.errors import UserError
from datatailor.llm.base import Message

_PACKAGE_DIR = Path(str(files("datatailor.prompts")))


@dataclass(frozen=True)
class Prompt:
    name: str  # as the recipe or the code names it: "codec/encode.j2", or a user template's path as written
    path: str  # the file it was read from
    source: str
    template: jinja2.Template

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()[:16]

    def render(self, **variables: Any) -> list[Message]:
        ctx = self.template.new_context(variables)
        blocks = self.template.blocks
        if not blocks:
            return [Message(role="user", content=_clean(self.template.render(**variables)))]
        messages: list[Message] = []
        if "system" in blocks:
            messages.append(Message(role="system", content=_clean("".join(blocks["system"](ctx)))))
        for i in range(1, 10):
            u, a = f"shot_{i}_user", f"shot_{i}_assistant"
            if u in blocks and a in blocks:
                messages.append(Message(role="user", content=_clean("".join(blocks[u](ctx)))))
                messages.append(Message(role="assistant", content=_clean("".join(blocks[a](ctx)))))
        if "user" not in blocks:
            raise UserError(f"prompt template {self.path} has blocks but no `user` block")
        messages.append(Message(role="user", content=_clean("".join(blocks["user"](ctx)))))
        return messages


def _clean(text: str) -> str:
    return text.strip("\n").rstrip()


_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True
)


@lru_cache(maxsize=256)
def _load(name: str, path: str, source: str) -> Prompt:
    try:
        template = _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from exc
    return Prompt(name=name, path=path, source=source, template=template)


def load_prompt(name_or_path: str | Path, base_dir: Path | None = None) -> Prompt:
    """Load a packaged template by name (`codec/encode.j2`) or a user template by path.

    A relative user path is resolved against `base_dir` (the recipe's folder) first.
    """
    candidates: list[Path] = []
    p = Path(name_or_path)
    if p.is_absolute():
        candidates.append(p)
    else:
        if base_dir is not None:
            candidates.append(base_dir / p)
        candidates.append(Path.cwd() / p)
        candidates.append(_PACKAGE_DIR / p)
    for candidate in candidates:
        if candidate.is_file():
            return _load(str(name_or_path), str(candidate), candidate.read_text(encoding="utf-8"))
    raise UserError(f"prompt template not found: {name_or_path} (looked in {', '.join(map(str, candidates))})")


def packaged_templates() -> list[str]:
    return sorted(str(p.relative_to(_PACKAGE_DIR)) for p in _PACKAGE_DIR.rglob("*.j2"))
