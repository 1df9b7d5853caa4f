"""`datatailor privacy`: a loss-based membership-inference attack on a fine-tuned model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("privacy")(privacy)


def privacy(
    model: str = typer.Option(
        ..., "--model", help="The fine-tuned model: a `datatailor train` output folder, or a base (HF folder, .gguf, local:NAME) with --adapter."
    ),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder written by `datatailor train`."),
    members: Path = typer.Option(..., "--members", help="The training pairs (a run folder or dataset file)."),
    nonmembers: Path = typer.Option(..., "--nonmembers", help="Held-out pairs of the same kind, never trained on."),
    out: Path = typer.Option(..., "--out", "-o", help="Report JSON (AUC, ROC points, per-pair scores)."),
    template: Optional[str] = typer.Option(
        None, "--template", help="Prompt template; default: the one recorded in the adapter's train_config.yaml, else respond.j2."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use the first N pairs of each set."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps."),
) -> int:
    """Score every pair by the model's likelihood of its response and report how well that tells
    training pairs from held-out ones (ROC AUC: 0.5 = no measurable leakage, 1.0 = full)."""
    from datatailor.evaluate.privacy import membership_inference
    from datatailor.io import write_json

    report = membership_inference(
        model, members, nonmembers, adapter=adapter, template=template, limit=limit, device=device
    )
    write_json(out, report.model_dump(mode="json"))
    typer.echo(
        f"membership inference: AUC {report.auc:.3f} (0.5 = no leakage), advantage {report.advantage:.3f}; "
        f"mean NLL members {report.member_mean_nll:.3f} vs non-members {report.nonmember_mean_nll:.3f} "
        f"({report.n_members} + {report.n_nonmembers} pairs) → {out}"
    )
    return 0
