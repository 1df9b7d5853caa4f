"""`datatailor train`: supervised fine-tuning of a base model on a run's pairs or a dataset file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    data: Path = typer.Option(..., "--data", "-d", help="A run folder (its data.jsonl) or any dataset file datatailor reads."),
    base: str = typer.Option(..., "--base", "-b", help="Base model: an HF model folder, a .gguf file, or local:gemma-3-270m."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the adapter (or model), train_report.json and train_config.yaml."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Train settings YAML (fields of TrainConfig); flags override it."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A paper's settings: codeclm | teams_rl | coachlm_coach."),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="Train a LoRA adapter (default) or every weight."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="Merge LoRA into the base and save a full model."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per optimizer step."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Examples per forward pass (memory)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example (prompt + response)."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha."),
    template: Optional[str] = typer.Option(None, "--template", help="Prompt template a pair is rendered with (default respond.j2)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on the first N pairs only."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Log every step on stderr."),
) -> int:
    """Fine-tune BASE on the pairs in DATA (loss on the responses only) and save an adapter or model to OUT.

    Use the result in a recipe as `backend: hf` with `model: BASE` and `adapter: OUT` (or
    `model: OUT` after --merge / --full).
    """
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import load_train_config

    overrides = {
        "preset": preset,
        "method": None if lora is None else ("lora" if lora else "full"),
        "merge": merge,
        "epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": lr,
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "max_length": max_length,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "prompt_template": template,
        "device": device,
        "threads": threads,
        "seed": seed,
    }
    settings = load_train_config(config, overrides)
    report = train_sft(data, base, out, settings, force=force, limit=limit, progress=sys.stderr if progress else None)
    losses = f"loss {report.first_loss:.4f} → {report.final_loss:.4f}" if report.loss_curve else "no loss logged"
    typer.echo(
        f"trained {report.output_kind} on {report.examples} pairs: {losses} "
        f"in {report.steps} steps ({report.wall_time_s:.0f} s, peak RSS {report.peak_rss_mb:.0f} MB) → {out}"
    )
    model_line = f"model: {report.use_as['model']}" + (f", adapter: {report.use_as['adapter']}" if "adapter" in report.use_as else "")
    typer.echo(f"use it in a recipe as: backend: hf, {model_line}")
    return 0
