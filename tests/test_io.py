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


# ----------------------------------------------------------------------------- case-insensitive names, `fields`

# Everything read_records gives for each shared file (ids, texts, metadata), as it was before field
# names were matched case-insensitively: sha256 of the records' JSON dump. A change here changes run ids.
SHARED_DIGESTS = {
    "alpaca_eval/model_outputs_without_koala.json": "24d63dcd9f0c0869",
    "coachlm/CoachLM150 Test Set.json": "0b1b9ef5e41f732c",
    "coachlm/Expert Revision Dataset.json": "aed5ba25fdd18f89",
    "coachlm/example.json": "6beb8b2733548a85",
    "lima/train.jsonl": "b8d517426c18ecf6",  # conversations as plain strings, user first (REFED's references)
    "mt_bench/question.jsonl": "2df8ba41ff339742",
    "self_instruct_user_oriented/user_oriented_instructions.jsonl": "488f93417da50258",
    "stanford_alpaca/seed_tasks.jsonl": "387f452a23c9b7c2",
    "teams_rl/seed-543-2023-08-28-16-25-18/Generate_Alpaca.json": "8f393e904d7a9b4a",
    "teams_rl/seed-543-2023-08-29-02-04-59/Generate_Alpaca.json": "e031f5a81347706a",
    "teams_rl/seed-543-2023-08-29-06-58-05/Generate_Alpaca.json": "22f008a55ee0df95",
    "vicuna_bench/question.jsonl": "2647795d222ba294",
}
# Files under the shared data that are not instruction data (see their SOURCE.md): a clear error.
NOT_INSTRUCTION_DATA = {
    "fastchat_judge_prompts/judge_prompts.jsonl": "unrecognised row",
    "mt_bench/reference_answer/gpt-4.jsonl": "unrecognised row",
    "vicuna_bench/reference_answer/gpt-4.jsonl": "unrecognised row",
}


def records_digest(records: list) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([r.model_dump(mode="json") for r in records], sort_keys=True).encode()).hexdigest()[:16]


def test_every_shared_file_loads_exactly_as_before(shared_data: Path) -> None:
    files = sorted(str(p.relative_to(shared_data)) for p in shared_data.rglob("*") if p.suffix in (".json", ".jsonl"))
    assert sorted([*SHARED_DIGESTS, *NOT_INSTRUCTION_DATA]) == files
    for rel, digest in SHARED_DIGESTS.items():
        assert records_digest(read_records(shared_data / rel)) == digest, rel
    for rel, message in NOT_INSTRUCTION_DATA.items():
        with pytest.raises(UserError, match=message):
            read_records(shared_data / rel)


def test_existing_row_formats_keep_identical_ids(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "source": "x"},
        {"instruction": "Sum", "instances": [{"input": "1 2", "output": "3"}], "id": "seed_1"},
        {"Raw Instruction": "Fix it", "Raw Input": "", "Raw Response": "ok", "Revised Response": "done", "Distance": 3},
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Name a color.", "completion": "Blue"},
        {"question": "Why is the sky blue?", "answer": "Rayleigh"},
        {"text": "Tell me a joke."},
        {"turns": ["First turn", "Second turn"], "question_id": 7, "category": "writing"},
    ]
    records = read_records(write_rows(tmp_path / "mixed.jsonl", rows))
    # The ids and metadata these rows got before field names were matched case-insensitively.
    assert [r.id for r in records] == [
        "0badfc06a2e00f00", "54c6040bde747f7f", "6506cdcf7d96b286", "f53f14aa3c008043", "65300d3608671b38",
        "14b26279d67e51cf", "8c4c8867093ef2eb", "2fad57326dfd288a", "c32422cd57e9af28",
    ]
    assert records[0].metadata == {"source": "x"} and records[1].metadata == {"id": "seed_1"}
    assert records[2].metadata == {"Distance": 3, "revised_instruction": None, "revised_input": None, "revised_response": "done"}
    assert records[8].metadata == {"question_id": 7, "category": "writing", "turns": ["First turn", "Second turn"]}


