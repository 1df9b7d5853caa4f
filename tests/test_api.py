"""The Python API: runs resume and convert to pandas and HF datasets, the output folder is `out` everywhere (with
`out_dir` kept as a deprecated alias), and the blocking functions work inside a running event loop (a Jupyter cell),
Ctrl-C included. The README's own example is run as written in tests/test_readme.py."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest

import datatailor as dt
from tests.support import echo_model, questions, write_rows
from tests.test_bakeoff import world


def _recipe(tmp_path: Path, n: int = 4, **model: object) -> dict:
    return {
        "models": {"strong": echo_model(**model)},
        "input": str(write_rows(tmp_path / "q.jsonl", questions(n))),
        "stages": [{"type": "respond"}],
    }


def test_run_resumes_and_converts(tmp_path: Path) -> None:
    data = _recipe(tmp_path)
    first = dt.run(data, out=tmp_path / "out")
    assert first.complete and [r.response for r in first.records] == [f"Answer for {i}." for i in range(4)]
    assert first.usage["all"]["requests"] == 4 and first.failures == [] and first.out == tmp_path / "out"
    again = dt.run(data, tmp_path / "out")  # positional, as before
    assert again.usage["all"]["requests"] == 0  # resumed: nothing recomputed
    ds = again.to_dataset()
    assert ds.num_rows == 4 and json.loads(ds[0]["metadata"]) == {}
    assert dt.load_run(tmp_path / "out").records == again.records
    with pytest.raises(dt.UserError, match="not a datatailor run directory"):
        dt.load_run(tmp_path)


def test_a_bad_recipe_dict_is_a_user_error() -> None:
    with pytest.raises(dt.UserError, match="stages"):
        dt.recipe_from_dict({"models": {}, "stages": [{"type": "no.such.stage"}]})


def test_out_dir_still_works_for_one_release_and_warns(tmp_path: Path) -> None:
    data = _recipe(tmp_path)
    with pytest.warns(DeprecationWarning, match=r"run\(out_dir=...\) is deprecated.*use out="):
        old = dt.run(data, out_dir=tmp_path / "old")
    assert old.complete and len(old.records) == 4 and (tmp_path / "old" / "data.jsonl").is_file()
    with pytest.warns(DeprecationWarning, match="load_run"):
        assert dt.load_run(out_dir=tmp_path / "old").records == old.records
    with pytest.warns(DeprecationWarning, match=r"RunOutput.out_dir is deprecated"):
        assert old.out_dir == old.out == tmp_path / "old"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        assert dt.load_run(out=tmp_path / "old").out == tmp_path / "old"
    with pytest.raises(TypeError, match="both `out` and `out_dir`"):
        dt.run(data, tmp_path / "a", out_dir=tmp_path / "b")
    with pytest.raises(TypeError, match="needs the output folder"):
        dt.run(data)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_async_takes_out_too(tmp_path: Path) -> None:
    result = asyncio.run(dt.run_async(_recipe(tmp_path), out=tmp_path / "out"))
    assert result.complete and len(result.records) == 4


async def test_run_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    """What a Jupyter cell does: call the blocking `dt.run` while this thread runs an event loop."""
    loop = asyncio.get_running_loop()
    inside = dt.run(_recipe(tmp_path), out=tmp_path / "in-loop")
    assert inside.complete and [r.response for r in inside.records] == [f"Answer for {i}." for i in range(4)]
    assert asyncio.get_running_loop() is loop and not loop.is_closed()  # the caller's loop is untouched
    await asyncio.sleep(0)  # and still usable
    # the same bytes as a run made outside any loop
    plain = await asyncio.to_thread(dt.run, _recipe(tmp_path), out=tmp_path / "plain")
    assert (tmp_path / "in-loop" / "data.jsonl").read_bytes() == (tmp_path / "plain" / "data.jsonl").read_bytes()
    assert plain.records == inside.records


async def test_ctrl_c_inside_a_running_loop_interrupts_the_run_and_it_resumes(tmp_path: Path) -> None:
    """Ctrl-C while `dt.run` runs on its worker thread stops the run (checkpointed, `interrupted`); it resumes."""
    data = _recipe(tmp_path, n=40, latency_s=0.1, max_concurrency=2)
    data["stages"] = [{"type": "respond", "concurrency": 2}]
    # Jupyter turns an interrupt into KeyboardInterrupt in the cell's thread (Python's default SIGINT handler);
    # the test's own event loop would otherwise cancel its task instead
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    checkpoint = tmp_path / "out" / "stages" / "00-respond" / "outputs.jsonl"

    def interrupt_once_records_are_checkpointed() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (checkpoint.is_file() and checkpoint.read_text().count("\n") >= 4):
            time.sleep(0.02)
        signal.raise_signal(signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_records_are_checkpointed, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            dt.run(data, out=tmp_path / "out")
    finally:
        interrupter.join(25)
        signal.signal(signal.SIGINT, previous)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "interrupted by the user" in manifest["message"]
    assert not (tmp_path / "out" / "data.jsonl").exists()
    resumed = dt.run(data, out=tmp_path / "out")
    assert resumed.complete and len(resumed.records) == 40
    assert 0 < resumed.usage["all"]["requests"] < 40  # what finished before Ctrl-C was not asked again


async def test_bakeoff_from_python_inside_a_running_loop(tmp_path: Path) -> None:
    """`dt.bakeoff` plans and runs as the command does, also from a running loop (it evaluates and judges)."""
    config = world(tmp_path / "world")
    plan = dt.bakeoff(config, out=tmp_path / "plan", plan=True)
    assert [r["method"] for r in plan["rows"]] == ["good", "odd", "leaky", "base"] and plan["calls"] > 0
    assert not (tmp_path / "plan" / "bakeoff_report.json").exists()  # a plan runs nothing
    report = dt.bakeoff(config, out=tmp_path / "out")
    assert {n: m["data"]["pairs"] for n, m in report["methods"].items() if "data" in m} == {"good": 4, "odd": 4, "leaky": 4}
    assert json.loads((tmp_path / "out" / "bakeoff_report.json").read_text())["ranking"] == report["ranking"]
    ts = "alpha"  # the first of tests/test_bakeoff.py's two test sets (24 items judged)
    assert report["methods"]["good"]["testsets"][ts]["wins"] == report["methods"]["good"]["testsets"][ts]["n"] == 24


def test_the_api_functions_keep_their_names_after_their_subpackages_are_imported() -> None:
    """`datatailor.evaluate`, `.train` and `.bakeoff` are also subpackages; importing one must not hide the function."""
    import importlib

    import inspect
    import subprocess
    import sys

    from datatailor import api

    for name in ("evaluate", "train", "bakeoff"):
        importlib.import_module(f"datatailor.{name}")
        assert callable(getattr(dt, name)), name
        assert inspect.signature(getattr(dt, name)) == inspect.signature(getattr(api, name)), name
    # ... and the subpackages still import under any spelling, in a fresh interpreter
    code = ("import datatailor as dt, datatailor.train.rl as rl, datatailor.evaluate.metrics as m, "
            "datatailor.bakeoff.stats as s; from datatailor.train import sft; assert callable(dt.train) and rl and m and s and sft")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_callable_subpackage_calls_the_api_function(monkeypatch: pytest.MonkeyPatch) -> None:
    from datatailor import api

    seen = []
    monkeypatch.setattr(api, "train", lambda *a, **k: seen.append((a, k)) or "trained")
    assert dt.train("runs/x", out="y") == "trained" and seen == [(("runs/x",), {"out": "y"})]


async def test_evaluate_inside_a_running_loop(tmp_path: Path) -> None:
    models = dt.recipe_from_dict({
        "models": {
            "cand": {"backend": "scripted", "model": "cand", "rules": [{"match": ".*", "reply": "CAND"}]},
            "ref": {"backend": "scripted", "model": "ref", "rules": [{"match": ".*", "reply": "REF"}]},
            "judge": {"backend": "scripted", "model": "judge", "handler": "tests.support:judge_prefers_cand"},
        },
        "stages": [{"type": "dedup"}],
    }).models
    testset = write_rows(tmp_path / "testset.jsonl", questions(3))
    summary = dt.evaluate(str(testset), out=tmp_path / "eval", candidate=models["cand"], reference=models["ref"],
                          judge=models["judge"])
    assert (summary["metrics"]["wins"], summary["metrics"]["losses"]) == (3, 0)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"] == summary["metrics"]
