"""Live progress: rows done/failed per stage, requests, tokens, $ and req/s, and the run's provider batches.

A rich live display on a terminal; a plain log line every few seconds otherwise (CI, pipes). With batched roles
(llm/batch) it also shows the batches submitted / in progress / completed / failed, the requests they answered and
the age of the oldest pending one — what the run is waiting for while a batch runs for hours.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from datatailor.llm.usage import UsageLedger


@dataclass
class _StageState:
    total: int = 0
    done: int = 0
    failed: int = 0
    started: float = 0.0
    finished: bool = False


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunProgress:
    def __init__(self, enabled: bool | None = None, stream: Any = None, log_every_s: float = 5.0):
        self.stream = stream or sys.stderr
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = True if enabled is None else enabled
        self.live_mode = self.enabled and is_tty
        self.log_every_s = log_every_s
        self.ledger: UsageLedger | None = None
        self.batches: Callable[[], dict[str, Any] | None] | None = None
        self.stages: dict[str, _StageState] = {}
        self.t0 = time.monotonic()
        self._last_log = 0.0
        self._live: Live | None = None
        self._console = Console(file=self.stream)

    def attach(self, ledger: UsageLedger, stage_names: list[str],
               batches: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Show `ledger`'s usage and these stages; `batches` gives the run's batch summary (None: no batched role)."""
        self.ledger = ledger
        self.stages = {n: _StageState() for n in stage_names}
        self.batches = batches

    def refresh(self) -> None:
        """Something changed outside the stages (a batch was submitted or ended): redraw, or log if a line is due."""
        self._refresh()

    # -- events from the runner --------------------------------------------------

    def stage_started(self, name: str, total: int, done: int = 0, failed: int = 0) -> None:
        st = self.stages.setdefault(name, _StageState())
        st.total, st.done, st.failed, st.started = total, done, failed, time.monotonic()
        self._refresh(force=True)

    def advance(self, name: str, failed: bool = False) -> None:
        st = self.stages[name]
        st.done += 1
        st.failed += int(failed)
        self._refresh()

    def stage_finished(self, name: str) -> None:
        self.stages[name].finished = True
        self._refresh(force=True)

    # -- rendering ------------------------------------------------------------

    def usage_line(self) -> str:
        if self.ledger is None:
            return ""
        run = self.ledger.run.values()
        req = sum(u.requests for u in run)
        hits = sum(u.cache_hits for u in run)
        tok = sum(u.tokens for u in run)
        usd = sum(u.cost_usd for u in run)
        rate = req / max(1e-9, time.monotonic() - self.t0)
        return f"requests {req} (+{hits} cached) | tokens {tok} | ${usd:.4f} | {rate:.1f} req/s" + self.batch_line()

    def batch_line(self) -> str:
        """' | batches …' when the run has batched roles, else ''."""
        b = self.batches() if self.batches is not None else None
        if not b or not b.get("submitted"):
            return ""
        line = (f" | batches {b['submitted']} submitted, {b['in_progress']} in progress, {b['completed']} completed, "
                f"{b['failed']} failed; {b['requests_done']}/{b['requests']} batched requests done")
        if b.get("oldest_pending_s") is not None:
            line += f"; oldest pending {_age(b['oldest_pending_s'])}"
        return line

    def _table(self) -> Table:
        table = Table(box=None, show_header=True, header_style="bold")
        for col in ("stage", "done", "failed", "total", ""):
            table.add_column(col)
        for name, st in self.stages.items():
            mark = "✓" if st.finished else ("…" if st.started else "")
            table.add_row(name, str(st.done), str(st.failed), str(st.total), mark)
        table.caption = self.usage_line()
        return table

    def _refresh(self, force: bool = False) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._table())
            return
        now = time.monotonic()
        if force or now - self._last_log >= self.log_every_s:
            self._last_log = now
            parts = [f"{n} {s.done}/{s.total}" + (f" ({s.failed} failed)" if s.failed else "") for n, s in self.stages.items() if s.started]
            print(f"[datatailor] {' | '.join(parts)} | {self.usage_line()}", file=self.stream, flush=True)

    def __enter__(self) -> "RunProgress":
        if self.live_mode:
            self._live = Live(self._table(), console=self._console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)
            self._live = None
        elif self.enabled:
            self._refresh(force=True)
