"""Evol-Instruct: the operation registry, each elimination rule, and `evol.evolve` on a scripted model.

The scripted evolver appends " [<op>]" to the instruction. Words in the seed steer the checks:
LEAK → the evolution copies "given prompt"; SAME → judged equal; SORRY → a short "sorry" answer;
STOP → an answer of stop words only; UNSURE → the equality check never parses;
FLAKY → every breadth evolution leaks (the others succeed).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from datatailor.llm.base import CompletionRequest
from datatailor.llm.config import ScriptedModel
from datatailor.llm.models import ModelPool
from datatailor.llm.usage import UsageLedger
from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from datatailor.stages.evolve import (
    EQUAL_TEMPLATE,
    OPERATIONS,
    clean_evolved,
    evolve,
    is_only_punctuation_and_stop_words,
    is_sorry_and_short,
    leaked_phrase,
    operation,
    operation_names,
    operation_prompt,
    parse_equal,
)

METHOD_LINES = {
    "add exactly one more constraint": "add_constraints",
    "widen and deepen": "deepening",
    "more specific ones": "concretizing",
    "reasoning in several steps": "increase_reasoning",
    "structured format": "complicate_input",
    "completely new prompt": "breadth",
}


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def scripted(request: CompletionRequest) -> str:
    """Routes by the template's name and reads its variables (a re-ask keeps both)."""
    template, v = request.template or "", request.variables or {}
    if template.startswith("evol/") and template != EQUAL_TEMPLATE:
        op = next(name for name, o in OPERATIONS.items() if o.template == template)
        current = v["instruction"]
        label = f"{OPERATIONS[op].answer_label}:"
        if "LEAK" in current or ("FLAKY" in current and op == "breadth"):
            return f"{label} {current} as the given prompt says"
        return f"{label} {current} [{op}]"
    if template == EQUAL_TEMPLATE:
        second = v["second"]
        if "UNSURE" in second:
            return "Hard to say."
        return "Equal." if "SAME" in second else "not equal"
    if template == "respond.j2":
        prompt = v["instruction"]
        if "SORRY" in prompt:
            return "I am sorry, but I cannot help with that request."
        if "STOP" in prompt:
            return "It is what it is, and that is all."
        return "A full answer " + "with many useful words " * 5
    raise AssertionError(f"unexpected template {template!r}")


MODELS = {"strong": {"backend": "scripted", "model": "evolver", "handler": "tests.test_evolve:scripted"}}


def run_evolve(tmp_path: Path, seeds: list[str], stage: dict[str, Any] | None = None, seed: int = 0) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in seeds), encoding="utf-8")
    recipe = parse_recipe(
        {"models": MODELS, "input": str(path), "stages": [{"type": "evol.evolve", **(stage or {})}], "seed": seed,
         "cache": False},
        "test-evolve", tmp_path,
    )
    out = tmp_path / f"out-{seed}"
    assert run_recipe_sync(recipe, out, show_progress=False).status == "complete"
    return out


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the operation library


def test_six_operations_each_render_from_their_own_template() -> None:
    assert operation_names() == [
        "add_constraints", "deepening", "concretizing", "increase_reasoning", "complicate_input", "breadth",
    ]
    rendered = {}
    for name in operation_names():
        messages = operation_prompt(name).render(instruction="Explain photosynthesis.")
        text = messages[-1].content
        assert "Explain photosynthesis." in text
        rendered[name] = text
    assert len({OPERATIONS[n].template for n in OPERATIONS}) == 6
    assert len(set(rendered.values())) == 6
    for line, name in METHOD_LINES.items():
        assert line in rendered[name]
    assert "10 to 20 words" in rendered["deepening"] and "10 to 20 words" not in rendered["complicate_input"]
    assert operation("breadth").kind == "breadth" and operation("deepening").kind == "depth"
    with pytest.raises(ValueError, match="unknown Evol-Instruct operation"):
        operation("shuffle")


def test_evolve_function_is_callable_by_op_name() -> None:
    pool = ModelPool({"strong": ScriptedModel.model_validate(MODELS["strong"])}, UsageLedger())
    gen = asyncio.run(evolve(pool.role("strong"), "Name three rivers.", "concretizing", seed_key="k"))
    assert gen.value == "Name three rivers. [concretizing]"
    assert gen.template_hash == operation_prompt("concretizing").hash


# ----------------------------------------------------------------------------- elimination rules


def test_parse_equal_is_tolerant() -> None:
    for text in ("Equal", "equal.", "  **Equal**", "They are the same."):
        assert parse_equal(text) is True
    for text in ("Not Equal", "not equal.", "NOT EQUAL!", "They are different.", "Unequal"):
        assert parse_equal(text) is False
    with pytest.raises(ValueError):
        parse_equal("Maybe?")
    # "Equal" followed by a named difference is not fooled into Equal.
    for text in ("Equal, but the second prompt adds a word limit.", "Equal. However, the second asks for a table.",
                 "They are the same except that the second requires sources."):
        assert parse_equal(text) is False
    assert parse_equal("Equal. Both ask for the same thing.") is True


