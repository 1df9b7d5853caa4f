"""Input formats, exports, and bad input (clear message, exit code 2, nothing overwritten)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datatailor.errors import UserError
from datatailor.io import detect_format, export_records, read_records
from tests.conftest import cli_env
from tests.support import read_jsonl, write_rows


@pytest.mark.parametrize(
    ("relpath", "count", "fmt", "first_words"),
    [
        ("vicuna_bench/question.jsonl", 80, "turns", "How can I improve my time"),
        ("mt_bench/question.jsonl", 80, "turns", "Compose an engaging travel blog"),
        ("self_instruct_user_oriented/user_oriented_instructions.jsonl", 252, "instruction", "The sentence you are given"),
        ("stanford_alpaca/seed_tasks.jsonl", 175, "instruction", "Is there anything I can eat"),
        ("coachlm/Expert Revision Dataset.json", 2301, "coachlm", "Select two of the given topics"),
        ("coachlm/CoachLM150 Test Set.json", 150, "instruction", "I need help budgeting"),
        ("alpaca_eval/model_outputs_without_koala.json", 649, "alpaca", None),
        ("teams_rl/seed-543-2023-08-28-16-25-18/Generate_Alpaca.json", None, "alpaca", "Devise a meticulously"),
    ],
)
def test_shared_benchmark_files_load(shared_data: Path, relpath: str, count: int | None, fmt: str, first_words: str | None) -> None:
    path = shared_data / relpath
    records = read_records(path)
    if count is not None:
        assert len(records) == count
    assert len({r.id for r in records}) == len(records)
    first_row = (json.loads(path.read_text())[0] if path.suffix == ".json"
                 else json.loads(path.read_text().splitlines()[0]))
    assert detect_format(first_row) == fmt
    if first_words:
        assert records[0].instruction.startswith(first_words)
    assert all(r.instruction.strip() for r in records)


def test_self_instruct_instances_and_coachlm_revisions(shared_data: Path) -> None:
    si = read_records(shared_data / "self_instruct_user_oriented/user_oriented_instructions.jsonl")
    assert si[0].input.startswith("If you have any questions about my rate")
    assert si[0].metadata["motivation_app"] == "Grammarly"
    coach = read_records(shared_data / "coachlm/Expert Revision Dataset.json")
    assert coach[0].metadata["revised_response"] and coach[0].response
    test150 = read_records(shared_data / "coachlm/CoachLM150 Test Set.json")
    assert test150[0].response and test150[0].response.startswith("Budgeting your money")
    mt = read_records(shared_data / "mt_bench/question.jsonl")
    assert len(mt[0].metadata["turns"]) == 2 and mt[0].metadata["category"] == "writing"


def test_chat_formats_and_plain_rows(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Name a color.", "completion": "Blue"},
        {"text": "Tell me a joke."},
        {"question": "Why is the sky blue?"},
        {"turns": ["First turn", "Second turn"]},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
    ]
    records = read_records(write_rows(tmp_path / "mixed.jsonl", rows))
    assert [r.instruction for r in records] == ["Hi there", "What is 2+2?", "Name a color.", "Tell me a joke.",
                                                 "Why is the sky blue?", "First turn", "Translate"]
    assert records[0].response == "Hello!" and records[0].metadata["system"] == "Be brief."
    assert records[1].response == "4" and records[2].response == "Blue"
    assert records[6].input == "bonjour" and records[6].response == "hello"


def test_parquet_json_and_hf_folder_roundtrip(tmp_path: Path) -> None:
    rows = [{"instruction": f"Task {i}", "input": "", "output": f"Done {i}"} for i in range(4)]
    base = read_records(write_rows(tmp_path / "a.jsonl", rows))
    export_records(base, tmp_path / "a.parquet", "alpaca")
    export_records(base, tmp_path / "a.json", "alpaca")
    for path in (tmp_path / "a.parquet", tmp_path / "a.json"):
        again = read_records(path)
        assert [(r.id, r.instruction, r.response) for r in again] == [(r.id, r.instruction, r.response) for r in base]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    hf = read_records(tmp_path / "hf")
    assert [r.id for r in hf] == [r.id for r in base]


def test_exports(tmp_path: Path) -> None:
    records = read_records(write_rows(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}]))
    for fmt in ("alpaca", "sharegpt", "openai"):
        export_records(records, tmp_path / f"x.{fmt}.jsonl", fmt)
    assert read_jsonl(tmp_path / "x.alpaca.jsonl") == [{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}]
    share = read_jsonl(tmp_path / "x.sharegpt.jsonl")[0]["conversations"]
    assert share == [{"from": "human", "value": "Say hi\n\nto Bob"}, {"from": "gpt", "value": "Hi Bob"}]
    msgs = read_jsonl(tmp_path / "x.openai.jsonl")[0]["messages"]
    assert msgs[-1] == {"role": "assistant", "content": "Hi Bob"}
    # each export reads back to the same pair
    for fmt in ("alpaca", "sharegpt", "openai"):
        back = read_records(tmp_path / f"x.{fmt}.jsonl")[0]
        assert (back.prompt, back.response) == (records[0].prompt, "Hi Bob")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"instruction": "ok"}\n{"instruction": "broken"\n', "input.jsonl:2: malformed JSON line"),
        ('{"instruction": "ok"}\n["not", "an", "object"]\n', "input.jsonl:2: expected a JSON object"),
        ('{"instruction": "ok"}\n{"foo": "bar"}\n', "input.jsonl:2: line 2: unrecognised row"),
        ('{"instruction": "   "}\n', "input.jsonl:1: line 1: empty instruction"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_records(path)


def test_malformed_line_via_cli_exit_2_and_nothing_overwritten(tmp_path: Path) -> None:
    import yaml

    write_rows(tmp_path / "input.jsonl", [{"instruction": f"Question {i}"} for i in range(5)])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "models": {"strong": {"backend": "scripted", "model": "echo", "rules": [{"match": ".*", "reply": "x"}]}},
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong"}],
    }))
    cmd = [sys.executable, "-m", "datatailor", "run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert subprocess.run(cmd, env=cli_env(), capture_output=True, timeout=60).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    with (tmp_path / "input.jsonl").open("a") as fh:
        fh.write('{"instruction": "unterminated\n')
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "input.jsonl:6: malformed JSON line" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before


def test_missing_input_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="input not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hello world")
    with pytest.raises(UserError, match="unknown file type"):
        read_records(tmp_path / "data.txt")
