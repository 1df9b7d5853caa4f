"""A bake-off folder (see `datatailor.bakeoff.run` for its layout) read for the viewer: the table of methods by test
set, and for each cell the evaluation run whose judged items it counts.

The table comes from `bakeoff_report.json` when the bake-off has finished; before that, from the `eval.json` each
finished evaluation wrote, so a bake-off in progress shows the cells it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatailor.viewer.folders import read_json

METRICS = ("wins", "ties", "losses", "n", "crr", "wr1", "wr2", "qs", "position_consistency")


@dataclass
class Cell:
    method: str
    testset: str
    metrics: dict[str, Any]
    run: Path  # the evaluation's run directory (its judged items)

    @property
    def available(self) -> bool:
        return (self.run / "manifest.json").is_file()


@dataclass
class MethodRow:
    name: str
    untuned: bool
    cells: dict[str, Cell]
    data: dict[str, Any]
    quality: dict[str, Any]
    run: Path | None  # the method's data run (None: the untuned row)


@dataclass
class BakeoffFolder:
    path: Path

    def config(self) -> dict[str, Any]:
        return read_json(self.path / "bakeoff.json") or {}

    def report(self) -> dict[str, Any] | None:
        return read_json(self.path / "bakeoff_report.json")

    def testsets(self) -> list[str]:
        report = self.report()
        if report and report.get("testsets"):
            return [str(t["name"]) for t in report["testsets"]]
        return sorted(p.name.removesuffix(".eval.jsonl") for p in (self.path / "split").glob("*.eval.jsonl"))

    def method_names(self) -> list[str]:
        report = self.report()
        if report and report.get("methods"):
            return list(report["methods"])
        return sorted(p.name for p in (self.path / "methods").iterdir() if p.is_dir()) if (self.path / "methods").is_dir() else []

    def rows(self) -> list[MethodRow]:
        report = self.report() or {}
        methods = report.get("methods") or {}
        out = []
        for name in self.method_names():
            entry = methods.get(name) or {}
            folder = self.path / "methods" / name
            cells = {}
            for ts in self.testsets():
                metrics = (entry.get("testsets") or {}).get(ts)
                if metrics is None:  # not in a finished report (yet): the evaluation's own summary
                    summary = read_json(folder / "eval" / ts / "eval.json") or {}
                    metrics = {**(summary.get("metrics") or {}), "position_consistency": summary.get("position_consistency")} if summary else {}
                cells[ts] = Cell(name, ts, {k: metrics.get(k) for k in METRICS}, folder / "eval" / ts / "run")
            run = folder / "run"
            out.append(MethodRow(name, bool(entry.get("untuned")) or not run.is_dir(), cells, entry.get("data") or {},
                                 entry.get("quality") or {}, run if (run / "manifest.json").is_file() else None))
        return out

    def cell(self, method: str, testset: str) -> Cell | None:
        for row in self.rows():
            if row.name == method:
                return row.cells.get(testset)
        return None
