"""The run directory: prepared before a run, its manifest kept current, its final files written at the end.

    manifest.json   recipe hash, versions, status, shortfall, per-stage counts, methods and artifacts
    recipe.json     the validated recipe (names env vars, never their values)
    usage.json      {"run": …this invocation…, "total": …all invocations…}, per role
    usage/          spend logs, one per process (driver, Ray workers) and invocation: a line per request sent and
                    answered, so usage.json adds up after a kill (llm/spend_log.py)
    data.jsonl      final records (only once every stage is complete)
    failures.jsonl  one row per failed record: id, stage, kind, message, record
    reports/        the methods' run-level reports, computed from the final files
    stages/NN-name/ the stage's checkpoints (outputs.jsonl, failures.jsonl, done.json, shared_calls.jsonl),
                    its ordered outputs once complete (records.jsonl: what the next stage reads) and its
                    own artifacts (reports, pools, stats); see `runner.checkpoint`
    batches/        batch inference's journal, when a role is batched (`llm.batch`)
    flags.jsonl     review flags from `datatailor view` (`stages.flags`), never part of data.jsonl
"""

from __future__ import annotations

import json
import platform
import shutil
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datatailor import __version__
from datatailor.errors import UserError
from datatailor.io import export_records, write_json, write_jsonl
from datatailor.journal import iter_journal
from datatailor.recipe import Recipe
from datatailor.runner.result import RunResult
from datatailor.runner.stage_exec import stage_dir
from datatailor.store import JsonlSource, RecordSource, RecordWriter


class RunDirectory:
    """`out`, the folder of one recipe's run."""

    def __init__(self, recipe: Recipe, out: Path):
        self.recipe = recipe
        self.out = out
        # What the run tells the user beyond the counts (a resume's skipped records, lost nodes and retried
        # records, where --out is when it is a URL): written into the manifest as they are.
        self.notes: dict[str, Any] = {}
        self.discarded = False  # prepare() discarded another recipe's run (--force)

    def prepare(self, force: bool) -> dict[str, Any]:
        """Make `out` ready for this run; returns the previous invocation's manifest (empty for a new run).

        A folder holding a run of a different recipe is refused unless `force` (then that run is discarded)."""
        manifest_path = self.out / "manifest.json"
        recipe_hash = self.recipe.content_hash()
        previous: dict[str, Any] = {}
        if manifest_path.exists():
            try:
                previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise UserError(f"{manifest_path}: damaged manifest; use another --out or --force") from None
            if previous.get("recipe_hash") != recipe_hash:
                if not force:
                    raise UserError(
                        f"{self.out} holds a run of a different recipe (hash {previous.get('recipe_hash')} != "
                        f"{recipe_hash}). Use another --out, or --force to discard that run and start over."
                    )
                previous = {}
                self.discarded = True
                for name in ("stages", "usage", "data.jsonl", "failures.jsonl", "usage.json", "manifest.json"):
                    p = self.out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
        elif self.out.exists() and any(self.out.iterdir()) and not force:
            if not self.killed_at_start():
                raise UserError(f"{self.out} exists and is not a datatailor run directory; choose another --out")
            for p in self.out.glob(".*.tmp"):  # half-written by the killed start
                p.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        return previous

    def killed_at_start(self) -> bool:
        """The folder holds only what a run writes before its first manifest (recipe.json, or a half-written temp
        file of either): a run killed as it started, so it is ours to resume."""
        return all(p.is_file() and (p.name in ("recipe.json", ".mirror.json") or (p.name.startswith((".recipe.json.", ".manifest.json."))
                                                               and p.name.endswith(".tmp")))
                   for p in self.out.iterdir())

    def write_manifest(
        self, status: str, message: str, stages: list[dict[str, Any]], previous: dict[str, Any], started: str,
        count: bool = True, shortfall: dict[str, Any] | None = None, rounds: int = 1,
    ) -> None:
        manifest = {
            "recipe_name": self.recipe.name,
            "recipe_hash": self.recipe.content_hash(),
            "status": status,
            "message": message,
            "budget_pairs": self.recipe.budget_pairs,
            "shortfall": shortfall,
            "rounds": rounds,
            "stages": stages,
            "invocations": int(previous.get("invocations", 0)) + int(count),
            "first_started_at": previous.get("first_started_at", started),
            "started_at": started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            **self.notes,
        }
        write_json(self.out / "manifest.json", manifest)

    def finish(self, status: str, message: str, summaries: list[dict[str, Any]], previous: dict[str, Any], started: str,
               usage: dict[str, Any], final: RecordSource | None, shortfall: dict[str, Any] | None = None,
               rounds: int = 1) -> RunResult:
        """Write usage (usage.json's content, from the spend logs), and for a finished run (`final` given)
        data.jsonl, failures.jsonl, the exports and the method reports; then the manifest with `status`."""
        write_json(self.out / "usage.json", usage)
        n_failures = 0
        if final is not None:
            if isinstance(final, JsonlSource):
                copy_atomic(final.path, self.out / "data.jsonl")
            else:
                writer = RecordWriter(self.out / "data.jsonl", "the final records")
                for r in final:
                    writer.write(r)
                writer.close()
            n_failures = write_jsonl(self.out / "failures.jsonl", self.collect_failures())
            for fmt in self.recipe.output.formats:
                export_records(final, self.out / f"data.{fmt}.jsonl", fmt)
        self.write_manifest(status, message, summaries, previous, started, shortfall=shortfall, rounds=rounds)
        if final is not None:
            self.method_reports(summaries)
        return RunResult(status, self.out, len(final) if final is not None else 0, n_failures, message, usage, shortfall)

    def method_reports(self, summaries: list[dict[str, Any]]) -> None:
        """Run-level reports of the methods the recipe used (e.g. REFED's), from the finished run directory.

        They read what the run wrote, so they come last; a report that fails leaves the data as it is and
        says so in the manifest."""
        from datatailor.stages.contract import method_report

        errors: list[str] = []
        for key in dict.fromkeys(s.get("method") for s in summaries):
            write = method_report(key)
            if write is None:
                continue
            try:
                write(self.out)
            except Exception as exc:  # the data is written; the report's failure is recorded, not hidden
                errors.append(f"{key} report: {type(exc).__name__}: {exc}")
        if errors:
            manifest = json.loads((self.out / "manifest.json").read_text(encoding="utf-8"))
            manifest["report_errors"] = errors
            write_json(self.out / "manifest.json", manifest)

    def collect_failures(self) -> Iterable[dict[str, Any]]:
        """Every stage's failure rows, stage by stage, each in its input order (as complete stages keep them)."""
        for index in range(len(self.recipe.stages)):
            yield from iter_journal(stage_dir(self.recipe, self.out, index) / "failures.jsonl")


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def versions() -> dict[str, str]:
    import pydantic

    return {"datatailor": __version__, "python": platform.python_version(), "pydantic": pydantic.VERSION}
