"""The `openai` backend against a real OpenAI-compatible server: llama-cpp-python's, serving the packaged Qwen."""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from pydantic import BaseModel

from datatailor.cli import main as cli_main
from datatailor.llm.base import Message
from datatailor.llm.config import OpenAIModel
from datatailor.llm.models import RoleModel
from datatailor.llm.openai import OpenAIBackend
from datatailor.llm.usage import UsageLedger
from tests.support import read_jsonl, write_rows

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 240


def _server_available() -> None:
    try:
        importlib.import_module("llama_cpp.server.app")
    except ImportError as exc:
        pytest.skip(f"llama-cpp-python[server] is not installed: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on 127.0.0.1 serving the packaged Qwen; yields its base URL."""
    _server_available()
    from datatailor.llm.local_models import resolve_local_model

    model_path = resolve_local_model("local:qwen2.5-coder-0.5b-instruct")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "2048"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready within {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_recipe_runs_through_a_real_server(llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_rows(tmp_path / "input.jsonl", [
        {"instruction": "Name one primary color."},
        {"instruction": "What is 2 + 2? Answer with a number."},
    ])
    recipe = {
        "models": {"strong": {
            "backend": "openai", "model": "qwen2.5-coder-0.5b-instruct", "base_url": llama_server,
            "api_key_env": None, "max_tokens": 16, "temperature": 0.0, "max_concurrency": 2, "timeout_s": 120,
        }},
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong"}],
        "cache": False,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code = cli_main(["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    assert read_jsonl(tmp_path / "out/failures.jsonl") == []
    rows = read_jsonl(tmp_path / "out/data.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["response"].strip(), row
        event = row["lineage"][-1]
        assert event["model"] == "qwen2.5-coder-0.5b-instruct"
        assert event["prompt_tokens"] > 5 and 0 < event["completion_tokens"] <= 16
    usage = json.loads((tmp_path / "out/usage.json").read_text())["run"]["roles"]["strong"]
    assert usage["requests"] == 2
    assert usage["prompt_tokens"] == sum(r["lineage"][-1]["prompt_tokens"] for r in rows)
    assert 0 < usage["completion_tokens"] <= 32


class City(BaseModel):
    name: str
    country: str


def test_structured_output_through_the_servers_json_schema_grammar(llama_server: str) -> None:
    config = OpenAIModel(model="qwen2.5-coder-0.5b-instruct", base_url=llama_server, api_key_env=None,
                         json_mode="json_object", max_tokens=40, temperature=0.0, timeout_s=180)

    async def ask() -> tuple[City, str]:
        backend = OpenAIBackend(config)
        role = RoleModel("strong", config, backend, cache=None, ledger=UsageLedger())
        try:
            gen = await role.generate(
                messages=[Message(role="user", content="Give the capital city of France and its country as JSON.")],
                schema=City,
            )
        finally:
            await backend.aclose()
        return gen.value, gen.text

    value, text = asyncio.run(ask())
    assert isinstance(value, City) and value.name.strip() and value.country.strip()
    assert set(json.loads(text)) == {"name", "country"}  # the grammar, not a repair, shaped the reply
