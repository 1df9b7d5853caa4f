"""Test sets: the shipped Apache-2.0 ones by name, AlpacaEval from the user's copy, any file by path.

`resolve_testset(spec)` understands

* `vicuna80`, `mtbench` (first turns), `selfinstruct252`, `coachlm150`: shipped in
  `datatailor/data/testsets/` (sources and licenses in its ATTRIBUTION.md);
* `alpacaeval:PATH`: AlpacaEval is CC BY-NC data and is not shipped, so it is read from PATH;
* `PATH`: any file datatailor can read (JSONL, JSON, Parquet, an HF datasets folder), including the
  original benchmark files as users have them: FastChat `question.jsonl` (a `reference_answer/gpt-4.jsonl`
  beside it is joined in), Self-Instruct `user_oriented_instructions.jsonl`, `CoachLM150 Test Set.json`,
  AlpacaEval's JSON, Alpaca/ShareGPT/OpenAI rows.

Every item becomes a Record whose `metadata` holds `testset`, `item_id`, `category` and, when the file
has one, `reference` (a stored reference answer: a `reference` field, else the row's response/output).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from datatailor.errors import UserError
from datatailor.io import read_jsonl_rows, read_rows, row_to_record
from datatailor.records import Record, stable_hash

SHIPPED: dict[str, str] = {
    "vicuna80": "vicuna80.jsonl",
    "mtbench": "mtbench.jsonl",
    "selfinstruct252": "selfinstruct252.jsonl",
    "coachlm150": "coachlm150.jsonl",
}
ALIASES: dict[str, str] = {
    "vicuna": "vicuna80",
    "vicunabench": "vicuna80",
    "mtbench80": "mtbench",
    "selfinstruct": "selfinstruct252",
    "useroriented": "selfinstruct252",
    "coachlm": "coachlm150",
}
ALPACAEVAL = "alpacaeval"


@dataclass
class TestSet:
    name: str
    source: str
    records: list[Record]

    __test__ = False  # not a pytest class, despite the name

    @property
    def n_references(self) -> int:
        return sum(1 for r in self.records if r.metadata.get("reference"))

    def with_references(self) -> list[Record]:
        return [r for r in self.records if r.metadata.get("reference")]


def shipped_dir() -> Path:
    return Path(str(files("datatailor").joinpath("data", "testsets")))


def shipped_testsets() -> list[str]:
    return list(SHIPPED)


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    return ALIASES.get(key, key)


def resolve_testset(spec: str) -> TestSet:
    """A test set from a shipped name, `alpacaeval:PATH`, or a path."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty test set name")
    head, sep, rest = spec.partition(":")
    if sep and _canonical(head) == ALPACAEVAL:
        return load_testset_file(Path(rest).expanduser(), name=ALPACAEVAL)
    key = _canonical(spec)
    if key in SHIPPED:
        return load_testset_file(shipped_dir() / SHIPPED[key], name=key)
    if key == ALPACAEVAL:
        raise UserError(
            "AlpacaEval is not shipped (its data is CC BY-NC 4.0): pass your copy as "
            "--testset alpacaeval:PATH (e.g. alpaca_eval.json)"
        )
    path = Path(spec).expanduser()
    if path.exists():
        return load_testset_file(path)
    known = ", ".join([*SHIPPED, "alpacaeval:PATH"])
    raise UserError(f"unknown test set {spec!r}: not a file, and not one of {known}")


def _fastchat_references(question_file: Path) -> dict[str, str]:
    """FastChat keeps reference answers in `reference_answer/gpt-4.jsonl` beside `question.jsonl`."""
    path = question_file.parent / "reference_answer" / "gpt-4.jsonl"
    if not path.is_file():
        return {}
    refs: dict[str, str] = {}
    for lineno, row in read_jsonl_rows(path):
        try:
            refs[str(row["question_id"])] = row["choices"][0]["turns"][0]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{path}:{lineno}: expected question_id and choices[0].turns[0]") from None
    return refs


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    return None


def _item(row: dict[str, Any], lineno: int, fastchat_refs: dict[str, str]) -> dict[str, Any]:
    """instruction, input, reference, hint, item id and category of one raw row."""
    item_id = str(row.get("id", row.get("question_id", lineno)))
    category = row.get("category", row.get("motivation_app", row.get("dataset")))
    hint: str | None = None
    if "turns" in row and "instruction" not in row:
        # FastChat question file: its `reference` field holds grading hints, not answers.
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise ValueError("`turns` must be a non-empty list of strings")
        hints = row.get("reference")
        hint = _text(hints[0]) if isinstance(hints, list) and hints else None
        return {
            "instruction": turns[0].strip(),
            "input": "",
            "reference": fastchat_refs.get(item_id),
            "hint": hint,
            "item_id": item_id,
            "category": category,
        }
    record = row_to_record(row)
    reference = _text(row.get("reference")) or _text(record.response)
    return {
        "instruction": record.instruction,
        "input": record.input,
        "reference": reference,
        "hint": _text(row.get("reference_hint")),
        "item_id": item_id,
        "category": category,
    }


def load_testset_file(path: Path, name: str | None = None) -> TestSet:
    """Read any supported test-set file into records (see the module docstring)."""
    if not path.exists():
        raise UserError(f"test set not found: {path}")
    name = name or path.stem
    fastchat_refs = _fastchat_references(path) if path.is_file() else {}
    records: list[Record] = []
    seen: set[str] = set()
    for lineno, row in read_rows(path):
        try:
            item = _item(row, lineno, fastchat_refs)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{lineno}: {exc}") from None
        rid = stable_hash("testset", name, item["item_id"])
        if rid in seen:
            rid = stable_hash("testset", name, item["item_id"], lineno)
        seen.add(rid)
        metadata: dict[str, Any] = {"testset": name, "item_id": item["item_id"], "category": item["category"]}
        if item["reference"]:
            metadata["reference"] = item["reference"]
        if item["hint"]:
            metadata["reference_hint"] = item["hint"]
        records.append(Record(id=rid, instruction=item["instruction"], input=item["input"], metadata=metadata))
    if not records:
        raise UserError(f"test set {path} has no items")
    return TestSet(name=name, source=str(path), records=records)


def testset_texts(testset: TestSet) -> list[tuple[str, str]]:
    """(item id, prompt text) of each item: what decontamination compares against."""
    return [(str(r.metadata.get("item_id", r.id)), r.prompt) for r in testset.records]


def describe(testset: TestSet) -> dict[str, Any]:
    return {"name": testset.name, "source": testset.source, "items": len(testset.records), "references": testset.n_references}

