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

`remove_foreign` is the rest of the cleanup the CoachLM README recommends for its coach's outputs ("remove non-English
characters"): letters of scripts other than Latin and Greek (Greek stays for mathematics), other scripts' digits and
CJK punctuation are removed (full-width forms of ASCII characters, such as `，`, become the ASCII character); digits,
punctuation, symbols and emoji stay. `coach.revise` applies it to revisions of
English pairs only (`is_english`: a pair with none of those characters), so a translation task keeps its target
script.
"""

from __future__ import annotations

import re
import unicodedata
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


# Scripts whose letters count as English text: Latin, and Greek for the mathematics English prose uses.
_KEPT_SCRIPTS = ("LATIN ", "GREEK ")
# Punctuation and symbols of CJK typesetting (what a Chinese-trained coach slips into English text).
_CJK_MARKS = ("IDEOGRAPHIC ", "FULLWIDTH ", "HALFWIDTH ", "CJK ", "HIRAGANA ", "KATAKANA ", "HANGUL ", "BOPOMOFO ")


def is_foreign(ch: str) -> bool:
    """A character that does not belong in English text: a letter of another script (or a mark outside the combining
    diacritics Latin letters use), another script's digit, or CJK punctuation."""
    category = unicodedata.category(ch)
    name = unicodedata.name(ch, "")
    if category[0] == "L":
        return not name.startswith(_KEPT_SCRIPTS)
    if category[0] == "M":
        return not 0x300 <= ord(ch) <= 0x36F
    if category == "Nd":
        return not ch.isascii()
    return name.startswith(_CJK_MARKS)


def is_english(*texts: str) -> bool:
    return not any(is_foreign(ch) for text in texts for ch in text)


def _english_form(ch: str) -> str:
    """A full-width form of an ASCII character (`，` `！` `Ａ`) as that character; any other foreign character as ""."""
    if 0xFF01 <= ord(ch) <= 0xFF5E:
        return chr(ord(ch) - 0xFEE0)
    return "" if is_foreign(ch) else ch


def remove_foreign(text: str) -> tuple[str, int]:
    """`text` without its foreign characters (full-width ASCII forms become ASCII), and how many characters that
    changed. A line the removal emptied is dropped, and the spaces it left are closed up; other lines stay as they were."""
    lines: list[str] = []
    removed = 0
    for line in text.split("\n"):
        kept = "".join(_english_form(ch) for ch in line)
        if kept == line:
            lines.append(line)
            continue
        removed += sum(1 for ch in line if _english_form(ch) != ch)
        indent = kept[: len(kept) - len(kept.lstrip())]
        body = re.sub(r"[ \t]{2,}", " ", kept.strip())
        body = re.sub(r" +([,.;:!?)])", r"\1", body)
        if body:
            lines.append(indent + body)
    return "\n".join(lines).strip(), removed
