"""Supervised fine-tuning: settings, the response-only loss mask, and real training runs.

The masking and pipeline tests use a tiny random Llama and a BPE tokenizer built offline
(tests/train_fixtures.py); the integration tests train `local:gemma-3-270m` with LoRA on the CPU.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from datatailor.errors import UserError
from datatailor.records import Record
from datatailor.train.sft_config import PRESETS, TrainConfig, load_train_config

from .train_fixtures import FACTS, TINY_CHAT_TEMPLATE, gemma_adapter, tiny_model_dir, tiny_tokenizer, write_pairs

# ----------------------------------------------------------------------------- settings


def test_preset_fills_only_unset_fields():
    config = TrainConfig(preset="codeclm", epochs=2)
    assert config.epochs == 2  # explicit wins
    assert config.learning_rate == 1e-5 and config.min_learning_rate == 1e-6
    assert config.lr_scheduler == "linear" and (config.adam_beta1, config.adam_beta2) == (0.9, 0.95)
    assert config.batch_size == 64 and config.max_length == 2048 and config.method == "full"


def test_every_preset_validates():
    for name in PRESETS:
        TrainConfig(preset=name)
    coach = TrainConfig(preset="coachlm_coach")
    assert (coach.lora_r, coach.lora_alpha, coach.learning_rate, coach.epochs) == (64, 32, 2e-4, 7)
    teams = TrainConfig(preset="teams_rl")
    assert (teams.epochs, teams.learning_rate, teams.warmup_steps, teams.max_length) == (3, 2e-5, 2, 512)


def test_yaml_then_flags_precedence(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("preset: teams_rl\nepochs: 5\nlearning_rate: 0.001\n", encoding="utf-8")
    config = load_train_config(path, {"learning_rate": 0.01, "epochs": None})
    assert config.epochs == 5  # YAML over preset; a flag left at None does not override
    assert config.learning_rate == 0.01  # flag over YAML
    assert config.lr_scheduler == "cosine"  # from the preset


def test_bad_settings_are_user_errors(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 2\nlerning_rate: 0.1\n", encoding="utf-8")
    with pytest.raises(UserError, match="lerning_rate"):
        load_train_config(path)
    with pytest.raises(UserError, match="multiple of micro_batch_size"):
        load_train_config(None, {"batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(UserError, match="preset"):
        load_train_config(None, {"preset": "alpaca"})
    with pytest.raises(UserError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")


def test_scheduler_mapping():
    from datatailor.train.sft import _scheduler

    assert _scheduler(TrainConfig(preset="codeclm")) == ("polynomial", {"lr_end": 1e-6, "power": 1.0})
    assert _scheduler(TrainConfig(lr_scheduler="cosine")) == ("cosine", {})
    assert _scheduler(TrainConfig(lr_scheduler="cosine", min_learning_rate=1e-6)) == ("cosine_with_min_lr", {"min_lr": 1e-6})


# ----------------------------------------------------------------------------- data


def test_load_pairs_errors(tmp_path: Path):
    from datatailor.train.sft_data import load_pairs

    with pytest.raises(UserError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_pairs(empty)
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"instruction": "Why?"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="none of the 1 rows has a response"):
        load_pairs(questions)


def test_load_pairs_reads_a_run_folder_and_skips_unanswered(tmp_path: Path):
    from datatailor.train.sft_data import load_pairs

    run = tmp_path / "run"
    run.mkdir()
    rows = [Record.new("Q1", response="A1"), Record.new("Q2"), Record.new("Q3", response="  ")]
    (run / "data.jsonl").write_text("".join(r.to_json() + "\n" for r in rows), encoding="utf-8")
    pairs, skipped = load_pairs(run)
    assert [p.instruction for p in pairs] == ["Q1"] and skipped == 2


# ----------------------------------------------------------------------------- the loss mask


def _check_mask(tokenizer, record: Record, expected_completion: str, max_length: int = 512):
    from datatailor.prompts import load_prompt
    from datatailor.train.sft_data import IGNORE_INDEX, pair_messages, render_prompt, tokenize_pair

    prompt = load_prompt("respond.j2")
    pair = tokenize_pair(tokenizer, record, prompt, max_length)
    assert pair is not None
    n = pair.prompt_tokens
    assert n > 0 and pair.response_tokens > 0
    assert pair.labels[:n] == [IGNORE_INDEX] * n, "prompt tokens must not carry a loss"
    assert pair.labels[n:] == pair.input_ids[n:], "response tokens are their own labels"
    assert IGNORE_INDEX not in pair.labels[n:]
    prompt_text, special = render_prompt(tokenizer, pair_messages(record, prompt))
    assert pair.input_ids[:n] == tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    assert tokenizer.decode(pair.labels[n:]) == expected_completion
    return pair


def test_mask_without_chat_template_uses_instruction_layout_and_eos():
    tokenizer = tiny_tokenizer()
    record = Record.new("What do bees make?", response="Bees make honey.")
    pair = _check_mask(tokenizer, record, "Bees make honey.</s>")
    prompt_text = tokenizer.decode(pair.input_ids[: pair.prompt_tokens])
    assert prompt_text.startswith("<s>") and "### Instruction:" in prompt_text
    assert prompt_text.rstrip().endswith("### Response:")


def test_mask_with_chat_template_learns_the_end_of_turn_marker():
    tokenizer = tiny_tokenizer(TINY_CHAT_TEMPLATE)
    record = Record.new("Name the capital of France.", input="Answer in one sentence.", response="Paris.")
    pair = _check_mask(tokenizer, record, "Paris.<|end|>\n")
    prompt_text = tokenizer.decode(pair.input_ids[: pair.prompt_tokens])
    assert "Answer in one sentence." in prompt_text and prompt_text.endswith("<|assistant|>\n")


def test_truncation_cuts_the_response_and_drops_prompt_only_examples():
    from datatailor.prompts import load_prompt
    from datatailor.train.sft_data import IGNORE_INDEX, tokenize_pair, tokenize_pairs

    tokenizer = tiny_tokenizer()
    prompt = load_prompt("respond.j2")
    record = Record.new("What do bees make?", response="Bees make honey. " * 20)
    full = tokenize_pair(tokenizer, record, prompt, 4096)
    cut = tokenize_pair(tokenizer, record, prompt, full.prompt_tokens + 5)
    assert cut.truncated and cut.response_tokens == 5 and len(cut.input_ids) == full.prompt_tokens + 5
    assert cut.labels[: cut.prompt_tokens] == [IGNORE_INDEX] * cut.prompt_tokens
    short = tokenize_pairs(tokenizer, [record], "respond.j2", full.prompt_tokens)
    assert short.examples == [] and short.dropped_prompt_too_long == [record.id]


def test_auto_max_length_takes_the_longest_pair_within_the_model_limit():
    from datatailor.train.sft_data import tokenize_pairs

    tokenizer = tiny_tokenizer()
    records = [Record.new(q, response=(a + " ") * (1 + 3 * i)) for i, (q, a) in enumerate(FACTS[:5])]
    auto = tokenize_pairs(tokenizer, records, "respond.j2", "auto")
    lengths = sorted(len(e.input_ids) for e in auto.examples)
    assert auto.max_length == auto.longest == lengths[-1] and auto.truncated == 0 and not auto.dropped_prompt_too_long
    assert len(auto.examples) == 5 and len(set(lengths)) == 5
    # a fixed length cuts every longer pair, and says how many
    fixed = tokenize_pairs(tokenizer, records, "respond.j2", lengths[2])
    assert fixed.max_length == lengths[2] and fixed.truncated == 2 and fixed.longest == lengths[-1]
    # auto stays within what the tokenizer says its model takes
    tokenizer.model_max_length = lengths[1]
    capped = tokenize_pairs(tokenizer, records, "respond.j2", "auto")
    assert capped.max_length == lengths[1] and capped.truncated == 3


def test_the_coach_preset_sizes_its_length_from_the_data(tmp_path: Path):
    assert TrainConfig(preset="coachlm_coach").max_length == "auto"
    assert TrainConfig(preset="coachlm_coach", max_length=1024).max_length == 1024  # explicit wins
    path = tmp_path / "train.yaml"
    path.write_text("max_length: auto\n", encoding="utf-8")
    assert load_train_config(path).max_length == "auto"
    with pytest.raises(UserError, match="max_length"):
        load_train_config(None, {"max_length": 8})
    with pytest.raises(UserError, match="max_length"):
        load_train_config(None, {"max_length": "longest"})


# ----------------------------------------------------------------------------- training, tiny model


def _tiny_config(**changes) -> TrainConfig:
    base = dict(epochs=4, learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_length=128, threads=1)
    base.update(changes)
    return TrainConfig(**base)


def test_trainer_keeps_our_labels(tmp_path: Path):
    """SFTTrainer must train on the labels we built, not rebuild them over the whole sequence."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from datatailor.train.sft_data import tokenize_pairs

    tokenizer = tiny_tokenizer()
    records = [Record.new(q, response=a) for q, a in FACTS[:3]]
    tokenized = tokenize_pairs(tokenizer, records, "respond.j2", 128)
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in tokenized.examples], "labels": [e.labels for e in tokenized.examples]})
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()))
    from datatailor.train.sft import _checkpointing_arg, _imports

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=128, max_steps=1,
                     **_checkpointing_arg(_imports(), False))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    prepared = {tuple(row["input_ids"]): row["labels"] for row in trainer.train_dataset}
    for example in tokenized.examples:
        assert prepared[tuple(example.input_ids)] == example.labels
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"] == -100).sum() >= sum(e.prompt_tokens for e in tokenized.examples[:2])