def test_rule_helpers() -> None:
    assert leaked_phrase("Rewrite the #Given Prompt# please") == "given prompt"
    assert leaked_phrase("A rewritten prompt about cats") == "rewritten prompt"
    assert leaked_phrase("How to make it harder: replace general concepts.") == "how to make it harder"
    assert leaked_phrase("A fine instruction") is None
    assert is_sorry_and_short("Sorry, I can't.")
    assert not is_sorry_and_short("Sorry " + "word " * 79)  # 80 words is not short
    assert is_sorry_and_short("Sorry " + "word " * 78)
    assert not is_sorry_and_short("I cannot.")
    assert is_only_punctuation_and_stop_words("... and, the; of!")
    assert is_only_punctuation_and_stop_words("")
    assert not is_only_punctuation_and_stop_words("The capital is Paris.")
    assert clean_evolved("#Rewritten Prompt#: Do it", "deepening") == "Do it"
    assert clean_evolved("Created prompt: Do it", "breadth") == "Do it"
    with pytest.raises(ValueError):
        clean_evolved("Rewritten prompt:", "deepening")


@pytest.mark.parametrize(
    ("seed", "reason"),
    [
        ("LEAK write a haiku", "copies the template phrase 'given prompt'"),
        ("SAME write a haiku", "no information gain"),
        ("SORRY write a haiku", 'the answer says "sorry" in under 80 words'),
        ("STOP write a haiku", "only punctuation and stop words"),
        ("UNSURE write a haiku", "the information-gain check did not parse"),
    ],
)
def test_each_elimination_rule_fires(tmp_path: Path, seed: str, reason: str) -> None:
    out = run_evolve(tmp_path, [seed])
    assert rows(out / "data.jsonl") == []
    (failure,) = rows(out / "failures.jsonl")
    assert failure["kind"] == "eliminated"
    assert failure["message"].count(reason) == 4  # every one of the 4 rounds
    log = failure["record"]["metadata"]["evol"]["rounds"]
    assert [r["round"] for r in log] == [1, 2, 3, 4] and all(reason in r["eliminated"] for r in log)


def test_information_gain_check_can_be_turned_off_and_the_other_rules_still_apply(tmp_path: Path) -> None:
    out = run_evolve(tmp_path, ["SAME write a haiku", "LEAK write a haiku"], {"information_gain_check": False})
    data = rows(out / "data.jsonl")
    assert len(data) == 4 and all(p["instruction"].startswith("SAME") for p in data)  # kept although judged "Equal"
    assert all([e["decision"] for e in p["lineage"]] == ["evolved", "answered"] * p["metadata"]["evol"]["round"] for p in data)
    (failure,) = rows(out / "failures.jsonl")
    assert failure["message"].count("copies the template phrase") == 4
    usage = json.loads((out / "usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["requests"] == 4 * 2 + 4  # no equality check: evolve + answer, and the leaking seed's 4 evolutions


def test_failed_evolution_returns_the_last_good_instruction_to_the_pool(tmp_path: Path) -> None:
    stage = {"operations": ["add_constraints", "breadth"], "chains_per_seed": 3}
    out = run_evolve(tmp_path, ["FLAKY list prime numbers"], stage)
    data = rows(out / "data.jsonl")
    log = data[0]["metadata"]["evol"]["rounds"]
    assert {r["op"] for r in log if r["eliminated"]} == {"breadth"}
    assert {r["op"] for r in log if not r["eliminated"]} == {"add_constraints"}
    assert len(data) == sum(1 for r in log if not r["eliminated"])
    for pair in data:
        evol = pair["metadata"]["evol"]
        # Only the surviving operations were applied, in order, on top of the seed.
        assert pair["instruction"] == "FLAKY list prime numbers" + " [add_constraints]" * len(evol["ops"])
        assert evol["ops"] == ["add_constraints"] * len(evol["ops"])
        assert pair["response"].startswith("A full answer")
        assert pair["input"] == ""


def test_four_rounds_all_kept_and_keep_last(tmp_path: Path) -> None:
    out = run_evolve(tmp_path, ["Name a fruit.", "Name a city."])
    data = rows(out / "data.jsonl")
    assert len(data) == 8
    for pair in data:
        evol = pair["metadata"]["evol"]
        assert len(evol["ops"]) == evol["round"]
        assert pair["instruction"].endswith("".join(f" [{op}]" for op in evol["ops"]))
        decisions = [e["decision"] for e in pair["lineage"]]
        assert decisions == ["evolved", "not_equal", "answered"] * evol["round"]
    usage = json.loads((out / "usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["requests"] == 2 * 4 * 3  # evolve + equality check + answer per round
    last = run_evolve(tmp_path / "last", ["Name a fruit."], {"keep": "last", "chains_per_seed": 2})
    assert [p["metadata"]["evol"]["round"] for p in rows(last / "data.jsonl")] == [4, 4]


def test_include_seed_and_determinism(tmp_path: Path) -> None:
    a = run_evolve(tmp_path / "a", ["Name a fruit."], {"include_seed": True}, seed=3)
    b = run_evolve(tmp_path / "b", ["Name a fruit."], {"include_seed": True}, seed=3)
    c = run_evolve(tmp_path / "c", ["Name a fruit."], {"include_seed": True}, seed=4)
    data = rows(a / "data.jsonl")
    assert data[0]["instruction"] == "Name a fruit." and data[0]["metadata"]["evol"]["round"] == 0
    assert (a / "data.jsonl").read_bytes() == (b / "data.jsonl").read_bytes()
    ops = lambda out: [p["metadata"]["evol"]["ops"] for p in rows(out / "data.jsonl")]  # noqa: E731
    assert ops(a) != ops(c)


def test_unknown_operation_in_recipe_is_a_user_error(tmp_path: Path) -> None:
    from datatailor.errors import UserError

    with pytest.raises(UserError, match="unknown Evol-Instruct operation"):
        parse_recipe({"models": MODELS, "stages": [{"type": "evol.evolve", "operations": ["shuffle"]}]}, "r", tmp_path)
    assert re.search("deepening", ", ".join(operation_names()))
