"""Tolerant parsers for model replies."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from datatailor.llm.structured import (
    extract_json,
    parse_model,
    parse_numbered_list,
    parse_score_pair,
    parse_single_score,
    parse_use_case_skills,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('Sure! Here it is:\n```json\n{"a": [1, 2,]}\n```\nAnything else?', {"a": [1, 2]}),
        ("{'a': 1}".replace("'", '"') + " trailing words", {"a": 1}),
        ('{"a": True, "b": None}', {"a": True, "b": None}),
        ('{"items": ["x", "y"', {"items": ["x", "y"]}),
        ('{"text": "cut off mid', {"text": "cut off mid"}),
        ("[1, 2, 3]", [1, 2, 3]),
    ],
)
def test_extract_json_repairs(text: str, expected: object) -> None:
    assert extract_json(text) == expected


def test_extract_json_fails_clearly() -> None:
    with pytest.raises(ValueError, match="JSON"):
        extract_json("no json here at all")


def test_parse_model_reports_schema_mismatch() -> None:
    class Score(BaseModel):
        score: int

    assert parse_model('{"score": 4}', Score).score == 4
    with pytest.raises(ValueError, match="score"):
        parse_model('{"points": 4}', Score)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8 7", (8, 7)),
        ("8, 7", (8, 7)),
        ("8,7\nAssistant 1 was more detailed.", (8, 7)),
        ("Scores: 9/10, 6/10", (9, 6)),
        ("[5, 5]", (5, 5)),
        ("\n**7 3**\n", (7, 3)),
        ("Assistant 1: 6\nAssistant 2: 9", (6, 9)),
        ("Assistant 1 is better than assistant 2.", None),
        ("Assistant 1: 6, Assistant 2: 9", (6, 9)),
        ("7.5 8.5", (7.5, 8.5)),
        # "8/10" is one score of 8, never the pair (8, 10); a lone score is re-asked, not guessed.
        ("8/10", None),
        ("Assistant 1 gets 8/10.", None),
        ("8 out of 10 and 6 out of 10", (8, 6)),
        ("Scores (1-10): 8 7", (8, 7)),
        # Labelled scores win over a leading line of other numbers.
        ("Out of 3 criteria, 2 favour the first.\nAssistant 1: 8\nAssistant 2: 7", (8, 7)),
        ("Score for Assistant 1: 9/10\nScore for Assistant 2: 4/10", (9, 4)),
        ("Assistant 1's score is 3 and Assistant 2's score is 6.", (3, 6)),
        # The first line with numbers must hold exactly two: three numbers is not a pair.
        ("8 7 6", None),
        ("Both did well.", None),
    ],
)
def test_parse_score_pair(text: str, expected: tuple[float, float] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse_score_pair(text)
    else:
        assert parse_score_pair(text) == expected


def test_parse_score_pair_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_score_pair("11 3")


def test_parse_single_score() -> None:
    assert parse_single_score("Score: 4.5\nThe answer is accurate.") == 4.5
    assert parse_single_score("4") == 4
    # The labelled score, not the first digit: "(0-5)" is the scale.
    assert parse_single_score("Score (0-5): 4") == 4
    assert parse_single_score("Rating: 4/5 - accurate but short") == 4
    assert parse_single_score("**3.5**\nIt misses one case.") == 3.5
    assert parse_single_score("The score is 2. It is wrong.") == 2
    with pytest.raises(ValueError):
        parse_single_score("Excellent answer.")
    with pytest.raises(ValueError):
        parse_single_score("Of the 2 answers, this one is good.")  # a number that is not a score is not guessed
    with pytest.raises(ValueError, match="outside"):
        parse_single_score("Score: 7")


def test_parse_numbered_list_variants() -> None:
    text = "Here are the instructions:\n1. Write a poem\n2) Summarise the text\n   in two lines\n- Plan a trip\n\nThat's all."
    assert parse_numbered_list(text) == ["Write a poem", "Summarise the text in two lines", "Plan a trip"]
    with pytest.raises(ValueError, match="at least 3"):
        parse_numbered_list("1. only one", min_items=3)


@pytest.mark.parametrize(
    "text",
    [
        "Use case: Creative Writing\nSkills: Role-play, Sports",
        "Task: creative writing\nSkills: role-play; sports",
        "**Use case:** creative writing.\n**Skills:**\n- role-play\n- sports",
    ],
)
def test_parse_use_case_skills_normalises_labels(text: str) -> None:
    assert parse_use_case_skills(text) == ("creative writing", ["role-play", "sports"])


def test_a_skill_with_and_stays_one_skill() -> None:
    assert parse_use_case_skills("Use case: business plan development\nSkills: market research and planning")[1] == [
        "market research and planning"
    ]
    assert parse_use_case_skills("Use case: QA\nSkills: history, geography, and law")[1] == ["history", "geography", "law"]


def test_parse_use_case_skills_caps_and_fails() -> None:
    assert parse_use_case_skills("Use case: QA\nSkills: a, b, c, d")[1] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="Use case"):
        parse_use_case_skills("Skills: a")
    with pytest.raises(ValueError, match="Skills"):
        parse_use_case_skills("Use case: QA")