def test_tiny_lora_run_writes_a_loadable_adapter_and_is_deterministic(tmp_path: Path):
    pytest.importorskip("trl")
    from datatailor.llm.base import CompletionRequest, Sampling
    from datatailor.llm.config import HFModel
    from datatailor.llm.hf import HFBackend
    from datatailor.prompts import load_prompt
    from datatailor.train.sft import read_train_config, read_train_report, train_sft

    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:4])
    base = str(tiny_model_dir())
    first = train_sft(data, base, tmp_path / "a", _tiny_config(), progress=None)
    second = train_sft(data, base, tmp_path / "b", _tiny_config(), progress=None)
    assert [p.loss for p in first.loss_curve] == [p.loss for p in second.loss_curve]
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()

    assert first.output_kind == "adapter" and first.examples == 4 and first.steps == 4
    assert first.trainable_params < first.total_params / 2
    assert first.use_as == {"backend": "hf", "model": base, "adapter": str((tmp_path / "a").resolve())}
    assert read_train_report(tmp_path / "a") == first
    assert read_train_config(tmp_path / "a") == _tiny_config()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"

    async def generate() -> str:
        backend = HFBackend(HFModel(**first.use_as, device="cpu"))
        messages = load_prompt("respond.j2").render(instruction=FACTS[0][0], input="")
        reply = await backend.complete(CompletionRequest(messages=messages, sampling=Sampling(temperature=0, max_tokens=4)))
        await backend.aclose()
        return reply.text

    assert isinstance(asyncio.run(generate()), str)


