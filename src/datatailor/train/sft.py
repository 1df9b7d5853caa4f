"""Supervised fine-tuning of a base model on datatailor pairs, with TRL's SFTTrainer and PEFT LoRA.

The pairs are tokenised here (`sft_data`), so the loss mask is ours and testable: SFTTrainer gets
a pre-tokenised dataset with `input_ids` and `labels` (-100 on the prompt) and uses those labels
as they are. The base model is loaded through the `hf` backend's loader, so a `local:` GGUF model
is the same converted model at training and at inference time.

The output folder holds a PEFT adapter (default), or a full model (`merge: true`, or full
fine-tuning), plus `train_report.json` and `train_config.yaml`. It is written under a temporary
name and renamed when complete, so a crash never leaves a half-written model under `out`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, Field

from datatailor.errors import UserError
from datatailor.io import write_json
from datatailor.records import Record, stable_hash
from datatailor.train.sft_config import TrainConfig
from datatailor.train.sft_data import dataset_path, load_pairs, tokenize_pairs

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'datatailor[hf]' -c constraints.txt"
REPORT_FILE = "train_report.json"
CONFIG_FILE = "train_config.yaml"


class LossPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float | None = None
    elapsed_s: float


class TrainReport(BaseModel):
    """What a training run did and cost; written as train_report.json next to the model."""

    model_config = ConfigDict(extra="forbid")

    base: str
    base_dir: str = Field(description="The HF model folder the base was loaded from.")
    data: str
    data_sha: str = Field(description="Hash of the training pairs' ids, in order.")
    out: str
    output_kind: str = Field(description="adapter | merged | full")
    method: str
    device: str
    precision: str
    examples: int
    skipped_no_response: int
    dropped_prompt_too_long: int
    truncated: int
    max_length: int | None = Field(None, description="Tokens per example used (the longest pair when the config said auto).")
    tokens_per_epoch: int
    response_tokens_per_epoch: int
    epochs: float
    steps: int
    batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    trainable_params: int
    total_params: int
    loss_curve: list[LossPoint]
    first_loss: float | None
    final_loss: float | None
    mean_train_loss: float | None
    wall_time_s: float = Field(description="The whole run: loading, tokenising, training and saving.")
    train_time_s: float = Field(description="The optimisation loop alone.")
    load_time_s: float
    peak_rss_mb: float = Field(description="Peak resident memory of this process (includes loading the model).")
    peak_gpu_mb: float | None = None
    seed: int
    versions: dict[str, str]
    use_as: dict[str, Any] = Field(description="A recipe model entry that loads the result with the hf backend.")


@dataclass
class _Libs:
    torch: Any
    transformers: Any
    trl: Any
    peft: Any
    datasets: Any


def _imports() -> _Libs:
    try:
        import datasets
        import peft
        import torch
        import transformers
        import trl
    except ImportError as exc:
        raise UserError(f"training needs torch, transformers, trl, peft and datasets ({exc.name} is missing): {INSTALL_HINT}") from None
    return _Libs(torch, transformers, trl, peft, datasets)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _pick_precision(libs: _Libs, config: TrainConfig, device: str) -> str:
    if config.precision != "auto":
        if config.precision in ("bf16", "fp16") and device == "cpu":
            raise UserError(f"precision {config.precision} needs a GPU; on the CPU use fp32 (or auto)")
        return config.precision
    if device.startswith("cuda") and libs.torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _scheduler(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    """transformers' scheduler name and kwargs for a decay from learning_rate to min_learning_rate."""
    if config.lr_scheduler == "constant":
        return "constant_with_warmup", {}
    if config.lr_scheduler == "cosine":
        if config.min_learning_rate > 0:
            return "cosine_with_min_lr", {"min_lr": config.min_learning_rate}
        return "cosine", {}
    # A degree-1 polynomial is a straight line from the peak to lr_end.
    return "polynomial", {"lr_end": config.min_learning_rate, "power": 1.0}


