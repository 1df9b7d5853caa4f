"""The shipped test sets load with the right sizes and reference answers, and match the original files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datatailor.errors import UserError
from datatailor.evaluate.testsets import load_testset_file, resolve_testset, shipped_dir, shipped_testsets

EXPECTED = {"vicuna80": (80, 10), "mtbench": (80, 30), "selfinstruct252": (252, 252), "coachlm150": (150, 150)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shipped_testset_sizes_and_references(name: str) -> None:
    ts = resolve_testset(name)
    items, refs = EXPECTED[name]
    assert len(ts.records) == items
    assert ts.n_references == refs
    assert len({r.id for r in ts.records}) == items
    assert all(r.instruction.strip() for r in ts.records)
    assert all(r.metadata["testset"] == name for r in ts.records)


def test_every_shipped_file_is_listed_with_attribution() -> None:
    folder = shipped_dir()
    assert sorted(p.name for p in folder.glob("*.jsonl")) == sorted(f"{n}.jsonl" for n in shipped_testsets())
    attribution = (folder / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for name in shipped_testsets():
        assert f"`{name}.jsonl`" in attribution
    assert "Apache" in attribution and "AlpacaEval" in attribution


def test_references_attach_to_the_right_items() -> None:
    vicuna = {r.metadata["item_id"]: r for r in resolve_testset("vicuna80").records}
    with_ref = sorted(int(i) for i, r in vicuna.items() if r.metadata.get("reference"))
    assert with_ref == list(range(61, 71))  # FastChat's GPT-4 answers cover the coding and math questions
    assert "#include" in vicuna["61"].metadata["reference"]
    mt = {r.metadata["item_id"]: r for r in resolve_testset("mtbench").records}
    assert mt["101"].metadata["reference"].startswith("If you have just overtaken the second person")
    assert mt["81"].metadata["category"] == "writing" and "reference" not in mt["81"].metadata
    si = resolve_testset("selfinstruct252").records[0]
    assert si.metadata["item_id"] == "user_oriented_task_0" and si.metadata["category"] == "Grammarly"
    assert si.input.startswith("If you have any questions about my rate")
    assert si.metadata["reference"].startswith("If you have any questions about my rate or find it necessary")
    coach = resolve_testset("coachlm150").records[0]
    assert coach.instruction == "I need help budgeting my money."
    assert coach.metadata["reference"].startswith("Budgeting your money is an important task")


def test_aliases_resolve() -> None:
    assert resolve_testset("Vicuna").name == "vicuna80"
    assert resolve_testset("self-instruct").name == "selfinstruct252"
    assert resolve_testset("MT-Bench").name == "mtbench"


@pytest.mark.parametrize(
    "name,relative",
    [
        ("vicuna80", "vicuna_bench/question.jsonl"),
        ("mtbench", "mt_bench/question.jsonl"),
        ("selfinstruct252", "self_instruct_user_oriented/user_oriented_instructions.jsonl"),
        ("coachlm150", "coachlm/CoachLM150 Test Set.json"),
    ],
)
def test_shipped_copy_matches_the_original_files(shared_data: Path, name: str, relative: str) -> None:
    """Loading the benchmark file as users have it gives the same items and references as the shipped copy."""
    original = resolve_testset(str(shared_data / relative))
    shipped = resolve_testset(name)
    assert [(r.instruction, r.input) for r in original.records] == [(r.instruction, r.input) for r in shipped.records]
    assert [r.metadata.get("reference") for r in original.records] == [r.metadata.get("reference") for r in shipped.records]
    assert [r.metadata["item_id"] for r in original.records] == [r.metadata["item_id"] for r in shipped.records]


def test_alpacaeval_needs_the_users_copy(shared_data: Path) -> None:
    with pytest.raises(UserError, match="alpacaeval:PATH"):
        resolve_testset("alpacaeval")
    ts = resolve_testset(f"alpacaeval:{shared_data / 'alpaca_eval' / 'model_outputs_without_koala.json'}")
    assert ts.name == "alpacaeval" and len(ts.records) == 649
    assert ts.records[0].metadata["category"] == "helpful_base"
    assert ts.records[0].metadata["reference"].startswith("Some famous actors")


def test_any_jsonl_of_instructions(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [{"instruction": "Say hi."}, {"instruction": "Add 2 and 2.", "output": "4"}, {"prompt": "Name a fruit.", "reference": "apple"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ts = resolve_testset(str(path))
    assert ts.name == "mine" and len(ts.records) == 3
    assert [r.metadata.get("reference") for r in ts.records] == [None, "4", "apple"]
    assert ts.records[0].response is None  # the candidate answer goes here later


def test_bad_testset_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown test set"):
        resolve_testset("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        resolve_testset(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no items"):
        resolve_testset(str(empty))
    with pytest.raises(UserError, match="not found"):
        resolve_testset(f"alpacaeval:{tmp_path / 'missing.json'}")


# ----------------------------------------------------------------------------- case-insensitive names, `fields`

# Everything the loader gives (record ids, texts, metadata) as it was before field names were matched
# case-insensitively: sha256 of the records' JSON dump. The eval folder compares testset.jsonl to resume,
# so a change here would refuse to resume earlier evaluations.
SHIPPED_DIGESTS = {"vicuna80": "aa2cae3aae590078", "mtbench": "d2500ef5e703ea81",
                   "selfinstruct252": "6350b1ed164bcf33", "coachlm150": "e2574fedc1c689d3"}
ORIGINAL_DIGESTS = {
    "vicuna_bench/question.jsonl": "242d054212c37c95",
    "mt_bench/question.jsonl": "d8a7ddf7ef9d40f4",
    "self_instruct_user_oriented/user_oriented_instructions.jsonl": "d654f904abd6e573",
    "coachlm/CoachLM150 Test Set.json": "c13a940634964bee",
    "alpaca_eval/model_outputs_without_koala.json": "2c92f83836b17b15",
    "stanford_alpaca/seed_tasks.jsonl": "b73c3380b6226be4",
    "coachlm/Expert Revision Dataset.json": "6338caa47bfeef5d",
    "teams_rl/seed-543-2023-08-29-02-04-59/Generate_Alpaca.json": "6907563b5effeb76",
}


def records_digest(records: list) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([r.model_dump(mode="json") for r in records], sort_keys=True).encode()).hexdigest()[:16]


def test_shipped_testsets_load_exactly_as_before() -> None:
    for name, digest in SHIPPED_DIGESTS.items():
        assert records_digest(resolve_testset(name).records) == digest, name


def test_original_files_load_exactly_as_before(shared_data: Path) -> None:
    for rel, digest in ORIGINAL_DIGESTS.items():
        assert records_digest(load_testset_file(shared_data / rel).records) == digest, rel


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WIZARDLM_ROWS = [
    {"idx": 1, "Skill": "Math", "Difficulty": 3, "Instruction": "What is 17 * 23?"},
    {"idx": 2, "Skill": "Code Generation", "Difficulty": 8, "Instruction": "Write a function that reverses a list."},
    {"idx": 3, "Skill": "Math", "Difficulty": 5, "Instruction": "Solve x^2 = 9."},
]


def test_wizardlm_testset_layout(tmp_path: Path) -> None:
    """WizardLM's Evol-Instruct test set (218 rows) is published with keys idx, Skill, Difficulty, Instruction."""
    ts = resolve_testset(str(write_jsonl(tmp_path / "WizardLM_testset.jsonl", WIZARDLM_ROWS)))
    assert ts.name == "WizardLM_testset" and len(ts.records) == 3
    first = ts.records[0]
    assert first.instruction == "What is 17 * 23?" and first.input == ""
    assert first.metadata == {"testset": "WizardLM_testset", "item_id": "1", "category": "Math", "Difficulty": 3}
    assert [r.metadata["category"] for r in ts.records] == ["Math", "Code Generation", "Math"]
    assert ts.n_references == 0
    # --field category=... picks another column; the Skill column is then kept as an extra
    by_difficulty = resolve_testset(str(tmp_path / "WizardLM_testset.jsonl"), fields={"category": "difficulty"})
    assert by_difficulty.records[1].metadata == {"testset": "WizardLM_testset", "item_id": "2", "category": 8, "Skill": "Code Generation"}
    assert [r.id for r in by_difficulty.records] == [r.id for r in ts.records]  # ids come from the item id