def test_a_run_with_auto_length_reports_the_length_and_what_was_cut(tmp_path: Path):
    pytest.importorskip("trl")
    import io

    from datatailor.train.sft import train_sft

    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:4])
    log = io.StringIO()
    report = train_sft(data, str(tiny_model_dir()), tmp_path / "a", _tiny_config(max_length="auto", max_steps=1), progress=log)
    assert report.truncated == 0 and report.dropped_prompt_too_long == 0
    from transformers import AutoTokenizer

    from datatailor.train.sft_data import load_pairs, tokenize_pairs

    longest = tokenize_pairs(AutoTokenizer.from_pretrained(str(tiny_model_dir())), load_pairs(data)[0], "respond.j2", "auto").longest
    assert report.max_length == longest and report.tokens_per_epoch <= 4 * longest
    assert f"max_length {report.max_length} (auto: the longest pair): 0 cut, 0 dropped" in log.getvalue()


def test_full_fine_tuning_lowers_the_loss_and_saves_a_model(tmp_path: Path):
    pytest.importorskip("trl")
    from datatailor.train.sft import train_sft

    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:4])
    report = train_sft(data, str(tiny_model_dir()), tmp_path / "full", _tiny_config(method="full", learning_rate=3e-3, epochs=6), progress=None)
    assert report.output_kind == "full" and report.use_as == {"backend": "hf", "model": str((tmp_path / "full").resolve())}
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "full" / "tokenizer.json").is_file()
    losses = [p.loss for p in report.loss_curve]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5


def test_out_folder_is_not_overwritten_without_force(tmp_path: Path):
    from datatailor.train.sft import train_sft

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:2])
    with pytest.raises(UserError, match="--force"):
        train_sft(data, "local:gemma-3-270m", out, _tiny_config(), progress=None)
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_cli_reports_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from datatailor.cli import main

    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--base", "local:gemma-3-270m", "--out", str(tmp_path / "o")]) == 2
    assert "training data not found" in capsys.readouterr().err
    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:2])
    assert main(["train", "--data", str(data), "--base", "local:no-such-model", "--out", str(tmp_path / "o")]) == 2
    assert "unknown local model" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not an HF model directory" in capsys.readouterr().err