def _checkpointing_arg(libs: _Libs, enabled: bool) -> dict[str, bool]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(libs.trl.SFTConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


@contextlib.contextmanager
def _quiet_library_deprecations() -> Iterator[None]:
    """Hide one notice raised inside TRL/PEFT by transformers 5's renaming; a user cannot act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty; choose another --out or pass --force to replace it")


def _planned_steps(examples: int, config: TrainConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(math.ceil(examples / config.effective_micro_batch) / config.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * config.epochs))


def _make_progress_callback(libs: _Libs, curve: list[LossPoint], total_steps: int, stream: TextIO | None) -> Any:
    class ProgressLog(libs.transformers.TrainerCallback):  # type: ignore[name-defined, misc]
        """Keeps the loss curve and prints one line per logged step."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not logs or "loss" not in logs:
                return
            point = LossPoint(
                step=state.global_step,
                epoch=round(float(state.epoch or 0.0), 4),
                loss=float(logs["loss"]),
                learning_rate=float(logs.get("learning_rate", 0.0)),
                grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                elapsed_s=round(time.perf_counter() - self.t0, 2),
            )
            curve.append(point)
            if stream is not None:
                print(
                    f"[train] step {point.step}/{total_steps} epoch {point.epoch:.2f} "
                    f"loss {point.loss:.4f} lr {point.learning_rate:.2e} {point.elapsed_s:.1f}s",
                    file=stream,
                    flush=True,
                )

    return ProgressLog()


def _count_params(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def train_sft(
    data: str | Path,
    base: str,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    force: bool = False,
    limit: int | None = None,
    progress: TextIO | None = sys.stderr,
) -> TrainReport:
    """Fine-tune `base` on the pairs in `data` (a run folder or a dataset file) and save to `out`.

    `progress` receives one line per logged step (None for silence). torch's thread count is set
    to `config.threads` for the run and restored afterwards.
    """
    t_start = time.perf_counter()
    config = config or TrainConfig()
    out = Path(out)
    _prepare_out(out, force)
    pairs, skipped = load_pairs(data, limit=limit)
    libs = _imports()
    previous_threads = libs.torch.get_num_threads()
    if config.threads is not None:
        libs.torch.set_num_threads(config.threads)
    try:
        return _train(libs, pairs, skipped, data, base, out, config, progress, t_start)
    finally:
        libs.torch.set_num_threads(previous_threads)


def _train(
    libs: _Libs,
    pairs: list[Record],
    skipped: int,
    data: str | Path,
    base: str,
    out: Path,
    config: TrainConfig,
    progress: TextIO | None,
    t_start: float,
) -> TrainReport:
    torch, transformers = libs.torch, libs.transformers

    from datatailor.llm.hf import model_source, pick_device

    transformers.set_seed(config.seed)

    t_load = time.perf_counter()
    source, _ = model_source(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenized = tokenize_pairs(tokenizer, pairs, config.prompt_template, config.max_length)
    if not tokenized.examples:
        raise UserError(
            f"{data}: every prompt is at least max_length ({tokenized.max_length}) tokens long; raise max_length"
        )
    device = pick_device(config.device)
    precision = _pick_precision(libs, config, device)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    load_time = time.perf_counter() - t_load

    if config.method == "lora":
        transformers.set_seed(config.seed)  # the LoRA A matrices are drawn here
        lora = libs.peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            bias="none",
        )
        try:
            with _quiet_library_deprecations():
                model = libs.peft.get_peft_model(model, lora)
        except ValueError as exc:  # target modules that the model does not have
            raise UserError(f"lora_target_modules {config.lora_target_modules!r}: {exc}") from None
    trainable, total = _count_params(model)

    total_steps = _planned_steps(len(tokenized.examples), config)
    curve: list[LossPoint] = []
    scheduler, scheduler_kwargs = _scheduler(config)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary output folder
    try:
        args = libs.trl.SFTConfig(
            output_dir=str(staging / "trainer"),
            per_device_train_batch_size=config.effective_micro_batch,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            learning_rate=config.learning_rate,
            lr_scheduler_type=scheduler,
            lr_scheduler_kwargs=scheduler_kwargs,
            warmup_steps=config.warmup_steps,
            adam_beta1=config.adam_beta1,
            adam_beta2=config.adam_beta2,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            optim="adamw_torch",
            max_length=tokenized.max_length,
            packing=False,
            **_checkpointing_arg(libs, config.gradient_checkpointing),
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=device == "cpu",
            seed=config.seed,
            data_seed=config.seed,
            logging_steps=config.log_every,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        dataset = libs.datasets.Dataset.from_dict(
            {
                "input_ids": [e.input_ids for e in tokenized.examples],
                "labels": [e.labels for e in tokenized.examples],
            }
        )
        # The dataset is already prepared; TRL's per-pass progress bars would only clutter our step log.
        bars_were_on = not libs.datasets.are_progress_bars_disabled()
        libs.datasets.disable_progress_bars()
        try:
            with _quiet_library_deprecations():
                trainer = libs.trl.SFTTrainer(
                    model=model,
                    args=args,
                    train_dataset=dataset,
                    processing_class=tokenizer,
                    callbacks=[_make_progress_callback(libs, curve, total_steps, progress)],
                )
        finally:
            if bars_were_on:
                libs.datasets.enable_progress_bars()
        # With tqdm off, transformers prints every log dict; our callback already prints one line per step.
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        if progress is not None:
            print(
                f"[train] {len(tokenized.examples)} pairs, {tokenized.tokens} tokens/epoch "
                f"({tokenized.response_tokens} in responses), {total_steps} steps on {device} ({precision}), "
                f"{config.method} with {trainable:,} of {total:,} parameters trainable; max_length {tokenized.max_length}"
                f"{' (auto: the longest pair)' if config.max_length == 'auto' else ''}: {tokenized.truncated} cut, "
                f"{len(tokenized.dropped_prompt_too_long)} dropped (prompt alone too long)",
                file=progress,
                flush=True,
            )
        t_train = time.perf_counter()
        with _quiet_library_deprecations():
            result = trainer.train()
        train_time = time.perf_counter() - t_train
        steps = int(trainer.state.global_step)
        epochs_done = float(trainer.state.epoch or 0.0)

        shutil.rmtree(staging / "trainer", ignore_errors=True)
        trained = trainer.model
        if config.method == "lora" and config.merge:
            trained = trained.merge_and_unload()
            kind = "merged"
        else:
            kind = "adapter" if config.method == "lora" else "full"
        trained.save_pretrained(str(staging))
        if kind != "adapter":
            # The backend loads the tokenizer from the model folder, so a full model carries its own.
            tokenizer.save_pretrained(str(staging))

        final_out = out.resolve()
        use_as: dict[str, Any] = {"backend": "hf", "model": base, "adapter": str(final_out)}
        if kind != "adapter":
            use_as = {"backend": "hf", "model": str(final_out)}
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
        report = TrainReport(
            base=base,
            base_dir=str(source),
            data=str(dataset_path(data)),
            data_sha=stable_hash([r.id for r in pairs]),
            out=str(final_out),
            output_kind=kind,
            method=config.method,
            device=device,
            precision=precision,
            examples=len(tokenized.examples),
            skipped_no_response=skipped,
            dropped_prompt_too_long=len(tokenized.dropped_prompt_too_long),
            truncated=tokenized.truncated,
            max_length=tokenized.max_length,
            tokens_per_epoch=tokenized.tokens,
            response_tokens_per_epoch=tokenized.response_tokens,
            epochs=round(epochs_done, 4),
            steps=steps,
            batch_size=config.batch_size,
            micro_batch_size=config.effective_micro_batch,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            trainable_params=trainable,
            total_params=total,
            loss_curve=curve,
            first_loss=curve[0].loss if curve else None,
            final_loss=curve[-1].loss if curve else None,
            mean_train_loss=float(result.training_loss) if result.training_loss is not None else None,
            wall_time_s=0.0,
            train_time_s=round(train_time, 2),
            load_time_s=round(load_time, 2),
            peak_rss_mb=0.0,
            peak_gpu_mb=round(peak_gpu, 1) if peak_gpu is not None else None,
            seed=config.seed,
            versions=_versions(),
            use_as=use_as,
        )
        (staging / CONFIG_FILE).write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
        report.wall_time_s = round(time.perf_counter() - t_start, 2)
        report.peak_rss_mb = round(peak_rss_mb(), 1)
        write_json(staging / REPORT_FILE, report.model_dump(mode="json"))
        if out.exists():
            shutil.rmtree(out)  # _prepare_out allowed it: empty, or --force
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        print(
            f"[train] done: loss {_fmt(report.first_loss)} → {_fmt(report.final_loss)} in {report.steps} steps, "
            f"{report.wall_time_s:.1f}s, peak RSS {report.peak_rss_mb:.0f} MB; {kind} in {out}",
            file=progress,
            flush=True,
        )
    return report


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def read_train_config(model_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig saved next to a trained adapter or model, if there is one."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return TrainConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def read_train_report(model_dir: str | Path) -> TrainReport | None:
    path = Path(model_dir) / REPORT_FILE
    if not path.is_file():
        return None
    return TrainReport.model_validate(json.loads(path.read_text(encoding="utf-8")))
