"""Settings of a supervised fine-tuning run, with the papers' settings as named presets.

Precedence, lowest first: the field defaults (sized for a CPU and a few dozen pairs), then the
`preset`, then what the YAML file says, then command-line flags. A preset only fills fields the
user did not set, so `preset: codeclm` with `epochs: 2` trains CodecLM-style for two epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datatailor.errors import UserError
from datatailor.io import read_yaml

PresetName = Literal["codeclm", "teams_rl", "coachlm_coach"]

# The papers' SFT settings (CodecLM arXiv 2404.05875, TeaMs-RL arXiv 2403.08694 and CoachLM arXiv 2311.13246, as their papers and code give them). The papers trained
# 6–7B models on several GPUs; `batch_size` here is their global batch, `micro_batch_size` is a
# memory knob that does not change the optimisation.
PRESETS: dict[str, dict[str, Any]] = {
    # CodecLM (LLaMA targets): full fine-tuning, AdamW (0.9, 0.95), 15 epochs, LR 1e-5 decayed
    # linearly to 1e-6, global batch 64, max length 2048.
    "codeclm": {
        "method": "full",
        "epochs": 15,
        "learning_rate": 1e-5,
        "min_learning_rate": 1e-6,
        "lr_scheduler": "linear",
        "warmup_steps": 0,
        "batch_size": 64,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "max_length": 2048,
    },
    # TeaMs-RL (Llama-X scripts): full fine-tuning, 3 epochs, LR 2e-5 cosine, 2 warmup steps, max
    # length 512, 64 per device × 4 GPUs, AdamW (0.9, 0.999), weight decay 0.
    "teams_rl": {
        "method": "full",
        "epochs": 3,
        "learning_rate": 2e-5,
        "min_learning_rate": 0.0,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "batch_size": 256,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.0,
        "max_length": 512,
    },
    # CoachLM's coach (ChatGLM2-6B + LoRA): r 64, α 32 on the attention and MLP projections,
    # LR 2e-4 cosine, 7 epochs, batch 32. Dropout and the sequence length are not given: the length is
    # the longest training pair's ("auto"), since a coach's target is a whole revised pair — 512 tokens cut
    # 178 of the 661 targets of `coach prepare` (27 %) with the Qwen2.5 tokenizer, and dropped 2 whose prompt
    # alone filled it (the longest pair is 1,168 tokens).
    "coachlm_coach": {
        "method": "lora",
        "lora_r": 64,
        "lora_alpha": 32,
        "lora_target_modules": "all-linear",
        "epochs": 7,
        "learning_rate": 2e-4,
        "min_learning_rate": 0.0,
        "lr_scheduler": "cosine",
        "batch_size": 32,
        "max_length": "auto",
    },
}


class TrainConfig(BaseModel):
    """How to fine-tune a base model on instruction–response pairs."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName | None = Field(
        None,
        description="Start from a paper's settings (codeclm, teams_rl, coachlm_coach); fields set explicitly win.",
    )
    method: Literal["lora", "full"] = Field(
        "lora", description="`lora`: train a PEFT LoRA adapter; `full`: update every weight of the model."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="`all-linear` (every linear layer but the output head) or explicit module names such as [q_proj, v_proj].",
    )
    merge: bool = Field(
        False,
        description="Merge the LoRA weights into the base and save a full model instead of an adapter.",
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training pairs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (after warmup).")
    min_learning_rate: float = Field(
        0.0, ge=0, description="Learning rate reached at the end of the linear or cosine decay."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Shape of the decay from learning_rate to min_learning_rate after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to learning_rate.")
    batch_size: int = Field(4, ge=1, description="Examples per optimizer step (the papers' global batch).")
    micro_batch_size: int = Field(
        2, ge=1, description="Examples per forward pass; gradients are accumulated up to batch_size. Lower it to save memory."
    )
    max_length: int | Literal["auto"] = Field(
        512,
        description=(
            "Tokens per example (prompt + response); longer responses are cut at the end, and the report says how many. "
            "`auto`: the longest pair of the data (within the model's limit), so that nothing is cut."
        ),
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: fp32 on CPU, bf16 on a GPU that supports it, else fp32."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="`auto` picks cuda, then mps, then cpu. Select a GPU with CUDA_VISIBLE_DEVICES."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch; None keeps torch's default (all cores). On a CPU busy with other "
        "work, 1 can be many times faster: idle threads spin-wait for the busy ones.",
    )
    prompt_template: str = Field(
        "respond.j2",
        description="Template that turns a pair into chat messages. Use the one your eval sends to the model.",
    )
    seed: int = Field(0, description="Seeds the model init (LoRA weights), data order and dropout.")
    log_every: int = Field(1, ge=1, description="Log the loss every this many optimizer steps.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = PRESETS.get(data["preset"])
            if preset is not None:  # an unknown name is reported by the field validation
                return {**preset, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size and self.batch_size > self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.min_learning_rate > self.learning_rate:
            raise ValueError("min_learning_rate must not exceed learning_rate")
        if isinstance(self.max_length, int) and self.max_length < 16:
            raise ValueError(f"max_length must be at least 16 (or auto), got {self.max_length}")
        if self.merge and self.method == "full":
            raise ValueError("merge applies to LoRA only (full fine-tuning always saves a full model)")
        return self

    @property
    def effective_micro_batch(self) -> int:
        """A batch smaller than the micro batch is one forward pass of that size."""
        return min(self.micro_batch_size, self.batch_size)

    @property
    def gradient_accumulation_steps(self) -> int:
        return max(1, self.batch_size // self.effective_micro_batch)


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + overrides (flags given on the command line, None meaning not given)."""
    data: dict[str, Any] = {}
    where = "train settings"
    if path is not None:
        p = Path(path)
        where = str(p)
        loaded = read_yaml(p, "train config")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: expected a mapping of train settings, got {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"{where}: {problems}") from None