def test_cli_trains_with_yaml_and_flags(tmp_path: Path):
    pytest.importorskip("trl")
    from datatailor.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:2])
    settings = tmp_path / "train.yaml"
    settings.write_text("epochs: 1\nbatch_size: 2\nmicro_batch_size: 2\nlearning_rate: 0.01\nthreads: 1\n", encoding="utf-8")
    out = tmp_path / "cli"
    code = main(["train", "--data", str(data), "--base", str(tiny_model_dir()), "--out", str(out), "--config", str(settings),
                 "--max-steps", "2", "--max-length", "96", "--no-progress"])
    assert code == 0
    report = json.loads((out / "train_report.json").read_text(encoding="utf-8"))
    assert report["steps"] == 2 and len(report["loss_curve"]) == 2
    assert read_config(out)["max_length"] == 96 and read_config(out)["learning_rate"] == 0.01


def read_config(out: Path) -> dict:
    import yaml

    return yaml.safe_load((out / "train_config.yaml").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- integration: gemma


@pytest.mark.integration
def test_gemma_prompt_and_mask_match_the_hf_backend():
    """Training renders exactly the prompt the hf backend sends at inference."""
    from datatailor.llm.config import HFModel
    from datatailor.llm.hf import HFBackend
    from datatailor.prompts import load_prompt
    from datatailor.train.sft_data import render_prompt

    backend = HFBackend(HFModel(model="local:gemma-3-270m", device="cpu"))
    with backend._lock:
        _, tokenizer = backend._load()
        messages = load_prompt("respond.j2").render(instruction="Name a colour.", input="")
        assert render_prompt(tokenizer, messages) == backend.prompt_text(messages)
    _check_mask(tokenizer, Record.new("Name a colour.", response="Blue."), "Blue." + tokenizer.eos_token)
    asyncio.run(backend.aclose())


@pytest.mark.integration
def test_gemma_lora_lowers_training_loss_and_the_backend_generates():
    from datatailor.llm.base import CompletionRequest, Sampling
    from datatailor.llm.config import HFModel
    from datatailor.llm.hf import HFBackend
    from datatailor.prompts import load_prompt
    from datatailor.train.sft import read_train_report

    adapter, _, _ = gemma_adapter()
    report = read_train_report(adapter)
    losses = [p.loss for p in report.loss_curve]
    assert report.steps == 6 and len(losses) == 6  # 4 pairs, batch 2, 3 epochs
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"loss did not go down: {losses}"

    async def answer() -> str:
        backend = HFBackend(HFModel(model="local:gemma-3-270m", adapter=str(adapter), device="cpu"))
        messages = load_prompt("respond.j2").render(instruction=FACTS[2][0], input="")
        reply = await backend.complete(CompletionRequest(messages=messages, sampling=Sampling(temperature=0, max_tokens=12)))
        await backend.aclose()
        return reply.text

    text = asyncio.run(answer())
    assert "eight" in text.lower(), text


def test_cli_merge_saves_a_full_model_the_backend_loads(tmp_path: Path):
    pytest.importorskip("trl")
    from datatailor.cli import main
    from datatailor.llm.base import CompletionRequest, Message, Sampling
    from datatailor.llm.config import HFModel
    from datatailor.llm.hf import HFBackend
    from datatailor.train.sft import read_train_report

    data = write_pairs(tmp_path / "pairs.jsonl", FACTS[:2])
    out = tmp_path / "merged"
    assert main(["train", "--data", str(data), "--base", str(tiny_model_dir()), "--out", str(out), "--lora", "--merge",
                 "--max-steps", "1", "--batch-size", "2", "--threads", "1", "--no-progress"]) == 0
    report = read_train_report(out)
    assert report.output_kind == "merged" and report.use_as == {"backend": "hf", "model": str(out.resolve())}
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()

    async def generate() -> str:
        backend = HFBackend(HFModel(**report.use_as, device="cpu"))
        request = CompletionRequest(messages=[Message(role="user", content="Hi")], sampling=Sampling(temperature=0, max_tokens=3))
        reply = await backend.complete(request)
        await backend.aclose()
        return reply.text

    assert isinstance(asyncio.run(generate()), str)
    assert main(["train", "--data", str(data), "--base", str(tiny_model_dir()), "--out", str(tmp_path / "x"), "--full", "--merge"]) == 2
