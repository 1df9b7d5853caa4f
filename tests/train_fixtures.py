"""Models and data for the training and privacy tests.

* `tiny_model_dir`: a 2-layer Llama with random weights and a byte-level BPE tokenizer trained on
  the spot: built offline in about a second, trains in seconds, so the whole train → adapter →
  hf backend path is tested without the packaged model.
* `gemma_adapter`: a LoRA adapter of `local:gemma-3-270m` trained once per test session (a few
  CPU steps) and shared by the integration tests of both files.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

FACTS = [
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Name the capital of France.", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is two plus three?", "Two plus three is five."),
    ("Which planet is called the red planet?", "Mars is called the red planet."),
    ("What do bees make?", "Bees make honey."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Translate 'hello' into Spanish.", "'Hello' in Spanish is 'hola'."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("How many days are in a week?", "A week has seven days."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
]


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": q, "input": "", "output": a} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_tokenizer(chat_template: str | None = None):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    corpus = [q + " " + a for q, a in FACTS] + ["### Instruction: ### Response: You are a careful, helpful assistant."]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    # Like gemma's tokenizer, add BOS (only) when special tokens are requested.
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# A minimal chat template in the style of the common ones: turns delimited by markers, and an
# end-of-turn marker the model must learn to write after its answer.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    """An HF model folder with a random 2-layer Llama: the hf backend and train_sft load it like any other."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="dt-tiny-lm-"))
    atexit.register(shutil.rmtree, folder, True)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=1)
def gemma_adapter() -> tuple[Path, Path, Path]:
    """(adapter folder, members file, non-members file): LoRA on 4 pairs, 3 epochs, short sequences."""
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import TrainConfig

    folder = Path(tempfile.mkdtemp(prefix="dt-gemma-adapter-"))
    atexit.register(shutil.rmtree, folder, True)
    members = write_pairs(folder / "members.jsonl", FACTS[:4])
    nonmembers = write_pairs(folder / "nonmembers.jsonl", FACTS[4:8])
    config = TrainConfig(
        epochs=3, learning_rate=1e-3, batch_size=2, micro_batch_size=2, max_length=64, lora_r=8, lora_alpha=16, threads=1
    )
    train_sft(members, "local:gemma-3-270m", folder / "adapter", config, progress=None)
    return folder / "adapter", members, nonmembers
