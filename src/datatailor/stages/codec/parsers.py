"""Readers for CodecLM's plain-text replies: Self-Rubrics sections, instruction lists, rewritten instructions,
and encoder skills. Each raises ValueError with a reason, which the model facade turns into a re-ask."""

from __future__ import annotations

import re

from datatailor.llm.structured import normalise_label, parse_numbered_list
from datatailor.scoring.text import rouge_l, rouge_tokens

_RUBRICS_HEAD = re.compile(r"^\s*[#*\s]*rubrics?\s*[*]*\s*:?\s*[*]*\s*$", re.IGNORECASE)
_ACTIONS_HEAD = re.compile(r"^\s*[#*\s]*actions?\s*[*]*\s*:?\s*[*]*\s*$", re.IGNORECASE)
_LABELLED = re.compile(
    r"^\s*(?:[-*\u2022]|\d+[.):])?\s*[*_]*\s*(rubric|action)\s*\d*\s*[*_]*\s*[:\-]\s*[*_]*\s*(.+?)\s*[*_]*\s*$", re.IGNORECASE
)
_SKILL_NOISE = re.compile(r"^(?:skills?|knowledge)\s+(?:of|in)\s+|\s+(?:skills?|knowledge)$")


def clean_skill(skill: str) -> str:
    """Drop the words "skill(s)"/"knowledge" at either end, which the encoder is told not to use."""
    cleaned = _SKILL_NOISE.sub("", normalise_label(skill)).strip()
    return cleaned or normalise_label(skill)


def dedup(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


def clean_item(text: str) -> str:
    """A list item without markdown emphasis or wrapping quotes ("**Add a step**: …" → "Add a step: …")."""
    cleaned = re.sub(r"\*\*|__", "", text).strip().strip("*").strip()
    if len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'":
        cleaned = cleaned[1:-1].strip()
    return cleaned


def list_items(lines: list[str]) -> list[str]:
    items = (clean_item(i) for i in parse_numbered_list("\n".join(lines), min_items=0))
    return [i for i in items if i]


def parse_rubrics_actions(text: str, n: int) -> tuple[list[str], list[str]]:
    """Exactly `n` rubrics and their `n` paired actions from a Self-Rubrics reply.

    Accepts "Rubrics:" / "Actions:" sections of numbered items (the asked-for layout), lines labelled
    "Rubric: …" / "Action: …", or one numbered list of 2n items (rubrics first). The i-th action is paired
    with the i-th rubric, so a reply with fewer than `n` of either, or with unequal numbers of rubrics and
    actions (which could not be paired), raises ValueError and is re-asked. Extra pairs beyond `n` are cut.
    """
    lines = text.strip().splitlines()
    head_r = next((i for i, line in enumerate(lines) if _RUBRICS_HEAD.match(line)), None)
    head_a = next((i for i, line in enumerate(lines) if _ACTIONS_HEAD.match(line)), None)
    rubrics: list[str] = []
    actions: list[str] = []
    if head_a is not None:
        start = head_r + 1 if head_r is not None and head_r < head_a else 0
        rubrics, actions = list_items(lines[start:head_a]), list_items(lines[head_a + 1 :])
    else:
        for line in lines:
            if m := _LABELLED.match(line):
                (rubrics if m.group(1).lower() == "rubric" else actions).append(m.group(2).strip())
        if not actions:
            items = list_items(lines[head_r + 1 :] if head_r is not None else lines)
            if len(items) == 2 * n:
                rubrics, actions = items[:n], items[n:]
    if not actions:
        raise ValueError(f"no actions found: expected 'Rubrics:' and 'Actions:' sections with {n} numbered items each")
    if len(rubrics) != len(actions):
        raise ValueError(f"found {len(rubrics)} rubrics but {len(actions)} actions: give {n} of each, the i-th action for the i-th rubric")
    if len(actions) < n:
        raise ValueError(f"found {len(actions)} rubric/action pairs, {n} were asked for")
    return rubrics[:n], actions[:n]


_IMPROVED_LABEL = re.compile(
    r"^\s*[*#]*\s*(?:new|improved|rewritten|harder)\s+(?:request|instruction|prompt)\s*[*#]*\s*:\s*[*#]*\s*", re.IGNORECASE
)


def parse_rewritten(text: str) -> str:
    """The rewritten instruction alone: a leading answer label and wrapping quotes are removed."""
    cleaned = _IMPROVED_LABEL.sub("", text.strip()).strip()
    if len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'":
        cleaned = cleaned[1:-1].strip()
    if not cleaned:
        raise ValueError("the reply holds no instruction")
    return cleaned


ACTION_ECHO_ROUGE = 0.7


def parse_improved(text: str, action: str) -> str:
    """The rewritten instruction; a reply that mostly repeats the action (ROUGE-L ≥ 0.7) is re-asked, since the
    improver is told to apply the action, not to quote it."""
    rewritten = parse_rewritten(text)
    if rouge_l(rouge_tokens(rewritten), rouge_tokens(action)) >= ACTION_ECHO_ROUGE:
        raise ValueError("the reply repeats the change description instead of rewriting the request")
    return rewritten


def parse_instruction_list(text: str) -> list[str]:
    """The decoder's numbered list of instructions (a one-item request may come back as bare text)."""
    items = list_items(text.strip().splitlines())
    if not items:
        stripped = text.strip()
        if stripped and len(stripped.splitlines()) == 1:
            return [parse_rewritten(stripped)]
        raise ValueError("expected a numbered list of instructions, found none")
    return items


def text_key(text: str) -> str:
    """An instruction's text as a duplicate key: lower-case words only."""
    return " ".join(re.findall(r"\w+", text.lower()))
