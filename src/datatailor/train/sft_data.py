"""Training pairs → token ids and labels, with the loss on the response tokens only.

A pair becomes chat messages through a prompt template (by default `respond.j2`, the one the
respond stage and `datatailor eval` send), then a prompt text exactly as the `hf` backend builds it
at inference: the tokenizer's chat template when it has one, else the plain `### Instruction:` /
`### Response:` layout of `hf/plain_chat.j2`. Training on the very prompt the tuned model will see
later is the point; `tests/test_train.py` checks the two stay identical.

Prompt and completion are tokenised separately, like the backend's log-likelihood does, and the
prompt positions get the label -100 so that they take no part in the loss.

`max_length` may be "auto": the longest pair of the data (prompt + completion), so that no target is cut,
within what the tokenizer says the model takes. A fixed length cuts longer pairs at the end, and drops a
pair whose prompt alone fills it; `TokenizedSet` counts both, and `datatailor train` says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datatailor.errors import UserError
from datatailor.io import read_records
from datatailor.llm.base import Message
from datatailor.llm.hf import PLAIN_CHAT_TEMPLATE
from datatailor.prompts import Prompt, load_prompt
from datatailor.records import Record
from datatailor.stages.generic import record_variables

IGNORE_INDEX = -100
# transformers' `model_max_length` when a tokenizer does not know its model's limit (a huge sentinel).
_UNKNOWN_LIMIT = 10**9


def dataset_path(source: str | Path) -> Path:
    """A run directory means its data.jsonl; anything else is a dataset file or HF datasets folder."""
    p = Path(source)
    if not p.exists():
        raise UserError(f"training data not found: {p}")
    if p.is_dir() and (p / "data.jsonl").is_file():
        return p / "data.jsonl"
    if p.is_dir() and (p / "manifest.json").is_file():
        raise UserError(f"{p}: the run is not complete yet (no data.jsonl); finish it with `datatailor run` first")
    return p


def load_pairs(source: str | Path, limit: int | None = None) -> tuple[list[Record], int]:
    """The records that have a response, and how many were skipped for having none."""
    path = dataset_path(source)
    records = read_records(path)
    pairs = [r for r in records if r.response is not None and r.response.strip()]
    if not records:
        raise UserError(f"{path}: the dataset is empty")
    if not pairs:
        raise UserError(f"{path}: none of the {len(records)} rows has a response to train on")
    if limit is not None:
        pairs = pairs[:limit]
    return pairs, len(records) - len(pairs)


def pair_messages(record: Record, prompt: Prompt) -> list[Message]:
    """The chat a model sees before it answers `record`."""
    return prompt.render(**record_variables(record))


def render_prompt(tokenizer: Any, messages: list[Message]) -> tuple[str, bool]:
    """The prompt text and whether tokenising it should add special tokens (BOS): as the hf backend does."""
    chat = [m.model_dump() for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), False
    rendered = load_prompt(PLAIN_CHAT_TEMPLATE).render(messages=chat)[0].content
    return rendered + "\n", True


def render_completion(tokenizer: Any, messages: list[Message], prompt_text: str, response: str) -> str:
    """What the model must learn to write after the prompt, including the marker that ends its turn.

    With a chat template that is the template's own rendering of the assistant turn (for example
    `answer<end_of_turn>\n`); without one, the answer followed by the EOS token, which is where the
    backend's generation stops.
    """
    if getattr(tokenizer, "chat_template", None):
        chat = [m.model_dump() for m in messages] + [{"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        # Templates that rewrite earlier turns once an answer follows (e.g. dropping reasoning) do not
        # extend the generation prompt; the answer plus EOS is then the honest completion.
    return response + (tokenizer.eos_token or "")


@dataclass
class TokenizedPair:
    id: str
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    response_tokens: int  # tokens that carry a loss (after truncation)
    truncated: bool


@dataclass
class TokenizedSet:
    examples: list[TokenizedPair] = field(default_factory=list)
    dropped_prompt_too_long: list[str] = field(default_factory=list)
    max_length: int = 0  # the length used (the chosen one when asked for "auto")
    longest: int = 0  # the longest pair before any cut (prompt + completion tokens)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def response_tokens(self) -> int:
        return sum(e.response_tokens for e in self.examples)

    @property
    def truncated(self) -> int:
        return sum(e.truncated for e in self.examples)


def encode_pair(tokenizer: Any, record: Record, prompt: Prompt) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one pair, as the hf backend would see the prompt."""
    messages = pair_messages(record, prompt)
    prompt_text, special = render_prompt(tokenizer, messages)
    completion_text = render_completion(tokenizer, messages, prompt_text, record.response or "")
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=special)["input_ids"])
    completion_ids = list(tokenizer(completion_text, add_special_tokens=False)["input_ids"])
    return prompt_ids, completion_ids


def cut_pair(record_id: str, prompt_ids: list[int], completion_ids: list[int], max_length: int) -> TokenizedPair | None:
    """Token ids and labels of one pair within max_length; None when the prompt alone fills it (nothing to learn)."""
    if len(prompt_ids) >= max_length:
        return None
    room = max_length - len(prompt_ids)
    kept = completion_ids[:room]
    return TokenizedPair(
        id=record_id,
        input_ids=prompt_ids + kept,
        labels=[IGNORE_INDEX] * len(prompt_ids) + kept,
        prompt_tokens=len(prompt_ids),
        response_tokens=len(kept),
        truncated=len(kept) < len(completion_ids),
    )


def tokenize_pair(tokenizer: Any, record: Record, prompt: Prompt, max_length: int) -> TokenizedPair | None:
    """Token ids and labels of one pair; None when the prompt alone fills max_length (nothing to learn)."""
    return cut_pair(record.id, *encode_pair(tokenizer, record, prompt), max_length)


def model_limit(tokenizer: Any) -> int | None:
    """The longest sequence the tokenizer says its model takes (None when it does not know)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _UNKNOWN_LIMIT else None


def tokenize_pairs(
    tokenizer: Any, records: Iterable[Record], template: str, max_length: int | Literal["auto"], base_dir: Path | None = None
) -> TokenizedSet:
    prompt = load_prompt(template, base_dir)
    encoded = [(record.id, *encode_pair(tokenizer, record, prompt)) for record in records]
    longest = max((len(p) + len(c) for _, p, c in encoded), default=0)
    if max_length == "auto":
        limit = model_limit(tokenizer)
        max_length = max(1, min(longest, limit) if limit is not None else longest)
    out = TokenizedSet(max_length=max_length, longest=longest)
    for record_id, prompt_ids, completion_ids in encoded:
        pair = cut_pair(record_id, prompt_ids, completion_ids, max_length)
        if pair is None:
            out.dropped_prompt_too_long.append(record_id)
        else:
            out.examples.append(pair)
    return out
