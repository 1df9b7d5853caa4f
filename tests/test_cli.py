"""The command line: exit codes, messages, validate, export, Ctrl-C and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from datatailor.cli import main
from tests.conftest import cli_env
from tests.support import echo_model, questions, read_jsonl, write_rows


def _recipe(tmp_path: Path, **changes: object) -> Path:
    write_rows(tmp_path / "input.jsonl", questions(6))
    data = {
        "models": {"strong": echo_model()},
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong"}],
    }
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, output={"formats": ["sharegpt"]})
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "complete: 6 records" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "out/data.sharegpt.jsonl")) == 6
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "x.json"), "--format", "openai"]) == 0
    exported = json.loads((tmp_path / "x.json").read_text())
    assert exported[0]["messages"][1] == {"role": "assistant", "content": "Answer for 0."}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"stages": [{"type": "respnd"}]}, "unknown type 'respnd'"),
        ({"stages": [{"type": "respond", "role": "judge"}]}, "role 'judge' is not a model"),
        ({"stages": [{"type": "respond", "temprature": 0.1}]}, "temprature: Extra inputs are not permitted"),
        ({"models": {"strong": {"backend": "nope", "model": "x"}}}, "models.strong"),
        ({"budget": {"max_usd": -1}}, "budget.max_usd"),
        ({"stages": []}, "stages"),
    ],
)
def test_bad_recipes_exit_2_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, expected: str) -> None:
    recipe = _recipe(tmp_path, **changes)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_yaml_syntax_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("models:\n  strong: {backend: scripted\nstages: []\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"{path}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validate_checks_without_spending(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_TEST_KEY", raising=False)
    recipe = _recipe(
        tmp_path,
        models={
            "strong": echo_model(),
            "judge": {"backend": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_TEST_KEY"},
        },
        stages=[{"type": "respond", "role": "strong", "template": "missing.j2"}, {"type": "respond", "role": "judge", "name": "second"}],
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "MY_TEST_KEY is not set" in err
    assert "prompt template not found: missing.j2" in err
    monkeypatch.setenv("MY_TEST_KEY", "sk-secret-value")
    good = _recipe(tmp_path, models={"strong": echo_model()})
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "input: 6 records" in out and "ok: the recipe is valid" in out
    assert not (tmp_path / "out").exists()


def test_budget_exit_code_and_continue_with_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, models={"strong": echo_model(price_per_mtok_in=1e4, price_per_mtok_out=1e4)},
                     stages=[{"type": "respond", "role": "strong", "concurrency": 1}], budget={"max_usd": 0.2})
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]) == 3
    assert "budget_exhausted" in capsys.readouterr().err
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress", "--budget-usd", "100"]) == 0
    assert len(read_jsonl(tmp_path / "out/data.jsonl")) == 6


def test_ctrl_c_then_resume(tmp_path: Path) -> None:
    write_rows(tmp_path / "input.jsonl", questions(60))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        # 0.2 s a reply, 2 at a time: the run takes 6 s, so SIGINT after the 5th reply lands mid-run even on a busy
        # machine (at 0.05 s the run once finished before the signal arrived)
        "models": {"strong": echo_model(latency_s=0.2)},
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong", "concurrency": 2}],
    }))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datatailor", "run", str(recipe), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "stages/00-respond/outputs.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (checkpoint.exists() and len(checkpoint.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out / "data.jsonl")
    assert [r["response"] for r in rows] == [f"Answer for {i}." for i in range(60)]


def test_a_run_killed_before_its_first_manifest_resumes(tmp_path: Path) -> None:
    """kill -9 between writing recipe.json and the first manifest (or mid-write of either) leaves a folder that is
    ours: the same command resumes it instead of refusing it."""
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.json").write_text("{}")
    (out / ".manifest.json.k3x9.tmp").write_text('{"stat')
    assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not list(out.glob(".*.tmp")) and (out / "data.jsonl").exists()


def test_not_a_run_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/precious.txt").write_text("keep me")
    assert main(["run", str(recipe), "--out", str(tmp_path / "busy"), "--no-progress"]) == 2
    assert "not a datatailor run directory" in capsys.readouterr().err
    assert (tmp_path / "busy/precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(("argv", "expected"), [(["export"], "Missing argument"), (["run", "x.yaml"], "Missing option"),
                                                (["nosuch"], "No such command")])
def test_usage_errors_exit_2_without_traceback(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
