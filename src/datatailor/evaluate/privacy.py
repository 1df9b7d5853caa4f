"""Membership inference on a fine-tuned model (TeaMs-RL's privacy check).

A loss-based attack: a model tends to fit the pairs it was trained on better than unseen ones,
so the attacker scores each pair by how likely the model finds its response,

    score = −(mean negative log-likelihood of the response tokens given the prompt),

and guesses "member" above a threshold. The ROC AUC over members (training pairs) and
non-members (held-out pairs) summarises how well that works at every threshold: 0.5 means the
attacker cannot tell the two apart (no measurable leakage), 1.0 means it always can. TeaMs-RL
reports ≈ 0.47 for its model against ≈ 0.72 for a baseline; the paper's exact attack setup is not
known (TeaMs-RL, arXiv 2403.08694, reports only the AUC), this is the standard loss attack.

The prompt is built with the same template the model was trained with: read from the adapter's or
model's `train_config.yaml` when there is one, else `respond.j2`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from datatailor.errors import UserError
from datatailor.records import Record

DEFAULT_TEMPLATE = "respond.j2"


# ----------------------------------------------------------------------------- ROC


class RocPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(description="Guess 'member' when score ≥ threshold; None for the (0, 0) corner.")
    fpr: float
    tpr: float


def _check_scores(positives: Sequence[float], negatives: Sequence[float]) -> None:
    if not positives or not negatives:
        raise ValueError(f"ROC AUC needs both classes (got {len(positives)} members, {len(negatives)} non-members)")


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Probability that a random positive outscores a random negative, ties counting one half.

    Computed from average ranks (the Mann–Whitney U statistic), so equal scores get equal ranks.
    """
    _check_scores(positives, negatives)
    scored = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives], key=lambda x: x[0])
    rank_sum = 0.0
    i = 0
    while i < len(scored):
        j = i
        while j + 1 < len(scored) and scored[j + 1][0] == scored[i][0]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # ranks are 1-based; a tie group shares the mean of its ranks
        rank_sum += mean_rank * sum(label for _, label in scored[i : j + 1])
        i = j + 1
    n_pos, n_neg = len(positives), len(negatives)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(positives: Sequence[float], negatives: Sequence[float]) -> list[RocPoint]:
    """The ROC points from (0, 0) to (1, 1), one per distinct score, highest threshold first.

    Tied scores move both rates in one step, so the trapezoid area under these points equals `roc_auc`.
    """
    _check_scores(positives, negatives)
    n_pos, n_neg = len(positives), len(negatives)
    pos_at, neg_at = Counter(positives), Counter(negatives)
    points = [RocPoint(threshold=None, fpr=0.0, tpr=0.0)]
    tp = fp = 0
    for threshold in sorted(pos_at.keys() | neg_at.keys(), reverse=True):
        tp += pos_at[threshold]
        fp += neg_at[threshold]
        points.append(RocPoint(threshold=threshold, fpr=fp / n_neg, tpr=tp / n_pos))
    return points


def trapezoid_area(points: Sequence[RocPoint]) -> float:
    return sum((b.fpr - a.fpr) * (a.tpr + b.tpr) / 2 for a, b in zip(points, points[1:]))


# ----------------------------------------------------------------------------- the attack


class PairScore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    member: bool
    score: float = Field(description="−mean NLL of the response tokens; higher = more likely a member.")
    tokens: int


class MembershipReport(BaseModel):
    """The result of a loss-based membership-inference attack."""

    model_config = ConfigDict(extra="forbid")

    model: str
    adapter: str | None
    template: str
    members: str
    nonmembers: str
    n_members: int
    n_nonmembers: int
    skipped_no_response: int
    auc: float = Field(description="ROC AUC of the attack; 0.5 = no measurable leakage, 1.0 = full leakage.")
    advantage: float = Field(description="Best TPR − FPR over all thresholds (the attacker's edge over guessing).")
    member_mean_nll: float
    nonmember_mean_nll: float
    roc: list[RocPoint]
    scores: list[PairScore]
    wall_time_s: float