def test_upper_case_alpaca_testset(tmp_path: Path) -> None:
    upper = write_jsonl(tmp_path / "upper.jsonl", [{"ID": "a1", "Category": "c", "Instruction": "Say hi", "Input": "Bob", "Output": "Hi Bob"}])
    lower = write_jsonl(tmp_path / "lower.jsonl", [{"id": "a1", "category": "c", "instruction": "Say hi", "input": "Bob", "output": "Hi Bob"}])
    a, b = load_testset_file(upper, name="t").records[0], load_testset_file(lower, name="t").records[0]
    assert a.model_dump() == b.model_dump()
    assert a.metadata == {"testset": "t", "item_id": "a1", "category": "c", "reference": "Hi Bob"}


def test_fields_map_custom_columns(tmp_path: Path) -> None:
    rows = [
        {"Question": "Who wrote Hamlet?", "Context": "English drama", "Answer": "Shakespeare", "Topic": "literature", "Row": 7},
        {"Question": "Capital of France?", "Context": "", "Answer": "Paris", "Topic": "geography", "Row": 8},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    fields = {"instruction": "Question", "input": "Context", "response": "Answer", "category": "Topic", "id": "Row"}
    ts = resolve_testset(str(path), fields=fields)
    first = ts.records[0]
    assert (first.instruction, first.input) == ("Who wrote Hamlet?", "English drama")
    assert first.metadata == {"testset": "qa", "item_id": "7", "category": "literature", "reference": "Shakespeare"}
    assert ts.n_references == 2
    with pytest.raises(UserError, match=r"qa.jsonl:1: column 'Prompt' \(mapped to instruction by fields\) is missing from this row"):
        resolve_testset(str(path), fields={"instruction": "Prompt"})
    with pytest.raises(UserError, match=r"qa.jsonl: fields: unknown target 'topic'"):
        resolve_testset(str(path), fields={"topic": "Topic"})
    # a mapping also applies to FastChat question files and to the shipped sets
    mt = resolve_testset("mtbench", fields={"id": "category"})
    assert mt.records[0].metadata["item_id"] == "writing"


def test_eval_field_option(tmp_path: Path) -> None:
    import yaml

    from datatailor.cli import main

    path = write_jsonl(tmp_path / "wiz.jsonl", [{**row, "Instruction": f"{row['Instruction']} key=GOOD"} for row in WIZARDLM_ROWS])
    models = {
        "candidate": {"backend": "scripted", "model": "cand", "rules": [{"match": ".*", "reply": "GOOD"}]},
        "reference": {"backend": "scripted", "model": "ref", "rules": [{"match": ".*", "reply": "REF"}]},
        "judge": {"backend": "scripted", "model": "judge", "handler": "tests.support:judge_prefers_good"},
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": models}), encoding="utf-8")
    base = ["eval", "--testset", str(path), "--models", str(tmp_path / "models.yaml"), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "by_skill")]) == 0
    by_skill = json.loads((tmp_path / "by_skill" / "eval.json").read_text())
    assert sorted(by_skill["by_category"]) == ["Code Generation", "Math"]
    assert by_skill["by_category"]["Math"]["wins"] == 2
    assert main([*base, "--out", str(tmp_path / "by_difficulty"), "--field", "category=Difficulty"]) == 0
    by_difficulty = json.loads((tmp_path / "by_difficulty" / "eval.json").read_text())
    assert sorted(by_difficulty["by_category"]) == ["3", "5", "8"]
