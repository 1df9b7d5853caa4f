"""What makes two model entries the same model, for the request cache.

A cache hit must never answer for a different model. Names are not enough for local weights: a
GGUF replaced in place, a full model saved over an old one, or an adapter retrained into the same
folder all keep their name. So local weights are identified by their **content**:

* `local:` packaged models by the SHA-256 the package pins (already checked when assembled);
* a GGUF file, an HF model folder or a PEFT adapter folder by the SHA-256 of its weight and
  config files. Hashing a 500 MB file takes a second or two, so each file's digest is remembered
  in `fingerprints.json` beside the request cache, keyed by path, size and modification time:
  a file that changes gets hashed again;
* served models (`openai`) by name, base URL and the optional `revision` the user sets;
* scripted models by their rules, handler and replay file, so two scripted worlds never share answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from datatailor.llm.cache import default_cache_path

# Files that decide what a model folder computes (weights, config, tokenizer, chat template).
_FOLDER_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.json", "*.model", "*.txt", "*.jinja")
_lock = threading.Lock()


def _index_path() -> Path:
    return default_cache_path().parent / "fingerprints.json"


def _load_index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_index(path: Path, index: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, remembered by (path, size, mtime) so a large file is hashed once."""
    path = path.resolve()
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    index_path = _index_path()
    with _lock:
        index = _load_index(index_path)
        entry = index.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return str(entry["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _lock:
        index = _load_index(index_path)
        index[str(path)] = {"stamp": stamp, "sha256": digest}
        _save_index(index_path, index)
    return digest


def folder_digest(folder: Path) -> str:
    """One digest over the weight/config/tokenizer files of a model or adapter folder (names and contents)."""
    h = hashlib.sha256()
    files = sorted({p for pattern in _FOLDER_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    for p in files:
        h.update(p.name.encode("utf-8"))
        h.update(file_digest(p).encode("ascii"))
    return h.hexdigest()


def weights_digest(model: str, base_dir: Path | None = None) -> str | None:
    """Content digest of local weights named by `model` (a `local:` name, a .gguf, or a folder); None if not local."""
    if model.startswith("local:"):
        from datatailor.llm.local_models import LOCAL_MODELS

        spec = LOCAL_MODELS.get(model.removeprefix("local:"))
        return spec.sha256 if spec else None
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return folder_digest(path)
    return None  # a hub name or a served model: identified by its name


def model_identity(config: Any, base_dir: Path | None = None) -> dict[str, Any]:
    """The cache identity of one model entry (see the module docstring)."""
    backend = config.backend
    ident: dict[str, Any] = {"backend": backend, "model": config.model}
    if backend == "openai":
        # replicas of one model are one model: the same set of URLs, in any order, is the same identity
        ident["base_url"] = config.base_url if isinstance(config.base_url, str) else sorted(config.base_urls)
        if config.revision:
            ident["revision"] = config.revision
    elif backend == "llamacpp":
        ident["weights"] = weights_digest(config.model, base_dir)
        # The chat format changes the prompt the model sees.
        ident["chat_format"] = config.effective_chat_format()
    elif backend == "hf":
        ident["weights"] = weights_digest(config.model, base_dir)
        if config.adapter:
            ident["adapter"] = weights_digest(config.adapter, base_dir) or config.adapter
    elif backend == "scripted":
        rules = [r.model_dump() for r in config.rules]
        ident["script"] = hashlib.sha256(json.dumps([rules, config.handler], sort_keys=True).encode()).hexdigest()[:16]
        if config.replay:
            ident["replay"] = weights_digest(config.replay, base_dir) or config.replay
    return ident
