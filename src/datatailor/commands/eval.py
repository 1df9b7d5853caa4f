"""`datatailor eval`, `datatailor rate`, `datatailor diversity`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from datatailor.errors import UserError

MODEL_HELP = "local:NAME | llamacpp:PATH | hf:MODEL[+ADAPTER] | openai:MODEL[@BASE_URL] | role:NAME"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("rate")(rate_command)
    app.command("diversity")(diversity_command)


def _budget(budget_usd: float | None, budget_tokens: int | None):
    from datatailor.llm.usage import Budget

    if budget_usd is None and budget_tokens is None:
        return None
    return Budget(max_usd=budget_usd, max_tokens=budget_tokens)


def _exit_code(status: str, message: str, out: Path) -> int:
    typer.secho(f"{status}: {message}", err=True, fg="yellow")
    typer.echo(f"checkpoints kept in {out}; re-run the same command to continue", err=True)
    return 3 if status == "budget_exhausted" else 2


def eval_command(
    testset: str = typer.Option(..., "--testset", "-t", help="vicuna80 | selfinstruct252 | mtbench | coachlm150 | alpacaeval:PATH | PATH"),
    out: Path = typer.Option(..., "--out", "-o", help="Evaluation folder (re-running with the same --out resumes)."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help=f"Model under test: {MODEL_HELP}."),
    reference: Optional[str] = typer.Option(
        None, "--reference", help=f"Model to compare against ({MODEL_HELP}), or 'stored' for the test set's reference answers."
    ),
    judge: Optional[str] = typer.Option(None, "--judge", help=f"Judge model: {MODEL_HELP}."),
    models: Optional[Path] = typer.Option(
        None, "--models", "-m", help="YAML with models by role (a recipe, or role: entry); roles candidate/reference/judge."
    ),
    rule: str = typer.Option("strict", "--rule", help="Headline aggregation rule: strict (CodecLM CRR) | lenient | mean."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N items."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Longest candidate/reference answer (default: each model's max_tokens)."),
    judge_max_tokens: Optional[int] = typer.Option(None, "--judge-max-tokens", min=1, help="Longest judge reply (the scores come on its first line)."),
    judge_template: Optional[str] = typer.Option(None, "--judge-template", help="Pairwise judge prompt (.j2)."),
    respond_template: Optional[str] = typer.Option(None, "--respond-template", help="Answering prompt (.j2)."),
    seed: int = typer.Option(0, "--seed"),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="Stop starting model calls after this many $."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Stop starting model calls after this many tokens."),
    force: bool = typer.Option(False, "--force", help="Discard an earlier evaluation with other settings in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    field: Optional[list[str]] = typer.Option(
        None, "--field", metavar="TARGET=COLUMN", help="Map a column of the test-set file: TARGET=COLUMN (targets instruction, input, response, category, id); repeatable."
    ),
    scoring: str = typer.Option(
        "sampled", "--scoring", help="sampled: the scores the judge wrote (the papers); logprob: expected scores from the judge's token probabilities."
    ),
    consistency_threshold: float = typer.Option(
        0.6, "--consistency-threshold", min=0.0, max=1.0,
        help="Below this position consistency the report says the verdicts are dominated by answer order.",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the request cache."),
) -> int:
    """Answer a test set with a candidate and a reference model, judge each pair in both orders, and
    report CodecLM's CRR (strict rule) and CoachLM's WR1/WR2/QS with W/T/L in OUT/eval.json and eval.md.

    Models come from shorthand flags or from --models (roles candidate, reference, judge); a flag wins.
    Shorthands: local:gemma-3-270m (packaged GGUF, llama.cpp); llamacpp:model.gguf; hf:DIR or
    hf:local:gemma-3-270m+ADAPTER_DIR (transformers + PEFT adapter, e.g. from `datatailor train`);
    openai:gpt-4o-mini or openai:MODEL@http://127.0.0.1:8000/v1; role:strong (a role of the --models file).
    --reference stored uses the test set's own reference answers (items without one are skipped).

    N is the whole test set: an item the candidate did not answer (error, empty answer) or that could not
    be judged counts as a loss; an answer cut off by max_tokens is judged as written and counted
    (truncated_answers). eval.json also gives the judged-only figures, labelled.
    --seed reaches every model's sampling seed (at temperature > 0 another seed gives other answers).

    Exit 0 when complete, 3 when the budget ran out (raise it and re-run), 2 on a user or server error.
    """
    from datatailor.evaluate.evaluation import EvalPlan, run_eval
    from datatailor.evaluate.modelspec import load_models_file, resolve_role
    from datatailor.evaluate.testsets import resolve_testset
    from datatailor.io import parse_field_options

    fields = parse_field_options(field)
    if rule not in ("strict", "lenient", "mean"):
        raise UserError(f"--rule {rule!r}: expected strict, lenient or mean")
    if scoring not in ("sampled", "logprob"):
        raise UserError(f"--scoring {scoring!r}: expected sampled or logprob")
    cwd = Path.cwd()
    roles = load_models_file(models) if models else {}
    cand = resolve_role("candidate", candidate, roles, cwd)
    jdg = resolve_role("judge", judge, roles, cwd)
    if judge_max_tokens is not None:
        jdg = jdg.model_copy(update={"max_tokens": judge_max_tokens})
    stored = reference is not None and reference.strip().lower() == "stored"
    ref = None if stored else resolve_role("reference", reference, roles, cwd)
    ts = resolve_testset(testset, fields=fields or None)
    plan = EvalPlan(testset=ts, candidate=cand, judge=jdg, reference=ref, rule=rule, limit=limit, seed=seed,  # type: ignore[arg-type]
                    answer_max_tokens=max_tokens, budget=_budget(budget_usd, budget_tokens), base_dir=cwd,
                    cache=not no_cache, consistency_threshold=consistency_threshold, scoring=scoring)
    if judge_template:
        plan.judge_template = judge_template
    if respond_template:
        plan.respond_template = respond_template
    if stored and ts.n_references < len(ts.records):
        typer.echo(f"note: {ts.n_references} of {len(ts.records)} items of {ts.name} have a stored reference; only those are evaluated", err=True)
    result, summary = run_eval(plan, out, force=force, show_progress=progress)
    if summary is None:
        return _exit_code(result.status, result.message, out)
    m = summary["metrics"]
    from datatailor.evaluate.evaluation import format_percent

    if summary["judged"] < summary["items"]:
        typer.secho(
            f"note: {summary['unanswered']} item(s) unanswered by the candidate and {summary['unjudgeable']} unjudgeable "
            f"{summary['failures']} count as losses (details: {out / 'run' / 'failures.jsonl'})",
            err=True, fg="yellow",
        )
    if summary["truncated_answers"]:
        typer.secho(
            f"note: {summary['truncated_answers']} of the candidate's answers were cut off by max_tokens and judged as "
            f"written (see eval.md; raise --max-tokens to let it finish)", err=True, fg="yellow",
        )
    if summary["consistency_warning"]:
        typer.secho(f"warning: {summary['consistency_warning']}", err=True, fg="red")
    typer.echo(
        f"{ts.name}: N={summary['items']} ({summary['judged']} judged) | {rule}: W/T/L {m['wins']}/{m['ties']}/{m['losses']} | "
        f"CRR {format_percent(m['crr'])} | WR1 {format_percent(m['wr1'])} | WR2 {format_percent(m['wr2'])} | QS {format_percent(m['qs'])} | "
        f"position consistency {format_percent(summary['position_consistency'])} | {out / 'eval.json'}"
    )
    return 0


def rate_command(
    data: Path = typer.Argument(..., help="A run directory or a dataset file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Rating folder (default: DATA/quality for a run directory)."),
    judge: Optional[str] = typer.Option(None, "--judge", help=f"Rating model: {MODEL_HELP}."),
    models: Optional[Path] = typer.Option(None, "--models", "-m", help="YAML with models by role; the `judge` role is used."),
    template: Optional[str] = typer.Option(None, "--template", help="Rating prompt (.j2); must ask for a 0-5 score."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Longest rating reply (the score comes first)."),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd"),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens"),
    force: bool = typer.Option(False, "--force"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    scoring: str = typer.Option("sampled", "--scoring", help="sampled: the score the rater wrote; logprob: the expected score over the 0-5 tokens."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the request cache."),
) -> int:
    """Rate every pair 0-5 (AlpaGasus style) and report the mean, the histogram over
    [0,3.5) [3.5,4) [4,4.5) [4.5,5] and the high-quality share (>= 4.5) in OUT/quality.json."""
    from datatailor.evaluate.evaluation import data_file, run_rate
    from datatailor.evaluate.modelspec import load_models_file, resolve_role
    from datatailor.scoring.quality import QUALITY_TEMPLATE

    path = data_file(data)
    if out is None:
        if not (data.is_dir() and (data / "manifest.json").exists()):
            raise UserError("--out is required when DATA is a file")
        out = data / "quality"
    cwd = Path.cwd()
    roles = load_models_file(models) if models else {}
    jdg = resolve_role("judge", judge, roles, cwd)
    result, summary = run_rate(path, jdg, out, force=force, show_progress=progress, template=template or QUALITY_TEMPLATE,
                               max_tokens=max_tokens, budget=_budget(budget_usd, budget_tokens), base_dir=cwd,
                               cache=not no_cache, scoring=scoring)
    if summary is None:
        return _exit_code(result.status, result.message, out)
    mean = "n/a" if summary["mean"] is None else f"{summary['mean']:.2f}"
    hq = summary["high_quality_share"]
    if summary["unrated"]:
        typer.secho(f"note: {summary['unrated']} pair(s) unrated: the judge's rating did not parse (kept in the data, "
                    "left out of these figures; the reasons are in their lineage)", err=True, fg="yellow")
    typer.echo(
        f"rated {summary['n']} pairs | mean {mean} | high quality (>= 4.5) "
        f"{'n/a' if hq is None else f'{100 * hq:.1f} %'} | histogram {summary['histogram']} | {out / 'quality.json'}"
    )
    return 0


def diversity_command(
    data: Path = typer.Argument(..., help="A run directory or a dataset file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the figures to this JSON file."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Mean pairwise embedding distance (all-MiniLM-L6-v2)."),
    sample: int = typer.Option(200, "--sample", min=2, help="Instructions sampled for the ROUGE-L self-similarity."),
) -> int:
    """Distinct-1/2, mean pairwise embedding distance, ROUGE-L self-similarity and lengths of a dataset."""
    from datatailor.evaluate.diversity import diversity_report, minilm_embedder
    from datatailor.evaluate.evaluation import data_file
    from datatailor.io import read_records, write_json

    records = read_records(data_file(data))
    report = diversity_report(records, minilm_embedder() if embeddings else None, rouge_sample=sample)
    payload = report.model_dump()
    if out is not None:
        write_json(out, payload)
    typer.echo(json.dumps(payload, indent=2))
    return 0