def test_wizardlm_testset_layout_loads(tmp_path: Path) -> None:
    """WizardLM's Evol-Instruct test set is published with keys idx, Skill, Difficulty, Instruction."""
    rows = [
        {"idx": 1, "Skill": "Math", "Difficulty": 3, "Instruction": "What is 17 * 23?"},
        {"idx": 2, "Skill": "Code Generation", "Difficulty": 8, "Instruction": "Write a function that reverses a list."},
    ]
    path = write_rows(tmp_path / "WizardLM_testset.jsonl", rows)
    assert detect_format(rows[0]) == "instruction"
    records = read_records(path)
    assert [r.instruction for r in records] == ["What is 17 * 23?", "Write a function that reverses a list."]
    assert records[0].metadata == {"idx": 1, "Skill": "Math", "Difficulty": 3}
    assert records[0].id == read_records(write_rows(tmp_path / "lower.jsonl", [{"instruction": "What is 17 * 23?"}]))[0].id
    # the published file is a JSON list
    (tmp_path / "WizardLM_testset.json").write_text(json.dumps(rows), encoding="utf-8")
    assert [r.id for r in read_records(tmp_path / "WizardLM_testset.json")] == [r.id for r in records]


def test_upper_case_keys_match_lower_case_ones(tmp_path: Path) -> None:
    lower = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"Raw Instruction": "Fix it", "Raw Input": "x", "Raw Response": "ok", "Revised Response": "done"},
        {"question": "Why?", "answer": "Because."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    upper = [
        {"Instruction": "Translate", "Input": "bonjour", "Output": "hello"},
        {"raw instruction": "Fix it", "RAW INPUT": "x", "Raw response": "ok", "revised response": "done"},
        {"Question": "Why?", "Answer": "Because."},
        {"Messages": [{"Role": "user", "Content": "Hi"}, {"Role": "assistant", "Content": "Hello"}]},
    ]
    a = read_records(write_rows(tmp_path / "lower.jsonl", lower))
    b = read_records(write_rows(tmp_path / "upper.jsonl", upper))
    assert [(r.id, r.instruction, r.input, r.response, r.metadata) for r in b] == [
        (r.id, r.instruction, r.input, r.response, r.metadata) for r in a
    ]
    assert [detect_format(r) for r in upper] == ["alpaca", "coachlm", "question", "openai"]
    # an exact spelling wins over one that differs only in case; the other stays in metadata
    both = read_records(write_rows(tmp_path / "both.jsonl", [{"instruction": "exact", "Instruction": "other"}]))[0]
    assert both.instruction == "exact" and both.metadata == {"Instruction": "other"}


def test_fields_map_custom_columns(tmp_path: Path) -> None:
    rows = [
        {"Question": "Who wrote Hamlet?", "Context": "English drama", "Answer": "Shakespeare", "Topic": "literature", "Row": 7},
        {"Question": "Capital of France?", "Context": "", "Answer": "Paris", "Topic": "geography", "Row": 8},
    ]
    path = write_rows(tmp_path / "qa.jsonl", rows)
    fields = {"instruction": "question", "input": "CONTEXT", "response": "Answer", "category": "Topic"}
    records = read_records(path, fields=fields)
    assert [(r.instruction, r.input, r.response) for r in records] == [
        ("Who wrote Hamlet?", "English drama", "Shakespeare"), ("Capital of France?", "", "Paris")]
    assert records[0].metadata == {"Row": 7, "category": "literature"}
    assert records[0].id == read_records(write_rows(tmp_path / "a.jsonl", [{"instruction": "Who wrote Hamlet?", "input": "English drama"}]))[0].id
    # `id` lands in metadata; an unmapped response falls back to output/response/answer
    rec = read_records(path, fields={"instruction": "Question", "id": "Row"})[0]
    assert rec.metadata == {"Context": "English drama", "Topic": "literature", "id": 7} and rec.response == "Shakespeare"
    # without `instruction` the format is still detected, and mapped columns override it
    alpaca = write_rows(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi", "output": "hi", "better": "Hello!", "kind": "greeting"}])
    rec = read_records(alpaca, fields={"response": "better", "category": "kind"})[0]
    assert (rec.instruction, rec.response, rec.metadata) == ("Say hi", "Hello!", {"category": "greeting"})


def test_missing_mapped_column_names_file_line_and_column(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", [{"Question": "A?", "Answer": "a"}, {"Question": "B?"}])
    with pytest.raises(UserError, match=r"qa.jsonl:2: line 2: column 'Answer' \(mapped to response by fields\) is missing"):
        read_records(path, fields={"instruction": "Question", "response": "Answer"})
    with pytest.raises(UserError, match=r"qa.jsonl: fields: unknown target 'prompt'"):
        read_records(path, fields={"prompt": "Question"})
    with pytest.raises(UserError, match="exclude each other"):
        read_records(path, "question", fields={"instruction": "Question"})


def test_recipe_input_fields(tmp_path: Path) -> None:
    from datatailor.recipe import parse_recipe
    from datatailor.validate import validate_recipe

    stages = [{"type": "respond", "role": "strong"}]
    models = {"strong": {"backend": "scripted", "model": "echo", "rules": [{"match": ".*", "reply": "x"}]}}
    plain = parse_recipe({"models": models, "input": "in.jsonl", "stages": stages})
    assert "fields" not in plain.to_json()["input"]  # recipes without a mapping hash as before
    mapped = parse_recipe({"models": models, "input": {"path": "in.jsonl", "fields": {"Instruction": "Question"}}, "stages": stages})
    assert mapped.input is not None and mapped.input.fields == {"instruction": "Question"}
    with pytest.raises(UserError, match=r"input.fields: unknown target 'prompt'"):
        parse_recipe({"models": models, "input": {"path": "in.jsonl", "fields": {"prompt": "Question"}}, "stages": stages})
    with pytest.raises(UserError, match=r"input: give either `format` or `fields.instruction`"):
        parse_recipe({"models": models, "input": {"path": "in.jsonl", "format": "alpaca", "fields": {"instruction": "Q"}}, "stages": stages})
    import yaml

    write_rows(tmp_path / "in.jsonl", [{"Question": f"Q{i}?", "Topic": "t"} for i in range(3)])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"models": models, "input": {"path": "in.jsonl", "fields": {"instruction": "Question"}}, "stages": stages}))
    report = validate_recipe(tmp_path / "recipe.yaml")
    assert "input: 3 records from in.jsonl" in report.lines


