"""Parsing model replies: JSON with repair, and the plain-text formats the papers' prompts use.

Every parser raises `ValueError` with a short reason when the text does not parse; the model facade
turns that into a re-ask and, finally, a typed `parse_error` failure.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """Find and load the JSON value in a reply, repairing the usual damage.

    Handles code fences, prose around the value, trailing commas, smart quotes, Python literals and
    a value cut off at the end (closes open strings, arrays and objects).
    """
    candidates: list[str] = []
    fenced = _FENCE.findall(text)
    candidates.extend(fenced)
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start >= 0:
        candidates.append(text[start:])
    candidates.append(text)
    last_error = "no JSON value found"
    for cand in candidates:
        cand = cand.strip()
        if not cand:
            continue
        for attempt in (cand, _repair(cand)):
            try:
                value, _ = json.JSONDecoder().raw_decode(attempt)
                return value
            except json.JSONDecodeError as exc:
                last_error = f"invalid JSON: {exc.msg} at char {exc.pos}"
    raise ValueError(last_error)


def _repair(text: str) -> str:
    s = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
    s = re.sub(r",\s*([}\]])", r"\1", s)
    s = re.sub(r"\bTrue\b", "true", s)
    s = re.sub(r"\bFalse\b", "false", s)
    s = re.sub(r"\bNone\b", "null", s)
    return _close_truncated(s)


def _close_truncated(s: str) -> str:
    """Close strings, arrays and objects left open by a reply that was cut off."""
    stack: list[str] = []
    in_str = escape = False
    for ch in s:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    out = s + ('"' if in_str else "")
    out = re.sub(r",\s*$", "", out)
    out = re.sub(r':\s*$', ": null", out)
    return out + "".join(reversed(stack))


def parse_model(text: str, schema: type[T]) -> T:
    """Parse a reply into a pydantic model, with JSON repair."""
    value = extract_json(text)
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ValueError(f"JSON does not match the schema: {loc}: {first['msg']}") from None


_ITEM = re.compile(r"^\s*(?:(?:\d+|[a-zA-Z])[\.\):]|[-*\u2022]|\(\d+\)|#\d+[:.]?)\s+(.*\S)\s*$")


def parse_numbered_list(text: str, min_items: int = 1) -> list[str]:
    """Items of a numbered or bulleted list ("1. …", "2) …", "- …"); continuation lines are joined."""
    items: list[str] = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append(m.group(1).strip())
        elif items and line.strip() and not line.lstrip().startswith("#"):
            # A wrapped line continues the previous item.
            if line.startswith((" ", "\t")):
                items[-1] = f"{items[-1]} {line.strip()}"
    items = [i for i in items if i]
    if len(items) < min_items:
        raise ValueError(f"expected a list of at least {min_items} items, found {len(items)}")
    return items


_NUM = r"(-?\d+(?:\.\d+)?)"
# "8/10" or "8 out of 10" is ONE score of 8: the denominator is removed before numbers are read.
_DENOMINATOR = re.compile(r"(\d(?:\.\d+)?)\s*(?:/|out\s+of)\s*(?:10|5|100)\b", re.IGNORECASE)
# A range in a label, "(1-10)" or "0–5", is not a score either.
_RANGE = re.compile(r"\(?\b\d+\s*(?:-|–|to)\s*\d+\b\)?")
_ASSISTANT_SCORE = re.compile(
    r"assistant\s*([12])\s*(?:'s)?\s*(?:overall\s*)?(?:score|rating)?\s*(?:is|[:=\-])\s*\**\s*" + _NUM, re.IGNORECASE
)
_SCORE_FOR_ASSISTANT = re.compile(
    r"(?:score|rating)\s*(?:for|of)\s*assistant\s*([12])\s*(?:is|[:=\-])\s*\**\s*" + _NUM, re.IGNORECASE
)


def _numbers(line: str) -> list[float]:
    """The numbers of a line, after removing denominators ("8/10" → "8"), ranges and "Assistant 1/2" names."""
    line = _DENOMINATOR.sub(r"\1", line)
    line = _RANGE.sub(" ", line)
    line = re.sub(r"assistant\s*[12]", " ", line, flags=re.IGNORECASE)
    return [float(n) for n in re.findall(_NUM, line)]


def parse_score_pair(text: str, low: float = 1, high: float = 10) -> tuple[float, float]:
    """The two scores of a pairwise judge reply.

    Labelled scores win ("Assistant 1: 8" … "Assistant 2: 7", "Score for Assistant 2: 7/10"). Otherwise the
    first line that holds any number must hold exactly two scores ("8 7", "8, 7", "Scores: 8/10, 7/10",
    "[8, 7]"); "8/10" is the score 8, never the pair (8, 10). Anything else is rejected (and re-asked), never
    guessed.
    """

    def checked(a: float, b: float) -> tuple[float, float]:
        if not (low <= a <= high and low <= b <= high):
            raise ValueError(f"scores out of range {low}-{high}: {a}, {b}")
        return a, b

    labelled: dict[str, float] = {}
    for pattern in (_ASSISTANT_SCORE, _SCORE_FOR_ASSISTANT):
        for m in pattern.finditer(_DENOMINATOR.sub(r"\1", text)):
            labelled.setdefault(m.group(1), float(m.group(2)))
    if set(labelled) == {"1", "2"}:
        return checked(labelled["1"], labelled["2"])
    for line in text.strip().splitlines():
        nums = _numbers(line.strip().strip("*`"))
        if not nums:
            continue
        if len(nums) == 2:
            return checked(nums[0], nums[1])
        raise ValueError(f"expected two scores on the first line with numbers, found {len(nums)}: {line.strip()[:80]!r}")
    raise ValueError("no line with two scores found")


_LABELLED_SCORE = re.compile(r"\b(?:score|rating|grade)\b[^:\n=]{0,40}?(?:[:=]|\bis\b)\s*\**\s*" + _NUM, re.IGNORECASE)


def parse_single_score(text: str, low: float = 0, high: float = 5) -> float:
    """One rating on [low, high]: a labelled score wins ("Score (0-5): 4" is 4, "Rating: 4/5" is 4); else a
    first line that is only a number ("4", "4/5", "**4.5**"). Anything else is rejected, not guessed."""

    def checked(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"score {value:g} is outside {low:g}-{high:g}")
        return value

    cleaned = _DENOMINATOR.sub(r"\1", text)
    if m := _LABELLED_SCORE.search(cleaned):
        return checked(float(m.group(1)))
    for line in cleaned.strip().splitlines():
        bare = line.strip().strip("*`#. ")
        if not bare:
            continue
        if re.fullmatch(_NUM, bare):
            return checked(float(bare))
        break
    raise ValueError(f"no score between {low:g} and {high:g} found: expected e.g. 'Score: 4' on the first line")


_USE_CASE = re.compile(r"^\s*[*#\-]*\s*(?:use[\s_-]*case|task)\s*[*]*\s*[:\-]\s*(.+)$", re.IGNORECASE)
_SKILLS = re.compile(r"^\s*[*#\-]*\s*(?:skills?|knowledge)\s*[*]*\s*[:\-]\s*[*]*\s*(.*)$", re.IGNORECASE)


def parse_use_case_skills(text: str, max_skills: int = 3) -> tuple[str, list[str]]:
    """CodecLM encoder output: "Use case: …" (or "Task: …") and "Skills: a, b, c".

    Skills may be comma/semicolon separated or listed on the following bullet lines.
    """
    use_case: str | None = None
    skills: list[str] = []
    lines = text.strip().splitlines()
    for i, line in enumerate(lines):
        if use_case is None and (m := _USE_CASE.match(line)):
            use_case = m.group(1).strip().strip("*").strip().rstrip(".")
            continue
        if m := _SKILLS.match(line):
            rest = m.group(1).strip()
            if rest:
                # Split on commas/semicolons only: "market research and planning" is one skill. A list's closing
                # "and" ("a, b, and c" / "a, b and c" after a comma) is dropped from the last item.
                parts = re.split(r"\s*[,;]\s*", rest)
                skills.extend(re.sub(r"^and\s+", "", p, flags=re.IGNORECASE) for p in parts)
            else:
                for follow in lines[i + 1 :]:
                    item = _ITEM.match(follow)
                    if not item:
                        break
                    skills.append(item.group(1))
            break
    if not use_case:
        raise ValueError("no 'Use case:' line found")
    cleaned: list[str] = []
    for s in skills:
        s = s.strip().strip("*.").strip()
        if s and s.lower() not in (c.lower() for c in cleaned):
            cleaned.append(s)
    if not cleaned:
        raise ValueError("no 'Skills:' found")
    return normalise_label(use_case), [normalise_label(s) for s in cleaned[:max_skills]]


def normalise_label(label: str) -> str:
    """Lower-case, single-spaced, without quotes or a trailing period."""
    return re.sub(r"\s+", " ", label.strip().strip("\"'`").rstrip(".")).lower()


def schema_instructions(schema: dict[str, Any]) -> str:
    """A compact description of a JSON schema, for prompts of backends without native constraints."""
    return json.dumps(schema, separators=(",", ":"))
