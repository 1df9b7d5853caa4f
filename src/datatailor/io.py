"""Reading and writing datasets.

Reads JSONL, JSON (a list, or an object holding one list), Parquet and HF `datasets` folders, and
detects the row format: Alpaca, ShareGPT, OpenAI messages, CoachLM expert revisions, and plain
`instruction` / `prompt` / `question` / `text` / `turns` rows. Errors name the file and line.

Field names are matched case-insensitively, so files load as they are published: `Instruction` is
`instruction`, `Raw Instruction` is `raw instruction`, `Output` is `output` (the WizardLM Evol-Instruct
test set's `idx, Skill, Difficulty, Instruction` rows are plain instruction rows). A key spelt exactly
wins over one that differs only in case, so rows spelt as before load as before: same ids, same
metadata. Our own `datatailor` records (id, instruction, lineage) are matched exactly.

Any other layout takes an explicit `fields` mapping, target name -> the file's column name (matched
case-insensitively), e.g. `{instruction: Question, input: Context, response: Answer, category: Topic}`;
the targets are instruction, input, response, category and id (`FIELD_TARGETS`). With `instruction`
mapped, a row is read through the mapping (an unmapped input falls back to an `input` column, an
unmapped response to `output`/`response`/`answer`); otherwise its format is detected as usual and the
mapped input/response columns override it. A mapped `category` / `id` lands in `metadata["category"]` /
`metadata["id"]`. A mapped column missing from a row is an error naming the file, the line and the
column. Extra columns stay in `metadata` under their original names.

Inputs may also be objects in a store (`s3://bucket/seeds.jsonl`, `gs://…`, `abfs://…`: any fsspec URL, with
`pip install 'datatailor[cloud]'`), read as a stream (`read_url_rows`); credentials come from the environment.

Writes are atomic: a temp file in the same folder, then a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from datatailor.errors import UserError
from datatailor.records import Record, stable_hash

# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path` (text in UTF-8, or binary with mode "wb"); on success, fsync and rename it
    over `path`; on an error, remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False, sort_keys=False)
        fh.write("\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    return write_jsonl(path, (r.model_dump(mode="json") for r in records))


# ----------------------------------------------------------------------------- raw reading


def read_yaml(path: Path, what: str = "file") -> Any:
    """Load a YAML file; a missing file or a syntax error is a UserError naming the file and line."""
    import yaml

    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {getattr(exc, 'problem', exc)}") from None


def read_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; a bad line raises UserError naming file and line."""
    with path.open(encoding="utf-8") as fh:
        yield from jsonl_rows(fh, path)


