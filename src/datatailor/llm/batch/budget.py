"""The budget before a batch is submitted: its worst case, with what the pending batches may still bill, must fit.

A batch is billed when it ends, hours after it was sent; so before one is sent, each of its requests is priced at its
worst case (backend.worst_case: the prompt with a margin, a reply of max_tokens, at the batch price), and the batches
still pending are counted at theirs. The largest first part of the queue that fits goes; the rest is refused with
`BudgetExhausted`, which ends the run as `budget_exhausted` (resumable with a larger budget).
"""

from __future__ import annotations

from datatailor.errors import BudgetExhausted
from datatailor.llm.usage import UsageLedger


def fits_budget(ledger: UsageLedger | None, pending: tuple[float, int], worst: list[tuple[float, int]]) -> int:
    """How many of the requests whose worst cases are `worst`, in order, can be sent now."""
    if ledger is None or (ledger.budget.max_usd is None and ledger.budget.max_tokens is None):
        return len(worst)
    usd, tokens = [pending[0]], [pending[1]]
    for w_usd, w_tokens in worst:
        usd.append(usd[-1] + w_usd)
        tokens.append(tokens[-1] + w_tokens)

    def fits(n: int) -> bool:
        try:
            ledger.check_worst_case(usd[n], tokens[n])
        except BudgetExhausted:
            return False
        return True

    if fits(len(worst)):
        return len(worst)
    lo, hi = 0, len(worst)  # the first part that fits (maybe none): fits() only turns False as n grows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def refusal_message(ledger: UsageLedger | None, pending: tuple[float, int], refused: list[tuple[float, int]]) -> BudgetExhausted:
    usd = sum(w for w, _ in refused)
    spent_usd, spent_tokens = ledger.spent() if ledger else (0.0, 0)
    budget = ledger.budget if ledger else None
    limit = f"${budget.max_usd:.4f}" if budget and budget.max_usd is not None else f"{budget.max_tokens if budget else '?'} tokens"
    return BudgetExhausted(
        f"budget: stopped submitting batches: {len(refused)} more request(s) could cost up to ${usd:.4f} (worst case: every "
        f"reply at max_tokens), on top of ${spent_usd:.4f} / {spent_tokens} tokens spent and ${pending[0]:.4f} that pending "
        f"batches may still bill, over the budget of {limit}. Raise the budget and re-run to continue"
    )
