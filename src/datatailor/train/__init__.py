"""Fine-tuning: supervised fine-tuning with TRL + PEFT (`sft`). Heavy imports happen inside the functions."""