def jsonl_rows(lines: Iterable[str], where: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of JSONL text; a bad line is a UserError naming `where` and line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def read_parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: cannot read Parquet: {exc}") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield i, row


def read_hf_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise UserError(f"{path}: reading an HF datasets folder needs the `datasets` package (pip install 'datatailor[hf]')") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: cannot load HF datasets folder: {exc}") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take "train", else the first split
        split = "train" if "train" in ds else next(iter(ds.keys()))
        ds = ds[split]
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    from datatailor.storage import is_url

    if is_url(path):
        return read_url_rows(str(path))
    p = Path(path)
    if not p.exists():
        raise UserError(f"input not found: {p}")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return read_hf_rows(p)
        raise UserError(f"{p}: a folder is read only when it is an HF `datasets` folder (save_to_disk)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl_rows(p)
    if suffix == ".json":
        return read_json_rows(p)
    if suffix == ".parquet":
        return read_parquet_rows(p)
    # Unknown extension: sniff the first non-blank character.
    head = p.read_text(encoding="utf-8", errors="replace").lstrip()[:1]
    if head == "[":
        return read_json_rows(p)
    if head == "{":
        return read_jsonl_rows(p)
    raise UserError(f"{p}: unknown file type (use .jsonl, .json, .parquet or an HF datasets folder)")


def read_url_rows(url: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of an object (`s3://…` or any fsspec URL), streamed: JSONL line by line, Parquet a row group at a
    time (bounded memory); JSON is read whole, as from a disk."""
    from datatailor.storage import open_input

    suffix = Path(url.split("?", 1)[0]).suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".parquet"):
        raise UserError(f"{url}: unknown object type (use .jsonl, .json or .parquet)")
    fh = open_input(url, "rb")  # fails here, before the first row is asked for, when it is missing
    return _url_rows(url, suffix, fh)


def _url_rows(url: str, suffix: str, fh: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    with fh:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.ParquetFile(fh)
                n = 0
                for batch in table.iter_batches(batch_size=4096):
                    for row in batch.to_pylist():
                        n += 1
                        yield n, row
            except UserError:
                raise
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise UserError(f"{url}: cannot read Parquet: {exc}") from None
            return
        if suffix == ".json":
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                tmp.write(fh.read())
                tmp.flush()
                yield from _renamed(read_json_rows(Path(tmp.name)), tmp.name, url)
            return
        yield from jsonl_rows((raw.decode("utf-8") for raw in _lines(fh)), url)


def _lines(fh: Any, block: int = 8 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, read in large blocks (an fsspec file's own readline is slow: ~10x)."""
    rest = b""
    while chunk := fh.read(block):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _renamed(rows: Iterator[tuple[int, dict[str, Any]]], local: str, url: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Errors about a downloaded copy name the URL it came from."""
    try:
        yield from rows
    except UserError as exc:
        raise UserError(str(exc).replace(local, url)) from None


# ----------------------------------------------------------------------------- row formats


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def find_key(row: dict[str, Any], name: str) -> str | None:
    """The key of `row` that is `name`: spelt exactly, else matched case-insensitively; None if absent."""
    if name in row:
        return name
    low = name.lower()
    for key in row:
        if isinstance(key, str) and key.lower() == low:
            return key
    return None


def get_field(row: dict[str, Any], name: str, default: Any = None) -> Any:
    """`row[name]`, the name matched case-insensitively (an exact spelling wins)."""
    key = find_key(row, name)
    return row[key] if key is not None else default


def first_field(row: dict[str, Any], names: Iterable[str], default: Any = None) -> tuple[str | None, Any]:
    """(key, value) of the first of `names` the row has (case-insensitively), else (None, default)."""
    for name in names:
        key = find_key(row, name)
        if key is not None:
            return key, row[key]
    return None, default


def _from_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": row["instruction"], "input": row.get("input"), "response": row.get("output")}


def _from_instruction(row: dict[str, Any]) -> dict[str, Any]:
    # Self-Instruct / Alpaca seed rows keep their first instance as input/output.
    instances = row.get("instances")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        first = instances[0]
        return {"instruction": row["instruction"], "input": get_field(first, "input"), "response": get_field(first, "output")}
    response = row.get("response", row.get("reference response", row.get("answer")))
    return {"instruction": row["instruction"], "input": row.get("input"), "response": response}


def _from_coachlm(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "instruction": row["Raw Instruction"],
        "input": row.get("Raw Input"),
        "response": row.get("Raw Response"),
        "metadata": {
            "revised_instruction": row.get("Revised Instruction"),
            "revised_input": row.get("Revised Input"),
            "revised_response": row.get("Revised Response"),
        },
    }


def _chat_turns(turns: list[Any], role_key: str, text_key: str, user: set[str], bot: set[str]) -> dict[str, Any]:
    system = ""
    first_user: str | None = None
    reply: str | None = None
    for t in turns:
        if not isinstance(t, dict):
            raise ValueError("each turn must be an object")
        role, text = str(get_field(t, role_key, "")).lower(), _text(get_field(t, text_key))
        if role == "system" and first_user is None:
            system = text
        elif role in user and first_user is None:
            first_user = text
        elif role in bot and first_user is not None and reply is None:
            reply = text
    if first_user is None:
        raise ValueError("no user turn")
    meta: dict[str, Any] = {"system": system} if system else {}
    if len(turns) > (3 if system else 2):
        meta["turns"] = turns
    return {"instruction": first_user, "response": reply, "metadata": meta}


def _alternating_turns(turns: list[Any]) -> dict[str, Any]:
    """A conversation as plain strings, user first and alternating (LIMA's layout)."""
    if not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError("a conversation of plain strings must hold only strings")
    meta: dict[str, Any] = {}
    if len(turns) != 2:
        # Not one (instruction, response) pair: the whole conversation stays, marked as multi-turn.
        meta["turns"] = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return {"instruction": turns[0], "response": turns[1] if len(turns) > 1 else None, "metadata": meta}


def _from_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    turns = get_field(row, "conversations")
    if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
        return _alternating_turns(turns)
    return _chat_turns(turns, "from", "value", {"human", "user"}, {"gpt", "assistant", "bot", "model"})


def _from_messages(row: dict[str, Any]) -> dict[str, Any]:
    return _chat_turns(row["messages"], "role", "content", {"user"}, {"assistant"})


def _from_turns(row: dict[str, Any]) -> dict[str, Any]:
    turns = row["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("`turns` must be a non-empty list")
    meta = {"turns": turns} if len(turns) > 1 else {}
    return {"instruction": _text(turns[0]), "metadata": meta}


def _from_prompt(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": row["prompt"], "response": row.get("completion", row.get("response"))}


def _from_question(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": row["question"], "response": row.get("answer")}


def _from_text(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": row["text"], "response": row.get("response")}


# Checked in order; the first whose keys are present wins. Converters read the canonical spellings
# below; `_canonical_row` copies a differently-cased key under its canonical spelling first.
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "datatailor": (("id", "instruction", "lineage"), lambda r: r),
    "coachlm": (("Raw Instruction",), _from_coachlm),
    "sharegpt": (("conversations",), _from_sharegpt),
    "openai": (("messages",), _from_messages),
    "alpaca": (("instruction", "output"), _from_alpaca),
    "instruction": (("instruction",), _from_instruction),
    "turns": (("turns",), _from_turns),
    "prompt": (("prompt",), _from_prompt),
    "question": (("question",), _from_question),
    "text": (("text",), _from_text),
}

_CONSUMED = {
    "instruction", "input", "output", "response", "instances", "conversations", "messages", "turns",
    "prompt", "completion", "question", "answer", "text", "reference response",
    "Raw Instruction", "Raw Input", "Raw Response", "Revised Instruction", "Revised Input", "Revised Response",
}
_CONSUMED_LOWER = {k.lower(): k for k in _CONSUMED}

# Targets of an explicit `fields` mapping (target -> the file's column name).
FIELD_TARGETS = ("instruction", "input", "response", "category", "id")
# With `instruction` mapped and these targets not: the columns they fall back to, in order.
_FALLBACK = {"input": ("input",), "response": ("output", "response", "answer")}


def _canonical_row(row: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The row with every known field name also under its canonical spelling, and the original keys
    that were matched that way (they are consumed like the canonical ones). A row whose keys are spelt
    canonically comes back unchanged, with no aliases."""
    canon = row
    aliased: set[str] = set()
    for key in row:
        if not isinstance(key, str) or key in _CONSUMED:
            continue
        name = _CONSUMED_LOWER.get(key.lower())
        if name is None or name in row or (canon is not row and name in canon):
            continue  # not a known field, or the exact spelling (or an earlier variant) is there
        if canon is row:
            canon = dict(row)
        canon[name] = row[key]
        aliased.add(key)
    return canon, aliased


def detect_format(row: dict[str, Any], *, exact: bool = False) -> str:
    """The row's format. Keys are matched case-insensitively unless `exact` (then: as before)."""
    canon = row if exact else _canonical_row(row)[0]
    for name, (keys, _) in FORMATS.items():
        if all(k in (row if name == "datatailor" else canon) for k in keys):
            return name
    raise ValueError(
        "unrecognised row: expected Alpaca (instruction/input/output), ShareGPT (conversations), "
        f"OpenAI (messages), or one of instruction/prompt/question/text/turns; found keys {sorted(row)[:8]}"
        " (map other column names with `fields`, e.g. --field instruction=Question)"
    )


def check_fields(fields: dict[str, Any] | None) -> dict[str, str]:
    """A validated `fields` mapping (targets lower-cased); raises ValueError on an unknown target."""
    if not fields:
        return {}
    if not isinstance(fields, dict):
        raise ValueError("`fields` must be a mapping of target name to column name, e.g. {instruction: Question}")
    out: dict[str, str] = {}
    for target, column in fields.items():
        key = str(target).strip().lower()
        if key not in FIELD_TARGETS:
            raise ValueError(f"unknown target {target!r} (targets: {', '.join(FIELD_TARGETS)})")
        if key in out:
            raise ValueError(f"target {key!r} is mapped twice")
        if not isinstance(column, str) or not column.strip():
            raise ValueError(f"{key}: expected a column name, got {column!r}")
        out[key] = column.strip()
    return out


def parse_field_options(values: Iterable[str] | None, option: str = "--field") -> dict[str, str]:
    """`--field TARGET=COLUMN` options as a mapping; a malformed one is a UserError."""
    out: dict[str, str] = {}
    for value in values or ():
        target, sep, column = value.partition("=")
        target, column = target.strip().lower(), column.strip()
        if not sep or not target or not column:
            raise UserError(
                f"{option} {value!r}: expected TARGET=COLUMN, e.g. {option} instruction=Question "
                f"(targets: {', '.join(FIELD_TARGETS)})"
            )
        if target not in FIELD_TARGETS:
            raise UserError(f"{option} {value!r}: unknown target {target!r} (targets: {', '.join(FIELD_TARGETS)})")
        if target in out and out[target] != column:
            raise UserError(f"{option}: {target} is mapped twice ({out[target]!r} and {column!r})")
        out[target] = column
    return out


def mapped_columns(row: dict[str, Any], fields: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """target -> (the row's key, value) for each mapped target; a missing column raises ValueError."""
    out: dict[str, tuple[str, Any]] = {}
    for target, column in fields.items():
        key = find_key(row, column)
        if key is None:
            found = ", ".join(repr(k) for k in list(row)[:12])
            raise ValueError(f"column {column!r} (mapped to {target} by fields) is missing from this row; it has {found}")
        out[target] = (key, row[key])
    return out


def row_to_record(row: dict[str, Any], fmt: str | None = None, fields: dict[str, str] | None = None) -> Record:
    """One raw row as a Record: the format detected (or `fmt`), or read through a `fields` mapping."""
    fields = check_fields(fields)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    mapped = mapped_columns(row, fields) if fields else {}
    used = {key for key, _ in mapped.values()}
    rest = {k: v for k, v in row.items() if k not in used} if used else row
    if "instruction" in mapped:
        if fmt is not None:
            raise ValueError(f"format {fmt!r} and a mapped instruction column (fields) exclude each other")
        converted: dict[str, Any] = {"instruction": mapped["instruction"][1]}
        consumed: set[str] = set()
        for target, names in _FALLBACK.items():
            if target in mapped:
                converted[target] = mapped[target][1]
            else:
                key, converted[target] = first_field(rest, names)
                if key is not None:
                    consumed.add(key)
        metadata = {k: v for k, v in rest.items() if k not in consumed}
    else:
        canon, aliased = _canonical_row(rest)
        fmt = fmt or detect_format(rest)
        if fmt == "datatailor":
            if fields:
                raise ValueError("a `fields` mapping does not apply to datatailor records")
            return Record.model_validate(row)
        keys, convert = FORMATS[fmt]
        missing = [k for k in keys if k not in canon]
        if missing:
            raise ValueError(f"format {fmt!r} needs field(s) {missing}")
        converted = convert(canon)
        for target in ("input", "response"):
            if target in mapped:
                converted[target] = mapped[target][1]
        metadata = {k: v for k, v in rest.items() if k not in _CONSUMED and k not in aliased}
    instruction = _text(converted.get("instruction")).strip()
    input_text = _text(converted.get("input")).strip()
    metadata.update(converted.get("metadata") or {})
    for target in ("category", "id"):
        if target in mapped:
            metadata[target] = mapped[target][1]
    if not instruction and input_text:
        # Real data has rows whose whole task sits in the input field (e.g. 2 of CoachLM's 2,301).
        instruction, input_text = input_text, ""
        metadata["repaired"] = "empty instruction: the input was used as the instruction"
    if not instruction:
        raise ValueError("empty instruction")
    response = converted.get("response")
    return Record.new(
        instruction=instruction,
        input=input_text,
        response=_text(response) if response is not None else None,
        metadata=metadata,
    )


def read_records(
    path: str | Path, fmt: str | None = None, limit: int | None = None, fields: dict[str, str] | None = None
) -> list[Record]:
    """Load a dataset as records. Ids are stable; a repeated row gets a numbered id, never a clash.

    `fields` maps target names (instruction, input, response, category, id) to the file's column names.
    """
    return list(iter_records(path, fmt, limit, fields))


def iter_records(
    path: str | Path, fmt: str | None = None, limit: int | None = None, fields: dict[str, str] | None = None
) -> Iterator[Record]:
    """`read_records` as a stream: the file is read as it is consumed (JSONL; JSON and Parquet are read whole).

    Repeated ids are found with a compact digest set, so millions of rows cost about 16 bytes each."""
    from datatailor.storage import is_url
    from datatailor.store import IdSet

    p: Any = str(path) if is_url(path) else Path(path)
    try:
        fields = check_fields(fields)
    except ValueError as exc:
        raise UserError(f"{p}: fields: {exc}") from None
    seen = IdSet()
    repeats: dict[str, int] = {}
    n = 0
    if limit is not None and limit <= 0:
        return
    for lineno, row in read_rows(p):
        try:
            record = row_to_record(row, fmt, fields)
        except (ValueError, KeyError, TypeError) as exc:
            where = "line" if str(p).lower().endswith((".jsonl", ".ndjson")) else "item"
            raise UserError(f"{p}:{lineno}: {where} {lineno}: {exc}") from None
        except Exception as exc:  # pydantic ValidationError on a datatailor-format row
            raise UserError(f"{p}:{lineno}: invalid record: {str(exc).splitlines()[0]}") from None
        if not seen.add(record.id):
            k = repeats.get(record.id, 1)
            repeats[record.id] = k + 1
            record = record.model_copy(update={"id": stable_hash(record.id, k)})
        yield record
        n += 1
        if limit is not None and n >= limit:
            return


# ----------------------------------------------------------------------------- export formats


def to_alpaca(r: Record) -> dict[str, Any]:
    return {"instruction": r.instruction, "input": r.input, "output": r.response or ""}


def to_sharegpt(r: Record) -> dict[str, Any]:
    return {"id": r.id, "conversations": [{"from": "human", "value": r.prompt}, {"from": "gpt", "value": r.response or ""}]}


def to_openai(r: Record) -> dict[str, Any]:
    messages = []
    if system := r.metadata.get("system"):
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.response or ""}]
    return {"messages": messages}


EXPORTERS: dict[str, Callable[[Record], dict[str, Any]]] = {
    "alpaca": to_alpaca,
    "sharegpt": to_sharegpt,
    "openai": to_openai,
    "datatailor": lambda r: r.model_dump(mode="json"),
}


def export_records(records: Iterable[Record], path: str | Path, fmt: str) -> int:
    if fmt not in EXPORTERS:
        raise UserError(f"unknown export format {fmt!r} (known: {', '.join(EXPORTERS)})")
    convert = EXPORTERS[fmt]
    p = Path(path)
    if p.suffix.lower() not in (".json", ".parquet"):
        return write_jsonl(p, (convert(r) for r in records))  # streamed
    rows = [convert(r) for r in records]
    if p.suffix.lower() == ".json":
        write_json(p, rows)
        return len(rows)
    import pyarrow as pa  # .parquet
    import pyarrow.parquet as pq

    tmp = p.with_name(f".{p.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, p)
    return len(rows)
