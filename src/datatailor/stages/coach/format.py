"""The coach format: how a pair is written for the coach model, identically for training and for revision.

A pair is three marked sections; the markers cannot occur in ordinary text:

    [[INSTRUCTION]]
    Summarise the text.
    [[INPUT]]
    The text …
    [[RESPONSE]]
    A summary …

The coach's prompt is the revision directive (prompts/coach/directive.j2) as the instruction and the serialized
pair as the input, rendered by the same answer template (respond.j2) in `datatailor train` and in `coach.revise`;
its target is the serialized revised pair. `parse_pair` reads a coach's reply back, with rule-based cleanup: text
before the first marker is dropped, a section repeated later is ignored, a marker left inside a section is removed,
and lines repeated back to back are collapsed. A reply it cannot read raises ValueError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datatailor.prompts import load_prompt

MARKERS = ("[[INSTRUCTION]]", "[[INPUT]]", "[[RESPONSE]]")
_MARKER = re.compile(r"\[\[\s*(INSTRUCTION|INPUT|RESPONSE)\s*\]\]", re.IGNORECASE)
DIRECTIVE_TEMPLATE = "coach/directive.j2"


@dataclass(frozen=True)
class Pair:
    instruction: str
    input: str
    response: str

    def fields(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "response": self.response}


def directive() -> str:
    """The revision directive's text (a template without variables)."""
    return load_prompt(DIRECTIVE_TEMPLATE).render()[0].content


def serialize_pair(instruction: str, input: str, response: str) -> str:
    return f"{MARKERS[0]}\n{instruction.strip()}\n{MARKERS[1]}\n{input.strip()}\n{MARKERS[2]}\n{response.strip()}"


def _collapse_repeats(text: str) -> str:
    """Lines (or paragraphs) repeated back to back, a small coach's common failure, are kept once."""
    out: list[str] = []
    for line in text.split("\n"):
        if out and line.strip() and line.strip() == out[-1].strip():
            continue
        out.append(line)
    return "\n".join(out).strip()


def parse_pair(text: str) -> Pair:
    """The pair in a coach's reply; ValueError when the instruction or the response section is missing (a section
    may be empty: whether that is acceptable is the caller's call)."""
    sections: dict[str, str] = {}
    matches = list(_MARKER.finditer(text))
    for i, m in enumerate(matches):
        name = m.group(1).lower()
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if name not in sections:  # a section repeated later is ignored
            sections[name] = _collapse_repeats(_MARKER.sub("", text[m.end():end]))
    missing = [name for name in ("instruction", "response") if name not in sections]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} section: expected {', '.join(MARKERS)}")
    return Pair(sections["instruction"], sections.get("input", ""), sections["response"])