async def score_pairs(backend: Any, records: Sequence[Record], member: bool, template: str = DEFAULT_TEMPLATE) -> list[PairScore]:
    """Score each pair with `backend.loglikelihood` (an `HFBackend`, or anything with that method)."""
    from datatailor.prompts import load_prompt
    from datatailor.train.sft_data import pair_messages

    prompt = load_prompt(template)
    scores = []
    for record in records:
        logprobs = await backend.loglikelihood(pair_messages(record, prompt), record.response or "")
        if not logprobs.logprobs:
            continue  # a response with no tokens has no likelihood to compare
        scores.append(PairScore(id=record.id, member=member, score=-logprobs.mean_nll, tokens=len(logprobs.logprobs)))
    return scores


def summarise(scores: Sequence[PairScore]) -> tuple[float, float, list[RocPoint]]:
    """AUC, advantage and ROC points of member vs non-member scores."""
    pos = [s.score for s in scores if s.member]
    neg = [s.score for s in scores if not s.member]
    try:
        auc = roc_auc(pos, neg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    points = roc_curve(pos, neg)
    advantage = max(p.tpr - p.fpr for p in points)
    return auc, advantage, points


def trained_template(model: str, adapter: str | None) -> str | None:
    """The prompt template a datatailor-trained adapter or model was trained with, if recorded."""
    from datatailor.train.sft import read_train_config

    for folder in (adapter, model):
        if folder and Path(folder).is_dir():
            config = read_train_config(folder)
            if config is not None:
                return config.prompt_template
    return None


def _trained_output(model: str, adapter: str | None) -> tuple[str, str | None]:
    """A `datatailor train` output folder given as the model means what its report's `use_as` says."""
    from datatailor.train.sft import read_train_report

    if adapter is None and Path(model).is_dir():
        report = read_train_report(model)
        if report is not None:
            return report.use_as["model"], report.use_as.get("adapter")
    return model, adapter


def _load_pairs(source: str | Path, limit: int | None) -> tuple[list[Record], int]:
    from datatailor.train.sft_data import load_pairs

    return load_pairs(source, limit=limit)


async def amembership_inference(
    model: str,
    members: str | Path,
    nonmembers: str | Path,
    *,
    adapter: str | None = None,
    template: str | None = None,
    limit: int | None = None,
    device: str = "auto",
) -> MembershipReport:
    from datatailor.llm.config import HFModel
    from datatailor.llm.hf import HFBackend

    start = time.perf_counter()
    member_records, skipped_m = _load_pairs(members, limit)
    nonmember_records, skipped_n = _load_pairs(nonmembers, limit)
    overlap = {r.id for r in member_records} & {r.id for r in nonmember_records}
    if overlap:
        raise UserError(
            f"{len(overlap)} pair(s) appear among both the members ({members}) and the non-members ({nonmembers}); "
            "held-out pairs must not be training pairs"
        )
    model, adapter = _trained_output(model, adapter)
    template = template or trained_template(model, adapter) or DEFAULT_TEMPLATE
    backend = HFBackend(HFModel(model=model, adapter=adapter, device=device))
    try:
        scores = await score_pairs(backend, member_records, True, template)
        scores += await score_pairs(backend, nonmember_records, False, template)
    finally:
        await backend.aclose()
    auc, advantage, points = summarise(scores)

    def mean_nll(member: bool) -> float:
        values = [-s.score for s in scores if s.member == member]
        return sum(values) / len(values)

    return MembershipReport(
        model=model,
        adapter=adapter,
        template=template,
        members=str(members),
        nonmembers=str(nonmembers),
        n_members=sum(s.member for s in scores),
        n_nonmembers=sum(not s.member for s in scores),
        skipped_no_response=skipped_m + skipped_n,
        auc=auc,
        advantage=advantage,
        member_mean_nll=mean_nll(True),
        nonmember_mean_nll=mean_nll(False),
        roc=points,
        scores=scores,
        wall_time_s=round(time.perf_counter() - start, 2),
    )


def membership_inference(model: str, members: str | Path, nonmembers: str | Path, **kwargs: Any) -> MembershipReport:
    """Run the loss attack on `model` (+ `adapter`) with training pairs `members` and held-out `nonmembers`."""
    return asyncio.run(amembership_inference(model, members, nonmembers, **kwargs))
