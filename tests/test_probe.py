"""The systematic-failure stop: a stage whose first records all fail with the same error stops the run, but replies
cut off by max_tokens count as systematic only after four windows of them (whether a reply runs long depends on the
record), and the stop then says what happened and how to go on."""

from __future__ import annotations

import re
from pathlib import Path

from datatailor.llm.base import CompletionRequest
from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from datatailor.runner.probe import TRUNCATION_WINDOW, SystematicFailureProbe
from tests.support import read_jsonl, write_rows

CUT = "strong (m)'s answer was cut off by max_tokens after 8 tokens; raise max_tokens"


def failure(kind: str, message: str) -> dict[str, str]:
    return {"id": "x", "kind": kind, "message": message}


def test_five_equal_errors_stop_but_five_cut_replies_do_not() -> None:
    broken = SystematicFailureProbe(5, 0)
    for _ in range(5):
        assert broken.observe(failure("llm_error", "model 'gpt-5-typo' not found"), decision=False) == []
    assert broken.tripped and "would fail for every record" in str(broken.abort("respond"))

    cut = SystematicFailureProbe(5, 0)
    for i in range(5 * TRUNCATION_WINDOW - 1):
        cut.observe(failure("truncated", CUT), decision=False)
        assert not cut.tripped, f"stopped after {i + 1} cut replies"
    cut.observe(failure("truncated", CUT), decision=False)
    assert cut.tripped and TRUNCATION_WINDOW == 4
    message = str(cut.abort("respond"))
    assert "the first 20 replies were all cut off at the same token limit" in message
    assert "Raise max_tokens" in message and "keep_truncated" in message and "every record" not in message

    # a success releases the held rows, to be written
    recovering = SystematicFailureProbe(5, 0)
    held = [recovering.observe(failure("truncated", CUT), decision=False) for _ in range(6)]
    assert held == [[]] * 6 and len(recovering.observe(None, decision=False)) == 6 and not recovering.tripped


def rambler(request: CompletionRequest) -> str:
    """The first six questions get answers far past max_tokens, the rest short ones."""
    n = int(re.search(r"question (\d+)", request.variables["instruction"])[1])
    return "word " * 50 if n < 6 else "A short answer."


def test_a_run_of_cut_replies_at_the_start_does_not_stop_the_stage(tmp_path: Path) -> None:
    rows = [{"instruction": f"Please answer question {i}."} for i in range(25)]
    recipe = parse_recipe({
        "models": {"strong": {"backend": "scripted", "model": "m", "handler": "tests.test_probe:rambler", "max_tokens": 8}},
        "input": str(write_rows(tmp_path / "q.jsonl", rows)),
        "stages": [{"type": "respond", "role": "strong", "concurrency": 1}],
        "cache": False,
    }, "probe", tmp_path)
    result = run_recipe_sync(recipe, tmp_path / "out", show_progress=False)
    assert (result.status, result.records, result.failures) == ("complete", 19, 6)
    assert {row["kind"] for row in read_jsonl(tmp_path / "out" / "failures.jsonl")} == {"truncated"}
