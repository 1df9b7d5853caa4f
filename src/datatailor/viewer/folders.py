"""What a folder given to `datatailor view` is, and what its small files say.

A **run directory** holds `manifest.json` (or, in the first instant of a run, only `recipe.json`); a **bake-off
folder** holds `bakeoff.json`. The run's files are read as the runner writes them (see `datatailor.runner`):
nothing here writes into the folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatailor.errors import UserError

RUNNING = "running"
FINAL_STATUSES = ("complete", "shortfall")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object; None when it is absent. A file being replaced is retried once; a damaged one is a
    UserError naming it."""
    for attempt in range(2):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            if attempt == 0:
                time.sleep(0.05)
                continue
            raise UserError(f"{path}: damaged JSON ({exc.msg}, line {exc.lineno})") from None
        return data if isinstance(data, dict) else None
    return None


def folder_kind(path: Path) -> str:
    """"run", "bakeoff", or a UserError saying what the folder is not."""
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give a run directory or a bake-off folder)")
    if (path / "bakeoff.json").is_file():
        return "bakeoff"
    if (path / "manifest.json").is_file() or (path / "recipe.json").is_file():
        return "run"
    raise UserError(f"{path}: neither a run directory (no manifest.json) nor a bake-off folder (no bakeoff.json)")


def safe_name(name: str) -> str:
    """A stage's folder name as the runner writes it."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass
class StageInfo:
    index: int
    name: str
    type: str
    folder: Path
    done: dict[str, Any] | None = None  # done.json of a complete stage
    summary: dict[str, Any] | None = None  # the manifest's entry (the last invocation's counts)

    @property
    def complete(self) -> bool:
        return self.done is not None and (self.folder / "records.jsonl").is_file()

    @property
    def counts(self) -> dict[str, Any]:
        """inputs/outputs/failures/failure_kinds/method of the stage, as the runner recorded them (may be empty)."""
        return dict(self.done or self.summary or {})


@dataclass
class RunFolder:
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        return cls(path, read_json(path / "manifest.json") or {})

    def reload(self) -> RunFolder:
        return RunFolder.open(self.path)

    @property
    def status(self) -> str:
        return str(self.manifest.get("status") or RUNNING)

    @property
    def final(self) -> bool:
        """Whether the run's final files (data.jsonl, failures.jsonl) are the ones to show."""
        return self.status in FINAL_STATUSES and (self.path / "data.jsonl").is_file()

    def recipe(self) -> dict[str, Any]:
        return read_json(self.path / "recipe.json") or {}

    def usage(self) -> dict[str, Any]:
        return read_json(self.path / "usage.json") or {}

    def stages(self) -> list[StageInfo]:
        """The recipe's stages in order, with their folders and what the runner recorded of them."""
        specs = self.recipe().get("stages") or []
        summaries = {s.get("name"): s for s in self.manifest.get("stages") or [] if isinstance(s, dict)}
        out: list[StageInfo] = []
        for i, spec in enumerate(specs):
            name = str(spec.get("name") or spec.get("type"))
            folder = self.path / "stages" / f"{i:02d}-{safe_name(name)}"
            out.append(StageInfo(i, name, str(spec.get("type")), folder, read_json(folder / "done.json"), summaries.get(name)))
        if not specs:  # no recipe.json: the folders alone
            for i, folder in enumerate(sorted(p for p in (self.path / "stages").glob("[0-9][0-9]-*") if p.is_dir())):
                done = read_json(folder / "done.json")
                name = str((done or {}).get("name") or folder.name[3:])
                out.append(StageInfo(i, name, str((done or {}).get("type") or ""), folder, done))
        return out

    def quality_key(self) -> str:
        """The metadata key of the run's last `quality.rate` stage ("quality" when none rates)."""
        keys = [str(s.get("key") or "quality") for s in self.recipe().get("stages") or [] if s.get("type") == "quality.rate"]
        return keys[-1] if keys else "quality"

    def quality_keys(self) -> list[str]:
        keys = [str(s.get("key") or "quality") for s in self.recipe().get("stages") or [] if s.get("type") == "quality.rate"]
        return list(dict.fromkeys(keys)) or ["quality"]

    def reports(self) -> list[Path]:
        """The HTML reports the run wrote (run-level and per stage), relative to the run directory."""
        found = [*self.path.glob("reports/*.html"), *self.path.glob("stages/*/*.html")]
        return sorted(p.relative_to(self.path) for p in found)

    def last_write(self) -> float | None:
        """When the run last wrote a checkpoint or a top-level file (seconds since the epoch)."""
        latest: float | None = None
        candidates = [self.path / n for n in ("manifest.json", "usage.json", "data.jsonl")]
        for stage in self.stages():
            candidates += [stage.folder / "outputs.jsonl", stage.folder / "failures.jsonl", stage.folder / "records.jsonl"]
        for p in candidates:
            try:
                m = p.stat().st_mtime
            except FileNotFoundError:
                continue
            latest = m if latest is None else max(latest, m)
        return latest


def status_line(run: RunFolder) -> str:
    """The run's status as a person should read it: a "running" run that has not written for a while may be dead."""
    if run.status != RUNNING:
        return run.status
    last = run.last_write()
    if last is None:
        return "running (nothing written yet)"
    idle = time.time() - last
    if idle < 60:
        return f"running (last write {idle:.0f} s ago)"
    return (f"running? no write for {idle / 60:.0f} min: if no `datatailor run` process is working on it, it was killed "
            "(re-run the same command to resume)")
