"""Helpers for tests: tiny datasets, recipes built in code, and scripted-model handlers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from datatailor.llm.base import CompletionRequest
from datatailor.recipe import Recipe, parse_recipe
from datatailor.runner import RunResult, run_recipe


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def questions(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"Question number {i}: explain topic {i} briefly."} for i in range(n)]


def echo_model(**extra: Any) -> dict[str, Any]:
    """A scripted model that answers every prompt with a deterministic echo."""
    return {
        "backend": "scripted",
        "model": "echo",
        "rules": [{"match": r"Question number (\d+)", "reply": "Answer for {{ m[1] }}."}, {"match": ".*", "reply": "ok"}],
        **extra,
    }


def make_recipe(tmp_path: Path, stages: list[dict[str, Any]], models: dict[str, Any] | None = None,
                rows: list[dict[str, Any]] | None = None, **fields: Any) -> Recipe:
    input_path = write_rows(tmp_path / "input.jsonl", rows if rows is not None else questions(5))
    data = {
        "models": models if models is not None else {"strong": echo_model()},
        "input": str(input_path),
        "stages": stages,
        **fields,
    }
    return parse_recipe(data, "test-recipe", tmp_path)


def run(recipe: Recipe, out: Path, **kwargs: Any) -> RunResult:
    kwargs.setdefault("show_progress", False)
    return asyncio.run(run_recipe(recipe, out, **kwargs))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- scripted handlers


def flaky_handler(request: CompletionRequest) -> str:
    """Fails questions whose number is divisible by 3 with a server error, answers the others."""
    from datatailor.errors import LLMCallFailure

    prompt = request.messages[-1].content
    if "Question number" in prompt:
        n = int(prompt.split("Question number ")[1].split(":")[0])
        if n % 3 == 0:
            raise LLMCallFailure(f"injected server error for question {n}")
        return f"Answer for {n}."
    return "ok"


def judge_prefers_cand(request: CompletionRequest) -> str:
    """A pairwise judge that scores the answer "CAND" 8 and the other 6, whichever order it is shown in."""
    return "8 6" if request.variables["answer_1"] == "CAND" else "6 8"


def judge_prefers_good(request: CompletionRequest) -> str:
    """A pairwise judge that scores the answer "GOOD" 9 and the other 5, whichever order it is shown in."""
    return "9 5" if request.variables["answer_1"] == "GOOD" else "5 9"


def kill_9_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], timeout_s: float = 60) -> None:
    """Start `cmd`, wait until `ready()` holds (failing if the process ends first or time runs out), then kill it
    with SIGKILL: nothing of the run gets a chance to clean up, as in a crash or an out-of-memory kill."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "the run ended early"
            assert time.time() < deadline, "the run never reached the point to kill it at"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def hang_from_20(request: CompletionRequest) -> str:
    """Answers questions 0-19; from question 20 on, blocks its process for 20 s (a hung server, a stuck worker)."""
    import re

    number = int(m[1]) if (m := re.search(r"Question number (\d+)", request.messages[-1].content)) else 0
    if number >= 20:
        time.sleep(20)
    return f"Answer for {number}."
