"""The shipped test sets load with the right sizes and reference answers, and match the original files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datatailor.errors import UserError
from datatailor.evaluate.testsets import resolve_testset, shipped_dir, shipped_testsets

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
