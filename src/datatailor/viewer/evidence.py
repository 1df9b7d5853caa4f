"""The evidence behind a record, ready for a page: each method's namespace read into plain values, with word
diffs where a text was rewritten.

* CodecLM (Wang et al., NAACL 2024): the metadata (use case, skills, where they came from), the Self-Rubrics
  rubrics and actions and the chain of actions applied, and Contrastive Filtering's judge scores in both answer
  orders at every iteration, with the gap G against the threshold.
* REFED (Mehri et al., arXiv 2502.04511): the reference pair, the feedback collected from it, the draft response
  and the improved one as a diff, with the teacher's analysis and strategy.
* CoachLM (Liu et al., ICDE 2024): the pair before and after the coach as a diff; when the original was kept,
  why, and what the coach had proposed.
* TeaMs-RL (Gu et al., arXiv 2403.08694): the chain of operations from the seed, each with the reviewer's verdict
  and whether the rewrite was eliminated.
* A pairwise judge (`judge.pairwise`, the bake-off's evaluation): both answers and the scores in both orders.

Everything is read from the record as the run wrote it; a namespace that does not have the expected shape is
shown as raw JSON, never dropped.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from datatailor.stages.contract import METHODS

_TOKEN = re.compile(r"\s+|[^\s]+")


@dataclass
class Segment:
    op: str  # "same", "del", "ins"
    text: str


def word_diff(before: str, after: str) -> list[Segment]:
    """`before` → `after` as runs of unchanged, deleted and inserted words (whitespace kept)."""
    a, b = _TOKEN.findall(before or ""), _TOKEN.findall(after or "")
    out: list[Segment] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            out.append(Segment("same", "".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(Segment("del", "".join(a[i1:i2])))
        if j2 > j1:
            out.append(Segment("ins", "".join(b[j1:j2])))
    return out


def changed(diff: list[Segment]) -> bool:
    return any(s.op != "same" for s in diff)


@dataclass
class Section:
    """One method's evidence: `kind` picks the template part that draws it."""

    kind: str
    title: str
    paper: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def _paper(key: str) -> str:
    return METHODS[key].paper if key in METHODS else ""


def _field(record: dict[str, Any], path: str) -> Any:
    """instruction, input, response, prompt or metadata.<key>[.<key>…] of a record dict (None where absent)."""
    if path == "prompt":
        return record.get("instruction", "") + (f"\n\n{record['input']}" if record.get("input") else "")
    if path.startswith("metadata."):
        value: Any = record.get("metadata") or {}
        for key in path.split(".")[1:]:
            value = value.get(key) if isinstance(value, dict) else None
        return value
    return record.get(path)


def codec_section(record: dict[str, Any], ns: dict[str, Any]) -> Section:
    actions = list(ns.get("actions") or [])
    rubrics = list(ns.get("rubrics") or [])
    chain = list(ns.get("action_chain") or [])
    steps = []
    for i, step in enumerate(chain):
        after = chain[i + 1].get("before", "") if i + 1 < len(chain) else record.get("instruction", "")
        steps.append({**step, "after": after, "diff": word_diff(step.get("before", ""), after)})
    contrastive = ns.get("contrastive") or None
    iterations = []
    if isinstance(contrastive, dict):
        for h in contrastive.get("history") or []:
            scores = h.get("scores") or {}
            iterations.append({"iteration": h.get("iteration"), "instruction": h.get("instruction", ""), "G": h.get("G"),
                               "strong_first": scores.get("strong_shown_first") or {}, "target_first": scores.get("target_shown_first") or {},
                               "consistent": scores.get("position_consistent")})
    return Section("codec", "CodecLM", _paper("codec"), {
        "kind": ns.get("kind"), "use_case": ns.get("use_case"), "skills": ns.get("skills") or [], "origin": ns.get("origin"),
        "seeds": ns.get("seeds") or [], "rubric_actions": [(rubrics[i] if i < len(rubrics) else "", a) for i, a in enumerate(actions)],
        "steps": steps, "contrastive": contrastive if isinstance(contrastive, dict) else None, "iterations": iterations,
    })


def refed_section(record: dict[str, Any], ns: dict[str, Any]) -> Section:
    improved = record.get("response") or ""
    draft = ns.get("draft")
    return Section("refed", "REFED", _paper("refed"), {
        **ns, "improved": improved, "diff": word_diff(draft, improved) if draft is not None else None,
        "improved_yet": draft is not None and (ns.get("analysis") is not None or draft != improved),
    })