def test_run_field_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from datatailor.cli import main

    write_rows(tmp_path / "in.jsonl", [{"Prompt Text": f"Question {i}", "Topic": "t"} for i in range(3)])
    models = {"strong": {"backend": "scripted", "model": "echo", "rules": [{"match": ".*", "reply": "x"}]}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": models, "input": {"path": "in.jsonl", "fields": {"category": "Topic"}},
                                      "stages": [{"type": "respond", "role": "strong"}]}))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 2
    assert "in.jsonl:1: line 1: unrecognised row" in capsys.readouterr().err
    assert main(["run", str(recipe), "--out", str(out), "--no-progress", "--field", "instruction=prompt text"]) == 0
    data = read_jsonl(out / "data.jsonl")
    assert [r["instruction"] for r in data] == ["Question 0", "Question 1", "Question 2"]
    assert data[0]["metadata"]["category"] == "t"  # the recipe's mapping is kept, --field extends it


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("instruction", "--field 'instruction': expected TARGET=COLUMN"),
        ("=Question", "expected TARGET=COLUMN"),
        ("instruction=", "expected TARGET=COLUMN"),
        ("prompt=Question", "--field 'prompt=Question': unknown target 'prompt' (targets: instruction, input, response, category, id)"),
    ],
)
def test_bad_field_option_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str) -> None:
    from datatailor.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("input: in.jsonl\nstages: [{type: respond, role: strong}]\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--field", value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["eval", "--testset", "vicuna80", "--out", str(tmp_path / "ev"), "--field", value]) == 2
    assert message in capsys.readouterr().err


def test_lima_conversations_of_plain_strings(shared_data: Path) -> None:
    records = read_records(shared_data / "lima" / "train.jsonl")
    single = [r for r in records if "turns" not in r.metadata]
    assert (len(records), len(single)) == (1030, 1000)  # LIMA train: exactly 1,000 single-turn pairs
    assert single[0].instruction.startswith("Can brain cells move?") and single[0].response
    multi = next(r for r in records if "turns" in r.metadata)
    assert multi.metadata["turns"][0]["from"] == "human" and multi.metadata["source"] == "multi_turn"


def test_plain_string_conversations(tmp_path: Path) -> None:
    rows = [{"conversations": ["Q?", "A."]}, {"conversations": ["Q1?", "A1.", "Q2?"]}, {"conversations": ["Q", {"x": 1}]}]
    path = write_rows(tmp_path / "c.jsonl", rows[:2])
    pair, multi = read_records(path)
    assert (pair.instruction, pair.response, pair.metadata) == ("Q?", "A.", {})
    assert [t["value"] for t in multi.metadata["turns"]] == ["Q1?", "A1.", "Q2?"]
    with pytest.raises(UserError, match="line 1"):
        read_records(write_rows(tmp_path / "bad.jsonl", rows[2:]))
