"""Usage per role (requests, cache hits, tokens, $) and the recipe's budget."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from datatailor.errors import BudgetExhausted


class RoleUsage(BaseModel):
    requests: int = 0
    cache_hits: int = 0
    failed_requests: int = 0
    # Replies cut off by max_tokens (their text may end mid-sentence; see each stage's handling).
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: "RoleUsage") -> "RoleUsage":
        return RoleUsage(
            requests=self.requests + other.requests,
            cache_hits=self.cache_hits + other.cache_hits,
            failed_requests=self.failed_requests + other.failed_requests,
            truncated=self.truncated + other.truncated,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 10),
        )

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Budget(BaseModel):
    """Spending limits of a recipe. Counted over every invocation of the same run directory."""

    model_config = ConfigDict(extra="forbid")

    max_usd: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)


class UsageLedger:
    """Counts usage per role, and per stage, for this invocation, on top of what earlier invocations spent."""

    def __init__(self, previous: dict[str, RoleUsage] | None = None, budget: Budget | None = None,
                 previous_stages: dict[str, RoleUsage] | None = None):
        self.previous = dict(previous or {})
        self.previous_stages = dict(previous_stages or {})
        self.run: dict[str, RoleUsage] = {}
        self.run_stages: dict[str, RoleUsage] = {}
        self.budget = budget or Budget()
        # What other processes of the same run spent in this invocation ($, tokens), kept current by a
        # distributed executor, so that the budget holds across workers.
        self.elsewhere: tuple[float, int] = (0.0, 0)
        # Where each event is written as it happens (`llm.spend_log`), so a killed process's spend is not lost.
        self.log: Any = None

    def request_started(self, role: str, stage: str | None = None) -> None:
        """A request is about to be sent (its outcome is recorded by record_request or record_failure)."""
        if self.log is not None:
            self.log.write(["s", role, stage])

    def _entries(self, role: str, stage: str | None) -> list[RoleUsage]:
        entries = [self.run.setdefault(role, RoleUsage())]
        if stage is not None:
            entries.append(self.run_stages.setdefault(stage, RoleUsage()))
        return entries

    def record_request(self, role: str, prompt_tokens: int, completion_tokens: int, cost: float, truncated: bool = False,
                       stage: str | None = None) -> None:
        for u in self._entries(role, stage):
            u.requests += 1
            u.truncated += int(truncated)
            u.prompt_tokens += prompt_tokens
            u.completion_tokens += completion_tokens
            u.cost_usd = round(u.cost_usd + cost, 10)
        if self.log is not None:
            self.log.write(["a", role, stage, prompt_tokens, completion_tokens, cost, int(truncated)])

    def record_failure(self, role: str, stage: str | None = None) -> None:
        for u in self._entries(role, stage):
            u.failed_requests += 1
        if self.log is not None:
            self.log.write(["f", role, stage])

    def record_cache_hit(self, role: str, stage: str | None = None) -> None:
        for u in self._entries(role, stage):
            u.cache_hits += 1
        if self.log is not None:
            self.log.write(["h", role, stage])

    def total(self) -> dict[str, RoleUsage]:
        roles = sorted(set(self.previous) | set(self.run))
        return {r: self.previous.get(r, RoleUsage()).add(self.run.get(r, RoleUsage())) for r in roles}

    def spent(self) -> tuple[float, int]:
        t = self.total().values()
        return sum(u.cost_usd for u in t) + self.elsewhere[0], sum(u.tokens for u in t) + self.elsewhere[1]

    def run_spent(self) -> tuple[float, int]:
        """What this ledger recorded in this invocation ($, tokens)."""
        return sum(u.cost_usd for u in self.run.values()), sum(u.tokens for u in self.run.values())

    def absorb(self, run_json: dict) -> None:
        """Add another ledger's usage of this invocation (its `as_json()["run"]`): a worker's, after it finished."""
        for role, usage in (run_json.get("roles") or {}).items():
            self.run[role] = self.run.get(role, RoleUsage()).add(RoleUsage.model_validate(usage))
        for stage, usage in (run_json.get("stages") or {}).items():
            self.run_stages[stage] = self.run_stages.get(stage, RoleUsage()).add(RoleUsage.model_validate(usage))

    def check_budget(self) -> None:
        """Raise BudgetExhausted when a limit is reached; called before every new (uncached) call."""
        usd, tokens = self.spent()
        b = self.budget
        if b.max_usd is not None and usd >= b.max_usd:
            raise BudgetExhausted(f"budget reached: ${usd:.4f} of ${b.max_usd:.4f} spent")
        if b.max_tokens is not None and tokens >= b.max_tokens:
            raise BudgetExhausted(f"budget reached: {tokens} of {b.max_tokens} tokens spent")

    def check_worst_case(self, usd: float, tokens: int) -> None:
        """Raise BudgetExhausted when spending up to `usd` and `tokens` more could pass a limit: asked before work is
        committed whose bill comes later (a provider batch, with the batches still pending; llm/batch)."""
        spent_usd, spent_tokens = self.spent()
        b = self.budget
        if b.max_usd is not None and spent_usd + usd > b.max_usd:
            raise BudgetExhausted(f"budget: up to ${usd:.4f} more on top of ${spent_usd:.4f} spent could pass ${b.max_usd:.4f}")
        if b.max_tokens is not None and spent_tokens + tokens > b.max_tokens:
            raise BudgetExhausted(f"budget: up to {tokens} tokens more on top of {spent_tokens} could pass {b.max_tokens}")

    def total_stages(self) -> dict[str, RoleUsage]:
        names = sorted(set(self.previous_stages) | set(self.run_stages))
        return {n: self.previous_stages.get(n, RoleUsage()).add(self.run_stages.get(n, RoleUsage())) for n in names}

    def as_json(self) -> dict:
        def dump(d: dict[str, RoleUsage], stages: dict[str, RoleUsage]) -> dict:
            per_role = {r: u.model_dump() for r, u in sorted(d.items())}
            summed = RoleUsage()
            for u in d.values():
                summed = summed.add(u)
            return {"roles": per_role, "all": summed.model_dump(), "stages": {n: u.model_dump() for n, u in sorted(stages.items())}}

        return {"run": dump(self.run, self.run_stages), "total": dump(self.total(), self.total_stages())}

    @staticmethod
    def previous_from_json(data: dict) -> dict[str, RoleUsage]:
        roles = (data.get("total") or {}).get("roles") or {}
        return {r: RoleUsage.model_validate(u) for r, u in roles.items()}

    @staticmethod
    def previous_stages_from_json(data: dict) -> dict[str, RoleUsage]:
        stages = (data.get("total") or {}).get("stages") or {}
        return {n: RoleUsage.model_validate(u) for n, u in stages.items()}
