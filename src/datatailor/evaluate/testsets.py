"""Test sets: the shipped Apache-2.0 ones by name, AlpacaEval from the user's copy, any file by path.

`resolve_testset(spec, fields=None)` understands

* `vicuna80`, `mtbench` (first turns), `selfinstruct252`, `coachlm150`: shipped in
  `datatailor/data/testsets/` (sources and licenses in its ATTRIBUTION.md);
* `alpacaeval:PATH`: AlpacaEval is CC BY-NC data and is not shipped, so it is read from PATH;
* `PATH`: any file datatailor can read (JSONL, JSON, Parquet, an HF datasets folder), including the
  original benchmark files as users have them: FastChat `question.jsonl` (a `reference_answer/gpt-4.jsonl`
  beside it is joined in), Self-Instruct `user_oriented_instructions.jsonl`, `CoachLM150 Test Set.json`,
  AlpacaEval's JSON, the WizardLM Evol-Instruct test set (`idx, Skill, Difficulty, Instruction`),
  Alpaca/ShareGPT/OpenAI rows.

Field names are matched case-insensitively (see `datatailor.io`); any other layout takes a `fields`
mapping, target -> column (`--field instruction=Question --field category=Topic` on the command line);
the targets are instruction, input, response, category and id. A mapped column missing from a row is an
error naming the file, the line and the column.

Every item becomes a Record whose `metadata` holds `testset`, `item_id`, `category` and, when the file
has one, `reference` (a stored reference answer: a `reference` field, else the row's response/output;
a mapped `response` column wins). The item id comes from `id`, `question_id`, then `idx` (else the line
number); the category from `category`, `motivation_app`, `dataset`, then `skill`, all matched
case-insensitively, unless `fields` maps `id` / `category` to another column.

Rows of the layouts read before (keys spelt exactly as before, no `fields`) keep exactly their earlier
metadata, so an earlier evaluation folder resumes. Rows read through case-insensitive names or `fields`
also keep their other columns in `metadata` under their original names (e.g. the WizardLM set's
`Difficulty`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from datatailor.errors import UserError
from datatailor.io import (
    check_fields,
    detect_format,
    find_key,
    first_field,
    get_field,
    mapped_columns,
    read_jsonl_rows,
    read_rows,
    row_to_record,
)
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


def resolve_testset(spec: str, fields: dict[str, str] | None = None) -> TestSet:
    """A test set from a shipped name, `alpacaeval:PATH`, or a path; `fields` maps target -> column."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty test set name")
    head, sep, rest = spec.partition(":")
    if sep and _canonical(head) == ALPACAEVAL:
        return load_testset_file(Path(rest).expanduser(), name=ALPACAEVAL, fields=fields)
    key = _canonical(spec)
    if key in SHIPPED:
        return load_testset_file(shipped_dir() / SHIPPED[key], name=key, fields=fields)
    if key == ALPACAEVAL:
        raise UserError(
            "AlpacaEval is not shipped (its data is CC BY-NC 4.0): pass your copy as "
            "--testset alpacaeval:PATH (e.g. alpaca_eval.json)"
        )
    path = Path(spec).expanduser()
    if path.exists():
        return load_testset_file(path, fields=fields)
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


ITEM_ID_FIELDS = ("id", "question_id", "idx")
CATEGORY_FIELDS = ("category", "motivation_app", "dataset", "skill")
# Keys of the metadata this loader writes itself; a row's extra column never replaces one.
OWN_KEYS = {"testset", "item_id", "category", "reference", "reference_hint"}


def _legacy(row: dict[str, Any], fields: dict[str, str]) -> bool:
    """A row of a layout read before (keys spelt exactly, no mapping): its metadata stays as it was."""
    if fields:
        return False
    try:
        detect_format(row, exact=True)
    except ValueError:
        return False
    return True


def _item(row: dict[str, Any], lineno: int, fastchat_refs: dict[str, str], fields: dict[str, str] | None = None) -> dict[str, Any]:
    """instruction, input, reference, hint, item id, category and extra metadata of one raw row."""
    fields = fields or {}
    mapped = mapped_columns(row, fields) if fields else {}
    if "id" in mapped:
        id_key, raw_id = mapped["id"]
    else:
        id_key, raw_id = first_field(row, ITEM_ID_FIELDS, lineno)
    item_id = str(raw_id)
    if "category" in mapped:
        category_key, category = mapped["category"]
    else:
        category_key, category = first_field(row, CATEGORY_FIELDS)
    turns_key = find_key(row, "turns")
    if turns_key is not None and "instruction" not in fields and find_key(row, "instruction") is None:
        # FastChat question file: its `reference` field holds grading hints, not answers.
        turns = row[turns_key]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise ValueError("`turns` must be a non-empty list of strings")
        hints = get_field(row, "reference")
        hint = _text(hints[0]) if isinstance(hints, list) and hints else None
        return {
            "instruction": turns[0].strip(),
            "input": (_text(mapped["input"][1]) or "") if "input" in mapped else "",
            "reference": _text(mapped["response"][1]) if "response" in mapped else fastchat_refs.get(item_id),
            "hint": hint,
            "item_id": item_id,
            "category": category,
            "extra": {},
        }
    record = row_to_record(row, fields=fields)
    reference_key, reference = (None, None) if "response" in mapped else first_field(row, ("reference",))
    hint_key, hint = first_field(row, ("reference_hint",))
    extra: dict[str, Any] = {}
    if not _legacy(row, fields):
        used = {id_key, category_key, reference_key, hint_key, *(k for k in ("id", "category") if k in mapped)}
        extra = {k: v for k, v in record.metadata.items() if k not in used and k not in OWN_KEYS}
    return {
        "instruction": record.instruction,
        "input": record.input,
        "reference": _text(reference) or _text(record.response),
        "hint": _text(hint),
        "item_id": item_id,
        "category": category,
        "extra": extra,
    }


def load_testset_file(path: Path, name: str | None = None, fields: dict[str, str] | None = None) -> TestSet:
    """Read any supported test-set file into records (see the module docstring)."""
    if not path.exists():
        raise UserError(f"test set not found: {path}")
    try:
        fields = check_fields(fields)
    except ValueError as exc:
        raise UserError(f"{path}: fields: {exc}") from None
    name = name or path.stem
    fastchat_refs = _fastchat_references(path) if path.is_file() else {}
    records: list[Record] = []
    seen: set[str] = set()
    for lineno, row in read_rows(path):
        try:
            item = _item(row, lineno, fastchat_refs, fields)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{lineno}: {exc}") from None
        rid = stable_hash("testset", name, item["item_id"])
        if rid in seen:
            rid = stable_hash("testset", name, item["item_id"], lineno)
        seen.add(rid)
        metadata: dict[str, Any] = {"testset": name, "item_id": item["item_id"], "category": item["category"]}
        metadata.update(item["extra"])
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

