"""`datatailor coach prepare`: CoachLM's expert revisions → the coach's training set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from datatailor.errors import UserError

coach_app = typer.Typer(help="CoachLM: prepare a coach's training set from expert revisions.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(coach_app, name="coach")


@coach_app.command("prepare")
def prepare_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for train.jsonl, heldout.jsonl, shots.jsonl, prepare.json."),
    data: str = typer.Option("coachlm", "--data", "-d", help="`coachlm` (the shipped 2,301 expert revisions) or a file of before/after pairs."),
    alpha: float = typer.Option(0.3, "--alpha", help="Quality coefficient: train on this share of the pairs with the largest revisions (the paper: ~0.3)."),
    direction: str = typer.Option("descending", "--direction", help="descending: largest revisions first (the CoachLM README); ascending: smallest first (a third-party reproduction)."),
    holdout: int = typer.Option(100, "--holdout", min=1, help="Pairs held out for evaluation (seeded); never in training."),
    seed: int = typer.Option(0, "--seed"),
    field: Optional[list[str]] = typer.Option(
        None, "--field", metavar="TARGET=COLUMN",
        help="Map a column of --data: TARGET=COLUMN for instruction, input, response (the pair before revision). The revision is read from revised_instruction/revised_input/revised_response.",
    ),
) -> int:
    """Repair the expert revisions, measure each revision's size (character edit distance), hold out a seeded
    evaluation split, keep the top α of the rest by revision size, and write the coach format. Then train the coach:
    `datatailor train --data OUT/train.jsonl --base MODEL --preset coachlm_coach --out COACH`."""
    from datatailor.io import parse_field_options
    from datatailor.stages.coach.prepare import prepare

    if direction not in ("descending", "ascending"):
        raise UserError(f"--direction {direction!r}: expected descending or ascending")
    report = prepare(data, out, alpha=alpha, direction=direction, holdout=holdout, seed=seed,  # type: ignore[arg-type]
                     fields=parse_field_options(field) or None)
    agreement = report["distance_agreement"]
    typer.echo(
        f"{report['pairs']} expert pairs (repairs: {report['repairs'] or 'none'}); edit distance equals the stored one for "
        f"{agreement['exact']} of {agreement['with_stored']}; held out {report['heldout']}; training on {report['train']} "
        f"(alpha {alpha}, {direction}) → {out / 'train.jsonl'}"
    )
    return 0
