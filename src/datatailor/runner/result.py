"""What a run ends as: its status and the figures `datatailor run` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS_COMPLETE = "complete"
STATUS_SHORTFALL = "shortfall"  # every stage finished, but fewer pairs than asked were delivered
STATUS_INTERRUPTED = "interrupted"
STATUS_BUDGET = "budget_exhausted"
STATUS_RUNNING = "running"


@dataclass
class RunResult:
    status: str
    out_dir: Path
    records: int = 0
    failures: int = 0
    message: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    shortfall: dict[str, Any] | None = None
