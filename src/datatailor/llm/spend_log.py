"""What each process of a run asked the model servers for, written as it happens, so spend adds up after a kill.

Every process that calls models (the driver, each Ray worker) appends one line per event to its own spend log,
`usage/<invocation>.<writer>.jsonl` in the run directory, flushed to the OS before the call goes out and after
it comes back:

    ["s", role, stage]                                   a request is sent
    ["a", role, stage, prompt, completion, usd, cut]     … and answered (cut: stopped by max_tokens)
    ["f", role, stage]                                   … and failed for good (retries spent)
    ["h", role, stage]                                   a cache hit (no request)

A process killed by SIGKILL loses nothing it wrote (the OS has it). Replaying the logs gives, per role and per
stage, what the run spent; a request sent but neither answered nor failed was in flight when its process died:
the server may have answered it, so it is reported as *unaccounted* rather than guessed. `usage.json` is
computed from these logs: "run" sums the logs of this invocation (the driver's and its workers'), "total" every
invocation's, and a log from an earlier invocation never counts as this run's.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datatailor.llm.usage import RoleUsage, UsageLedger

USAGE_DIR = "usage"


class SpendLog:
    """One process's append-only spend log (a local file; see `storage` for how it reaches an object store)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, event: list[Any]) -> None:
        if self._fh.closed:
            return
        self._fh.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def writer_name() -> str:
    """Unique per process and incarnation: host, pid (what a test kills, what orphan adoption checks) and a tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def log_name(invocation: str, writer: str) -> str:
    return f"{USAGE_DIR}/{invocation}.{writer}.jsonl"


def invocation_of(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].split(".", 1)[0]


def spend_logs(local: Path, store: Any = None) -> Iterator[tuple[str, Iterator[list[Any]]]]:
    """(name, events) of every spend log of a run: those in the local run directory (or staging folder), and
    those only in its object store (`storage.RunStore`, when --out is a URL: workers write theirs there)."""
    from datatailor.storage import LOG, RunStore, iter_journal_rows

    seen: set[str] = set()
    folder = local / USAGE_DIR
    here = RunStore(local)
    for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
        rel = f"{USAGE_DIR}/{path.name}"
        seen.add(rel)
        yield rel, _rows(iter_journal_rows(here, rel))  # read, never cut: a live worker may be mid-line
    if store is not None:
        names = sorted({name.split(LOG + "/", 1)[0] for name in store.list(USAGE_DIR) if LOG + "/" in name})
        for rel in names:
            if rel not in seen:
                yield rel, _rows(iter_journal_rows(store, rel))


def _rows(rows: Iterable[Any]) -> Iterator[list[Any]]:
    for row in rows:
        if isinstance(row, list) and len(row) >= 3:
            yield row


class Spend:
    """Usage replayed from spend logs."""

    def __init__(self) -> None:
        self.roles: dict[str, RoleUsage] = {}
        self.stages: dict[str, RoleUsage] = {}
        self.sent: dict[str, int] = {}  # per role: a role is online (it logs "s") or batched (it does not)
        self.ended: dict[str, int] = {}

    @property
    def unaccounted(self) -> int:
        """Requests sent whose outcome no log holds: in flight when their process died (an upper bound: one may have
        died in the client before it reached the server). Batched requests are not sent one by one: not counted."""
        return sum(max(0, n - self.ended.get(role, 0)) for role, n in self.sent.items())

    def replay(self, events: Iterable[list[Any]]) -> Spend:
        for e in events:
            kind, role, stage = e[0], e[1], e[2]
            entries = [self.roles.setdefault(role, RoleUsage())]
            if stage is not None:
                entries.append(self.stages.setdefault(stage, RoleUsage()))
            if kind == "s":
                self.sent[role] = self.sent.get(role, 0) + 1
            elif kind == "a":
                self.ended[role] = self.ended.get(role, 0) + 1
                for u in entries:
                    u.requests += 1
                    u.prompt_tokens += int(e[3])
                    u.completion_tokens += int(e[4])
                    u.cost_usd = round(u.cost_usd + float(e[5]), 10)
                    u.truncated += int(e[6])
            elif kind == "f":
                self.ended[role] = self.ended.get(role, 0) + 1
                for u in entries:
                    u.failed_requests += 1
            elif kind == "h":
                for u in entries:
                    u.cache_hits += 1
        return self

    def add(self, other: Spend) -> Spend:
        for mine, theirs in ((self.roles, other.roles), (self.stages, other.stages)):
            for k, u in theirs.items():
                mine[k] = mine.get(k, RoleUsage()).add(u)
        for mine_n, theirs_n in ((self.sent, other.sent), (self.ended, other.ended)):
            for role, n in theirs_n.items():
                mine_n[role] = mine_n.get(role, 0) + n
        return self

    def add_usage(self, roles: dict[str, RoleUsage], stages: dict[str, RoleUsage]) -> Spend:
        """Add usage known only as totals (a usage.json from before spend logs)."""
        for mine, theirs in ((self.roles, roles), (self.stages, stages)):
            for k, u in theirs.items():
                mine[k] = mine.get(k, RoleUsage()).add(u)
        return self


def usage_json(run: Spend, total: Spend, base: dict[str, Any]) -> dict[str, Any]:
    """usage.json: "run" and "total" as `UsageLedger.as_json` lays them out, each with the requests sent whose
    outcome no log holds (`unaccounted_requests`), and the usage that predates spend logs (`base`)."""

    def section(spend: Spend) -> dict[str, Any]:
        ledger = UsageLedger()
        ledger.run, ledger.run_stages = dict(spend.roles), dict(spend.stages)
        out = ledger.as_json()["run"]
        out["unaccounted_requests"] = spend.unaccounted
        return out

    data: dict[str, Any] = {"run": section(run), "total": section(total), "from_spend_logs": True}
    if base:
        data["base"] = base
    return data


def account(logs: Iterable[tuple[str, Iterable[list[Any]]]], invocation: str, base: dict[str, Any]) -> tuple[Spend, Spend]:
    """(this invocation's spend, every invocation's) from (log name, events) pairs and the pre-log `base`."""
    run, total = Spend(), base_spend(base)
    for rel, events in logs:
        spend = Spend().replay(events)
        total.add(spend)
        if invocation_of(rel) == invocation:
            run.add(spend)
    return run, total


def base_of(usage: dict[str, Any]) -> dict[str, Any]:
    """The part of a usage.json that no spend log holds: all of it for a usage.json written before spend logs."""
    if not usage:
        return {}
    if usage.get("from_spend_logs"):
        return usage.get("base") or {}
    return {"roles": (usage.get("total") or {}).get("roles") or {}, "stages": (usage.get("total") or {}).get("stages") or {}}


def base_spend(base: dict[str, Any]) -> Spend:
    return Spend().add_usage({r: RoleUsage.model_validate(u) for r, u in (base.get("roles") or {}).items()},
                             {s: RoleUsage.model_validate(u) for s, u in (base.get("stages") or {}).items()})
