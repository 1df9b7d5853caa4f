"""From expert revisions to the coach's training set (CoachLM, Liu et al., ICDE 2024, arXiv 2311.13246).

1. Read before/after pairs: CoachLM's `Expert Revision Dataset.json` (shipped with datatailor, Apache-2.0), or any
   file datatailor reads whose rows carry the revised fields (`revised_instruction`, `revised_input`,
   `revised_response` after the field mapping, as CoachLM's layout gives them).
2. Repair known problems and report each: a row whose input embeds "Input:" (22 rows of CoachLM's set) is re-split
   into instruction and input; an empty instruction is handled as everywhere (the input becomes the instruction), and
   when that instruction embeds "Input:" (rows 1250 and 1364, whose instruction was empty) it is re-split too.
3. Revision size: the character edit distance (rapidfuzz's Levenshtein) between the pair before and after, over
   instruction + input + response concatenated (the layout that reproduces CoachLM's stored `Distance`); the
   agreement with the stored value is reported.
4. Hold out a seeded evaluation split that never enters training; from the rest keep the top α by revision size
   (α 0.3, largest first as the CoachLM repository's README says; `direction: ascending` for the third-party
   reproduction's reading).
5. Write `train.jsonl` (coach format: the directive as instruction, the serialized pair as input, the serialized
   revision as output), `heldout.jsonl` (the raw pairs with their expert revisions, to revise and compare),
   `shots.jsonl` (the training pairs, for a prompted coach) and `prepare.json` (every count and repair). The held-out
   and shot rows keep CoachLM's own `Distance` as the source file has it (when it has one); ours, over the repaired
   pairs, is `Recomputed Distance`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from datatailor.errors import UserError
from datatailor.io import read_records, write_json, write_jsonl
from datatailor.records import Record, derive_seed
from datatailor.stages.coach.format import Pair, directive, serialize_pair

SHIPPED = "coachlm"  # the name of the shipped expert set


def shipped_expert_file() -> Path:
    return Path(str(files("datatailor").joinpath("data", "coachlm", "expert_revisions.json")))


@dataclass
class ExpertPair:
    id: str
    before: Pair
    after: Pair
    stored_distance: int | None
    repairs: list[str] = field(default_factory=list)
    as_stored_distance: int = 0  # our distance over the texts as the file has them (before repairs): what `Distance` is

    @property
    def distance(self) -> int:
        return revision_size(self.before, self.after)


def revision_size(before: Pair, after: Pair) -> int:
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(before.instruction + before.input + before.response, after.instruction + after.input + after.response))


def _resplit(instruction: str, input: str) -> tuple[str, str, bool]:
    """An input that embeds "Input:" holds the end of the instruction before it and the real input after it; so does
    an instruction with no input beside it (an empty instruction whose input was moved into it)."""
    if "Input:" in input:
        head, tail = input.split("Input:", 1)
        return " ".join(p for p in (instruction.strip(), head.strip()) if p), tail.strip(), True
    if "Input:" in instruction and not input.strip():
        head, tail = instruction.split("Input:", 1)
        if head.strip() and tail.strip():
            return head.strip(), tail.strip(), True
    return instruction, input, False


def expert_pair(record: Record) -> ExpertPair:
    md = record.metadata
    after = [md.get("revised_instruction"), md.get("revised_input"), md.get("revised_response")]
    if not after[0] and not after[2]:
        raise UserError(f"row {record.id}: no revised pair (expected revised_instruction / revised_input / revised_response)")
    repairs: list[str] = []
    if md.get("repaired"):
        repairs.append("empty_instruction")
    b_instr, b_input, fixed_b = _resplit(record.instruction, record.input)
    a_instr, a_input, fixed_a = _resplit(str(after[0] or ""), str(after[1] or ""))
    if fixed_b or fixed_a:
        repairs.append("input_resplit")
    if not a_instr.strip() and a_input.strip():
        a_instr, a_input = a_input, ""
    distance = md.get("Distance", md.get("distance"))
    as_stored = revision_size(Pair(record.instruction, record.input, record.response or ""),
                              Pair(str(after[0] or ""), str(after[1] or ""), str(after[2] or "")))
    return ExpertPair(
        id=record.id,
        before=Pair(b_instr.strip(), b_input.strip(), (record.response or "").strip()),
        after=Pair(a_instr.strip(), a_input.strip(), str(after[2] or "").strip()),
        stored_distance=int(distance) if isinstance(distance, (int, float)) else None,
        repairs=repairs,
        as_stored_distance=as_stored,
    )


def load_expert_pairs(source: str | Path, fields: dict[str, str] | None = None) -> list[ExpertPair]:
    path = shipped_expert_file() if str(source) == SHIPPED else Path(source)
    return [expert_pair(r) for r in read_records(path, fields=fields)]


def split(pairs: list[ExpertPair], holdout: int, seed: int) -> tuple[list[ExpertPair], list[ExpertPair]]:
    """(rest, held out): `holdout` pairs drawn with the seed, never trained on."""
    if holdout >= len(pairs):
        raise UserError(f"holdout {holdout} leaves nothing to train on ({len(pairs)} pairs)")
    order = sorted(range(len(pairs)), key=lambda i: derive_seed(seed, "coach.holdout", pairs[i].id))
    held = set(order[:holdout])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def select_alpha(pairs: list[ExpertPair], alpha: float, direction: Literal["descending", "ascending"]) -> list[ExpertPair]:
    """The top α share by revision size (ties broken by id, so the choice is stable)."""
    if not 0 < alpha <= 1:
        raise UserError(f"alpha must be in (0, 1], got {alpha}")
    n = max(1, math.ceil(alpha * len(pairs)))
    sign = -1 if direction == "descending" else 1
    return sorted(pairs, key=lambda p: (sign * p.distance, p.id))[:n]


def training_row(p: ExpertPair, instruction: str) -> dict[str, Any]:
    return {"id": p.id, "instruction": instruction, "input": serialize_pair(**p.before.fields()),
            "output": serialize_pair(**p.after.fields()), "distance": p.distance}


def heldout_row(p: ExpertPair) -> dict[str, Any]:
    """A raw pair to revise, with its expert revision to compare against (CoachLM's layout). `Distance` is the source's
    own value, untouched (absent when the source has none); ours, over the repaired pairs, is `Recomputed Distance`."""
    row: dict[str, Any] = {
        "Raw Instruction": p.before.instruction, "Raw Input": p.before.input, "Raw Response": p.before.response,
        "Revised Instruction": p.after.instruction, "Revised Input": p.after.input, "Revised Response": p.after.response,
    }
    if p.stored_distance is not None:
        row["Distance"] = p.stored_distance
    row["Recomputed Distance"] = p.distance
    return row


def prepare(
    source: str | Path, out: Path, *, alpha: float = 0.3, direction: Literal["descending", "ascending"] = "descending",
    holdout: int = 100, seed: int = 0, fields: dict[str, str] | None = None,
) -> dict[str, Any]:
    pairs = load_expert_pairs(source, fields)
    rest, held = split(pairs, holdout, seed)
    chosen = select_alpha(rest, alpha, direction)
    text = directive()
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", (training_row(p, text) for p in chosen))
    write_jsonl(out / "heldout.jsonl", (heldout_row(p) for p in held))
    write_jsonl(out / "shots.jsonl", (heldout_row(p) for p in chosen))
    stored = [p for p in pairs if p.stored_distance is not None]
    exact = sum(1 for p in stored if p.as_stored_distance == p.stored_distance)
    close = sum(1 for p in stored if abs(p.as_stored_distance - p.stored_distance) <= 5)  # type: ignore[operator]
    distances = sorted(p.distance for p in chosen)
    report = {
        "source": str(source),
        "pairs": len(pairs),
        "repairs": dict(Counter(r for p in pairs for r in p.repairs)),
        "repaired_ids": {r: [p.id for p in pairs if r in p.repairs] for r in {r for p in pairs for r in p.repairs}},
        "distance_agreement": {"with_stored": len(stored), "exact": exact, "within_5": close,
                               "exact_share": round(exact / len(stored), 4) if stored else None},
        "heldout": len(held),
        "alpha": alpha,
        "direction": direction,
        "train": len(chosen),
        "train_distance": {"min": distances[0], "max": distances[-1]} if distances else None,
        "seed": seed,
        "files": {"train": "train.jsonl", "heldout": "heldout.jsonl", "shots": "shots.jsonl"},
    }
    write_json(out / "prepare.json", report)
    return report
