"""A deterministic offline backend.

Answers come, in order of precedence, from:

1. `replay`: a JSONL recorded by `record_to` on a real model (keyed like the request cache);
2. `handler`: a Python function `module:function` taking a CompletionRequest and returning a str,
   a `Completion` (served as it is, its logprobs included), or a `(text, logprobs)` pair where
   logprobs is a list of `PositionLogprobs` (or of dicts of its fields); None passes to the rules;
3. `rules`: the first rule whose regex matches the last user message; its `reply` is a Jinja2
   template (sees `prompt`, `messages`, `m` = the match groups, `system`), or one of `choices`
   picked by a stable hash of the request; `error` simulates a failure.

A request nothing answers is an `llm_error` failure that names the prompt, so a test fails loudly.
Token counts are whitespace word counts, so usage and budget behave as with a real model, and a reply
longer than `max_tokens` words is cut there with `finish_reason == "length"`, as a real model's would be.
Handlers and rules can route on `request.template` (the prompt template's name) and read
`request.variables` (what it was rendered with), which do not change when a template is reworded.

Logprobs: when a request sets `sampling.top_logprobs`, a text answer (a rule, or a handler's str) comes
with the logprobs of a deterministic model: the text is cut into word/digit/punctuation tokens
(`scripted_tokens`, one token per digit, a leading space kept on its token) and each token has
probability 1. A handler that wants other probabilities returns them itself.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import jinja2

from datatailor.errors import LLMCallFailure, ServerUnavailable, UserError
from datatailor.llm.base import Completion, CompletionRequest, PositionLogprobs
from datatailor.llm.cache import request_key
from datatailor.records import stable_hash

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined)


def _count(text: str) -> int:
    return len(text.split())


# One digit per token (as Qwen and Gemma tokenize numbers), words and punctuation runs with their leading space.
_TOKEN = re.compile(r"\s?\d|\s?[A-Za-z]+|\s?[^\sA-Za-z\d]+|\s+")


def scripted_tokens(text: str) -> list[str]:
    """`text` cut into tokens that concatenate back to it exactly."""
    return _TOKEN.findall(text)


def one_hot_logprobs(text: str) -> list[PositionLogprobs]:
    """The logprobs of a deterministic model that writes `text`: every token has probability 1."""
    return [PositionLogprobs(token=t, logprob=0.0, top={t: 0.0}) for t in scripted_tokens(text)]


Answer = str | Completion | tuple[str, list[Any]]


def load_handler(spec: str, base_dir: Path | None = None) -> Callable[[CompletionRequest], Answer | None]:
    module_name, _, func = spec.partition(":")
    if not func:
        raise UserError(f"scripted handler {spec!r} must look like module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"scripted handler {spec!r}: cannot import {module_name}: {exc}") from None
    try:
        return getattr(module, func)
    except AttributeError:
        raise UserError(f"scripted handler {spec!r}: {module_name} has no {func}") from None


class ScriptedBackend:
    native_json_schema = False

    def __init__(self, config: Any, base_dir: Path | None = None, handler: Callable[[CompletionRequest], Answer | None] | None = None):
        self.config = config
        self.handler = handler or (load_handler(config.handler, base_dir) if config.handler else None)
        self.rules = [(re.compile(rule.match, re.DOTALL), rule) for rule in config.rules]
        self.replay: dict[str, Completion] = {}
        if config.replay:
            path = Path(config.replay)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise UserError(f"scripted replay file not found: {path}")
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        self.replay[row["key"]] = Completion.model_validate(row["completion"])
                    except (json.JSONDecodeError, KeyError) as exc:
                        raise UserError(f"{path}:{lineno}: bad replay line: {exc}") from None
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        if self.replay and (hit := self.replay.get(request_key(request))) is not None:
            return hit
        answer = self._answer(request)
        if isinstance(answer, Completion):
            return answer
        logprobs: list[PositionLogprobs] | None = None
        if isinstance(answer, tuple):
            text, given = answer
            logprobs = [p if isinstance(p, PositionLogprobs) else PositionLogprobs.model_validate(p) for p in given]
        else:
            text = answer
        prompt_tokens = sum(_count(m.content) for m in request.messages)
        limit = request.sampling.max_tokens
        finish = "stop"
        if _count(text) > limit:
            # Cut after the limit-th word, keeping the text's own layout (newlines), as a real model's prefix.
            ends = [m.end() for m in re.finditer(r"\S+", text)]
            text = text[: ends[limit - 1]]
            finish = "length"
        if request.sampling.top_logprobs is None:
            logprobs = None
        elif logprobs is None:
            logprobs = one_hot_logprobs(text)
        return Completion(
            text=text, prompt_tokens=prompt_tokens, completion_tokens=min(_count(text), limit), finish_reason=finish,
            logprobs=logprobs,
        )

    def _answer(self, request: CompletionRequest) -> Answer:
        if self.handler is not None:
            reply = self.handler(request)
            if reply is not None:
                return reply
        prompt = request.messages[-1].content
        system = next((m.content for m in request.messages if m.role == "system"), "")
        for pattern, rule in self.rules:
            if rule.template is not None and rule.template != request.template:
                continue
            m = pattern.search(prompt)
            if not m:
                continue
            if rule.error == "server_error":
                raise LLMCallFailure(f"scripted server error for prompt {prompt[:60]!r}")
            if rule.error == "timeout":
                raise LLMCallFailure(f"scripted timeout for prompt {prompt[:60]!r}", kind="timeout")
            if rule.error == "unavailable":
                raise ServerUnavailable("scripted server unavailable")
            if rule.choices:
                pick = int(stable_hash([x.model_dump() for x in request.messages], request.sampling.seed), 16)
                return rule.choices[pick % len(rule.choices)]
            if rule.reply is not None:
                return _ENV.from_string(rule.reply).render(
                    prompt=prompt, messages=request.messages, m=[m.group(0), *m.groups()], system=system,
                    named=m.groupdict(),
                )
        raise LLMCallFailure(f"scripted model {self.config.model!r} has no rule for prompt {prompt[:80]!r}", kind="no_rule")

    async def aclose(self) -> None:
        return None