def coach_section(record: dict[str, Any], ns: dict[str, Any], quality_keys: list[str]) -> Section:
    original = ns.get("original") or {}
    now = {k: record.get(k) or "" for k in ("instruction", "input", "response")}
    shown = now if ns.get("revised") else (ns.get("revision") or {})
    diffs = [(k, word_diff(original.get(k, ""), shown.get(k, ""))) for k in ("instruction", "input", "response")
             if original.get(k) or shown.get(k)]
    metadata = record.get("metadata") or {}
    ratings = [(k, metadata.get(k)) for k in quality_keys if isinstance(metadata.get(k), (int, float))]
    return Section("coach", "CoachLM", _paper("coachlm"), {
        **ns, "diffs": diffs, "has_revision": bool(shown), "ratings": ratings,
    })


def teams_section(record: dict[str, Any], ns: dict[str, Any]) -> Section:
    ops = list(ns.get("ops") or [])
    rewards = list(ns.get("rewards") or [])
    eliminated = list(ns.get("eliminated") or [])
    reviewers = [e for e in record.get("lineage") or [] if e.get("role") == "reviewer" and e.get("decision") in ("equal", "not_equal")]
    steps = []
    for i, op in enumerate(ops):
        reward = rewards[i] if i < len(rewards) else None
        steps.append({"step": i + 1, "op": op, "reward": reward,
                      "verdict": "Not Equal (information gained)" if reward == 1 else "Equal (no gain)" if reward == 0 else "?",
                      "eliminated": eliminated[i] if i < len(eliminated) else None,
                      "reviewer": reviewers[i].get("model") if i < len(reviewers) else None})
    return Section("teams", "TeaMs-RL", _paper("teams_rl"), {**ns, "steps": steps, "final": record.get("instruction", "")})


def evol_section(record: dict[str, Any], ns: dict[str, Any]) -> Section:
    return Section("evol", "Evol-Instruct", _paper("evol"), {**ns, "final": record.get("instruction", "")})


def judge_sections(record: dict[str, Any], judges: dict[str, tuple[str, str, str]]) -> list[Section]:
    """Each pairwise judgement stored in the record: `judges` maps an output field to (question, a, b) fields as the
    recipe's judge.pairwise stages name them; a bare `metadata.judge` is read with the stage's defaults."""
    out = []
    metadata = record.get("metadata") or {}
    fields = dict(judges)
    if isinstance(metadata.get("judge"), dict):
        fields.setdefault("metadata.judge", ("prompt", "response", "metadata.reference"))
    for output, (question, a, b) in fields.items():
        summary = _field(record, output)
        if not isinstance(summary, dict) or "a_first" not in summary:
            continue
        out.append(Section("judge", f"Pairwise judge ({output})", "", {
            **summary, "question": _field(record, question), "a_field": a, "b_field": b,
            "a_text": _field(record, a), "b_text": _field(record, b),
        }))
    return out


def sections(record: dict[str, Any], quality_keys: list[str], judges: dict[str, tuple[str, str, str]]) -> list[Section]:
    """Every method's evidence found in `record`, in the order the methods usually run."""
    metadata = record.get("metadata") or {}
    out: list[Section] = []
    builders = (("codec", codec_section), ("refed", refed_section), ("teams_rl", teams_section), ("evol", evol_section))
    for key, build in builders:
        if isinstance(metadata.get(key), dict):
            out.append(build(record, metadata[key]))
    if isinstance(metadata.get("coach"), dict):
        out.append(coach_section(record, metadata["coach"], quality_keys))
    out += judge_sections(record, judges)
    return out


def timeline(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The lineage as rows for a timeline: what each stage did, with which model, template, tokens, $ and why."""
    rows = []
    for event in record.get("lineage") or []:
        details = event.get("details") or {}
        rows.append({**event, "tokens": int(event.get("prompt_tokens") or 0) + int(event.get("completion_tokens") or 0),
                     "details_json": json.dumps(details, ensure_ascii=False, indent=1) if details else ""})
    return rows


def other_metadata(record: dict[str, Any], shown: set[str]) -> str:
    """The metadata no section drew, as JSON (empty when nothing is left)."""
    rest = {k: v for k, v in (record.get("metadata") or {}).items() if k not in shown}
    return json.dumps(rest, ensure_ascii=False, indent=1) if rest else ""
