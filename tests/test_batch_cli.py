"""Batch inference from the command line: `run --batch`, the budget stop and its resume (exit 3, then 0),
`datatailor batches` (the listing and `--cancel`), and the progress line."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.cli import main
from datatailor.llm.models import ModelPool
from datatailor.llm.usage import UsageLedger
from datatailor.progress import RunProgress
from datatailor.testing import MockConfig, MockOpenAIServer
from tests.support import read_jsonl
from tests.test_batch import (
    ask,
    config,
    generate_all,
    journal_rows,
    leave_a_pending_batch,
    planned,
    run_pool,
)
from tests.test_batch_recipes import FAST_BATCH, REFED, REFERENCES, model, strip_batch


@pytest.fixture
def mock() -> Iterator[MockOpenAIServer]:
    with MockOpenAIServer(MockConfig(handler="tests.test_batch_recipes:refed_world", batch_delay_s=0.05)) as server:
        yield server


def write_recipe(tmp_path: Path, models: dict[str, Any], name: str = "recipe.yaml", **fields: Any) -> Path:
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in REFERENCES), encoding="utf-8")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": models, "input": str(refs), "stages": REFED, "budget_pairs": 12, **fields}), encoding="utf-8")
    return path


def cli(*args: Any) -> int:
    return main([str(a) for a in args])


# ----------------------------------------------------------------------------- run --batch


def test_run_batch_switches_the_roles_that_can_and_says_which(tmp_path: Path, mock: MockOpenAIServer, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = model(mock.url, "mock-teacher", batch=False, **FAST_BATCH)  # batch settings wait for --batch
    judge = {"backend": "scripted", "model": "judge", "rules": [{"reply": "8 5"}]}
    recipe = write_recipe(tmp_path, {"teacher": teacher, "judge": judge})
    assert cli("run", recipe, "--out", tmp_path / "out", "--no-progress", "--batch") == 0
    err = capsys.readouterr().err
    assert "batch: teacher through the batch API; judge stays online: the scripted backend has no batch API" in err
    assert mock.stats["batches_created"] >= 4 and mock.stats["requests"] == 0
    # the same recipe without --batch resumes the same run (the batch settings are not part of its identity)
    assert cli("run", recipe, "--out", tmp_path / "out", "--no-progress") == 0


def test_run_batch_refuses_when_no_role_can_and_with_the_ray_executor(tmp_path: Path, mock: MockOpenAIServer, capsys: pytest.CaptureFixture[str]) -> None:
    scripted = write_recipe(tmp_path, {"teacher": {"backend": "scripted", "model": "t", "rules": [{"reply": "x"}]}}, "s.yaml")
    assert cli("run", scripted, "--out", tmp_path / "a", "--batch") == 2
    assert "--batch: no role of" in capsys.readouterr().err and not (tmp_path / "a").exists()
    batched = write_recipe(tmp_path, {"teacher": model(mock.url, "mock-teacher", batch=True)}, "b.yaml")
    assert cli("run", batched, "--out", tmp_path / "b", "--executor", "ray") == 2
    assert "need the local executor" in capsys.readouterr().err


# ----------------------------------------------------------------------------- budget


def test_the_budget_stops_submitting_batches_then_a_larger_budget_resumes(tmp_path: Path, mock: MockOpenAIServer,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, {"teacher": model(mock.url, "mock-teacher", batch=True)})
    env_cache = ("--no-cache",)
    assert cli("run", recipe, "--out", tmp_path / "clean", "--no-progress", *env_cache) == 0
    plans = planned(tmp_path / "clean")
    # room for the feedback and synthesis batches and half the responses, in the worst case
    budget = sum(p["worst_usd"] for p in plans[:2]) + plans[2]["worst_usd"] / 2
    lines_clean = mock.stats["batch_lines"]

    capsys.readouterr()
    fresh = MockOpenAIServer(MockConfig(handler="tests.test_batch_recipes:refed_world", batch_delay_s=0.05)).start()
    mock.stop()
    mock = fresh  # counts this run and its resume alone
    recipe = write_recipe(tmp_path, {"teacher": model(mock.url, "mock-teacher", batch=True)})
    assert cli("run", recipe, "--out", tmp_path / "out", "--no-progress", "--budget-usd", budget, *env_cache) == 3
    err = capsys.readouterr().err
    assert "budget_exhausted" in err and "stopped submitting batches" in err and "Raise the budget" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "budget_exhausted"
    # spent within the budget; fewer requests sent than the whole run needs (a batch's worst case is reserved only
    # while it is pending, so later batches may use what earlier ones did not spend)
    assert json.loads((tmp_path / "out" / "usage.json").read_text())["total"]["all"]["cost_usd"] <= budget
    assert 0 < mock.stats["batch_lines"] < lines_clean

    assert cli("run", recipe, "--out", tmp_path / "out", "--no-progress", "--budget-usd", 1.0, *env_cache) == 0
    assert strip_batch(read_jsonl(tmp_path / "out" / "data.jsonl")) == strip_batch(read_jsonl(tmp_path / "clean" / "data.jsonl"))
    assert mock.stats["batch_answered_again"] == 0
    assert mock.stats["batch_lines"] == lines_clean  # the stopped run and its resume sent each request once
    mock.stop()


# ----------------------------------------------------------------------------- datatailor batches


def test_batches_lists_them_and_cancel_asks_first_then_cancels_the_pending_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with MockOpenAIServer(MockConfig(batch_delay_s=60.0)) as server:
        leave_a_pending_batch(tmp_path, server, ask(4))
        capsys.readouterr()
        assert cli("batches", tmp_path) == 0
        out = capsys.readouterr().out
        assert "batch_mock_1" in out and "in_progress" in out and "1 submitted: 1 in progress" in out
        assert "for ? (4)" in out  # the stage each request was made for ("?": made outside a stage)

        monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
        assert cli("batches", tmp_path, "--cancel") == 1
        assert "Cancel 1 pending batch(es) holding 4 request(s)?" in capsys.readouterr().out
        assert server.stats["batches_cancelled"] == 0

        assert cli("batches", tmp_path, "--cancel", "--yes") == 0
        assert server.stats["batches_cancelled"] == 1
        assert any(r["event"] == "cancel" for r in journal_rows(tmp_path))

        # a resumed run takes the cancelled batch's (missing) answers as unanswered and batches them again
        server.config.batch_delay_s = 0.0
        gens, _ = run_pool(tmp_path, config(server.url), ask(4))
        assert {g.batch_id for g in gens} == {"batch_mock_2"}
        assert cli("batches", tmp_path) == 0
        listing = capsys.readouterr().out
        assert "cancelled" in listing and "1 completed, 1 failed" in listing


def test_batches_on_a_folder_without_batches_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("batches", tmp_path) == 2
    assert "no batches here" in capsys.readouterr().err


# ----------------------------------------------------------------------------- progress


def test_progress_shows_batches_requests_and_the_oldest_pending_age(tmp_path: Path) -> None:
    stream = io.StringIO()
    progress = RunProgress(enabled=True, stream=stream)
    summary = {"submitted": 3, "in_progress": 1, "completed": 1, "failed": 1, "requests": 300, "requests_done": 180,
               "oldest_pending_s": 3725.0}
    progress.attach(UsageLedger(), ["respond"], batches=lambda: summary)
    line = progress.usage_line()
    assert line.endswith("| batches 3 submitted, 1 in progress, 1 completed, 1 failed; 180/300 batched requests done; "
                         "oldest pending 1h02m")
    progress.refresh()
    assert "batches 3 submitted" in stream.getvalue()
    assert RunProgress(enabled=False).usage_line() == ""


def test_the_pool_summary_counts_the_run_s_batches(tmp_path: Path) -> None:
    with MockOpenAIServer(MockConfig()) as server:
        pool = ModelPool({"t": config(server.url, batch_max_requests=2)}, UsageLedger(), None, None, run_dir=tmp_path)
        asyncio.run(generate_all(pool, ask(5)))
        summary = pool.batch_summary()
    assert summary is not None
    assert {k: summary[k] for k in ("submitted", "in_progress", "completed", "failed", "requests", "requests_done")} == {
        "submitted": 3, "in_progress": 0, "completed": 3, "failed": 0, "requests": 5, "requests_done": 5}
