"""The `decontam` stage: pairs that overlap a test set are dropped with the item and the evidence."""

from __future__ import annotations

from pathlib import Path

import pytest

from datatailor.errors import UserError
from tests.support import make_recipe, read_jsonl, run


def test_overlapping_pairs_are_dropped_naming_the_item(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Please answer: How can I improve my time management skills? Be brief."},  # vicuna80 item 1, verbatim
        {"instruction": "How could time management skills be improved at work, and by whom?"},  # shares words, not the question
        {"instruction": "Write a haiku about the sea."},
    ]
    result = run(make_recipe(tmp_path, [{"type": "decontam", "testsets": ["vicuna80"]}], rows=rows), tmp_path / "out")
    assert result.status == "complete" and result.records == 2
    (failure,) = read_jsonl(tmp_path / "out/failures.jsonl")
    assert failure["kind"] == "contaminated" and failure["record"]["instruction"] == rows[0]["instruction"]
    assert "vicuna80 item 1 (containment" in failure["message"]
    kept = read_jsonl(tmp_path / "out/data.jsonl")
    assert [r["instruction"] for r in kept] == [rows[1]["instruction"], rows[2]["instruction"]]
    assert kept[0]["lineage"][-1]["decision"] == "kept"


def test_a_long_shared_ngram_is_caught_and_a_stricter_threshold_lets_less_through(tmp_path: Path) -> None:
    long_item = "What are the differences between plant-based and animal-based protein sources?"  # vicuna80 item 6
    rows = [{"instruction": f"Explain in detail {long_item.lower()} Give examples."},
            {"instruction": "What are the differences between plant-based and animal protein?"}]  # 5 of 9 3-grams
    loose = run(make_recipe(tmp_path, [{"type": "decontam", "testsets": ["vicuna80"], "containment": 0.5}], rows=rows),
                tmp_path / "loose")
    strict = run(make_recipe(tmp_path, [{"type": "decontam", "testsets": ["vicuna80"]}], rows=rows), tmp_path / "strict")
    assert loose.records == 0 and strict.records == 1


def test_an_unknown_test_set_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        run(make_recipe(tmp_path, [{"type": "decontam", "testsets": ["no-such-set"]}]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
