"""The transformers backend: batched generation and exact per-token log-likelihoods.

`model` is an HF model directory, a `.gguf` file, or a `local:` packaged model. transformers
de-quantises a GGUF to fp32 on load, which takes about a minute on a small CPU, so the converted
model is saved once (`save_pretrained`) under the model directory and later loads read that.
An optional PEFT `adapter` directory is applied on top.

Concurrent requests are gathered by a micro-batcher (up to `batch_size`, a short wait window) and
run as one left-padded `generate`. Sampling is done per row by `_RowSampler` with the row's own
seeded `torch.Generator`, temperature and top_p, so requests with different sampling parameters
share a batch and a request's tokens do not depend on which other requests it was batched with.
Per-row `max_tokens` and `stop` strings end each row on its own, and the model's `timeout_s` ends the whole
batch: a row still generating then fails as `timeout` (rows already finished are kept). A row whose request sets
`sampling.top_logprobs` also gets, at each step, the top-k log-softmax of the scores `_RowSampler` sees
(the model's distribution at temperature 1, after any processors the model's generation config adds)
and the log-probability of the token it picked.

Structured output is not native here: the model facade parses, repairs and re-asks.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from datatailor.errors import LLMCallFailure, UserError
from datatailor.llm.base import Completion, CompletionRequest, Message, PositionLogprobs, Sampling, TokenLogprobs
from datatailor.llm.config import HFModel
from datatailor.llm.local_models import get_spec, is_local_name, model_dir, resolve_local_model
from datatailor.prompts import load_prompt

log = logging.getLogger(__name__)

HF_INSTALL_HINT = "pip install 'datatailor[hf]' -c constraints.txt"
PLAIN_CHAT_TEMPLATE = "hf/plain_chat.j2"
BATCH_WINDOW_S = 0.02


def _imports() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise UserError(f"the hf backend needs torch and transformers: {HF_INSTALL_HINT}") from None
    return torch, transformers


# ----------------------------------------------------------------------------- loading


def converted_dir(model: str) -> Path | None:
    """Where the fp32 conversion of a GGUF model is cached; None for an HF directory."""
    if is_local_name(model):
        spec = get_spec(model)
        return model_dir() / "hf" / f"{spec.name}-{spec.sha256[:12]}"
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        st = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return model_dir() / "hf" / f"{path.stem}-{tag}"
    return None


def _convert_gguf(gguf: Path, target: Path) -> float:
    """Load a GGUF through transformers and save the fp32 model + tokenizer to `target`."""
    torch, transformers = _imports()
    start = time.perf_counter()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        extra: dict[str, Any] = {}
        if hasattr(transformers, "GgufConfig"):
            # transformers ≥ 5 keeps GGUF blocks packed by default (not trainable, not savable); unpack them.
            extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **extra
        )
    except ImportError as exc:  # the `gguf` package is missing
        raise UserError(f"loading a GGUF through transformers needs the gguf package ({exc}): {HF_INSTALL_HINT}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process converted the same model first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - start


def model_source(model: str) -> tuple[Path, float | None]:
    """An HF directory to load `model` from, converting a GGUF once. Returns (dir, conversion seconds)."""
    target = converted_dir(model)
    if target is None:
        path = Path(model).expanduser()
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise UserError(
                f"hf model {model!r} is a PEFT adapter: set `model` to its base model and `adapter` to this folder"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"hf model {model!r} is not an HF model directory (no config.json), a .gguf file or a local: name"
            )
        return path, None
    if (target / "config.json").is_file():
        return target, None
    if is_local_name(model):
        gguf = resolve_local_model(model)
    else:
        gguf = Path(model).expanduser()
    log.info("converting %s to an HF model in %s (once)", gguf, target)
    seconds = _convert_gguf(gguf, target)
    log.info("converted %s in %.1f s", gguf.name, seconds)
    return target, seconds


def pick_device(device: str) -> str:
    torch, _ = _imports()
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ----------------------------------------------------------------------------- per-row sampling


def _sample_row(torch: Any, logits: Any, sampling: Sampling, generator: Any) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = cumulative - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


# One generated step of one row: (chosen id, its logprob, top ids, top logprobs).
StepLogprobs = tuple[int, float, list[int], list[float]]


def step_logprobs(torch: Any, scores: Any, chosen: int, k: int) -> StepLogprobs:
    """The chosen token's log-probability and the top-k alternatives of one row's scores."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return chosen, float(logprobs[chosen]), [int(i) for i in ids.tolist()], [float(v) for v in values.tolist()]


class _RowSampler:
    """A logits processor that samples each row itself and leaves only that token for greedy search."""

    def __init__(self, torch: Any, rows: list[Sampling]):
        self.torch = torch
        self.rows = rows
        # Per row, the steps' logprobs when that row asked for them (else None).
        self.logprobs: list[list[StepLogprobs] | None] = [[] if s.top_logprobs is not None else None for s in rows]
        self.generators = []
        for s in rows:
            g = torch.Generator(device="cpu")
            if s.seed is None:
                g.seed()
            else:
                g.manual_seed(s.seed)
            self.generators.append(g)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        out = self.torch.full_like(scores, float("-inf"))
        for i, (sampling, generator) in enumerate(zip(self.rows, self.generators)):
            token = _sample_row(self.torch, scores[i], sampling, generator)
            out[i, token] = 0.0
            steps = self.logprobs[i]
            if steps is not None and sampling.top_logprobs is not None:
                steps.append(step_logprobs(self.torch, scores[i], token, sampling.top_logprobs))
        return out


class _RowLimits:
    """A stopping criterion with per-row `max_tokens` and stop strings, and a time limit for the whole batch."""

    def __init__(self, torch: Any, tokenizer: Any, prompt_len: int, rows: list[Sampling], timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.torch = torch
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.rows = rows
        self.tail = max((len(s) for r in rows for s in r.stop), default=0) + 8
        self.clock = clock
        self.deadline = clock() + timeout_s if timeout_s is not None else None
        self.timed_out = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        n = input_ids.shape[1] - self.prompt_len
        if self.deadline is not None and self.clock() > self.deadline:
            self.timed_out = True
            return self.torch.ones(input_ids.shape[0], dtype=self.torch.bool, device=input_ids.device)
        done = []
        for i, s in enumerate(self.rows):
            stop = n >= s.max_tokens
            if not stop and s.stop:
                text = self.tokenizer.decode(input_ids[i, max(self.prompt_len, input_ids.shape[1] - self.tail) :])
                stop = any(x in text for x in s.stop)
            done.append(stop)
        return self.torch.tensor(done, dtype=self.torch.bool, device=input_ids.device)


def positions_from_steps(
    steps: list[StepLogprobs], kept: list[int], text: str, decode: Callable[[list[int]], str]
) -> list[PositionLogprobs]:
    """The kept tokens' `PositionLogprobs`, cut where `text` (after stop strings) ends.

    A chosen token's text is what it adds to the decoded reply (decoding the prefix, so SentencePiece
    spaces and multi-byte characters come out as in `text`). An alternative's text is what it would
    add after the two tokens before it, so it is written the same way ("▁7" → " 7", not "7").
    """
    out: list[PositionLogprobs] = []
    previous = ""
    for n, (token, (chosen, logprob, top_ids, top_lps)) in enumerate(zip(kept, steps), 1):
        if len(previous) >= len(text):
            break
        decoded = decode(kept[:n])
        piece = decoded[len(previous):] if decoded.startswith(previous) else decode([token])
        previous = decoded
        context = kept[max(0, n - 3) : n - 1]
        base = decode(context) if context else ""
        top: dict[str, float] = {}
        for i, lp in zip(top_ids, top_lps):
            full = decode(context + [i]) if context else decode([i])
            alt = full[len(base):] if full.startswith(base) else decode([i])
            # Two ids that decode alike (e.g. byte fallbacks) share one entry: their probabilities add up.
            top[alt] = _logaddexp(top[alt], lp) if alt in top else lp
        out.append(PositionLogprobs(token=piece, logprob=logprob, top=top))
    return out


def _logaddexp(a: float, b: float) -> float:
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# ----------------------------------------------------------------------------- micro-batching


class _MicroBatcher:
    """Gathers concurrent requests into batches for one worker-thread call each."""

    def __init__(self, run_batch: Callable[[list[CompletionRequest]], list[Completion | Exception]], batch_size: int):
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.loop = asyncio.get_running_loop()
        self.queue: list[tuple[CompletionRequest, asyncio.Future[Completion]]] = []
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, request: CompletionRequest) -> Completion:
        future: asyncio.Future[Completion] = self.loop.create_future()
        self.queue.append((request, future))
        if self.worker is None or self.worker.done():
            self.worker = self.loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.queue:
            if len(self.queue) < self.batch_size:
                await asyncio.sleep(BATCH_WINDOW_S)  # let the other concurrent callers join this batch
            batch = [item for item in self.queue[: self.batch_size] if not item[1].done()]
            del self.queue[: self.batch_size]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run_batch, [request for request, _ in batch])
            except Exception as exc:  # a whole-batch failure (e.g. loading) goes to every caller in it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


# ----------------------------------------------------------------------------- the backend


class HFBackend:
    native_json_schema = False

    def __init__(self, config: HFModel):
        self.config = config
        self._lock = threading.Lock()  # one forward pass at a time on the shared model
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._batcher: _MicroBatcher | None = None
        self.load_seconds: float | None = None
        self.conversion_seconds: float | None = None
        self.batch_sizes: list[int] = []  # rows of each generate() call, for tests and benchmarks

    # -- loading

    def _load(self) -> tuple[Any, Any]:
        """Called with the lock held."""
        if self._model is not None:
            return self._model, self._tokenizer
        torch, transformers = _imports()
        adapter = Path(self.config.adapter).expanduser() if self.config.adapter else None
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise UserError(f"hf adapter {self.config.adapter!r} is not a PEFT adapter directory (no adapter_config.json)")
        source, self.conversion_seconds = model_source(self.config.model)
        start = time.perf_counter()
        self._device = pick_device(self.config.device)
        dtype = torch.float32 if self._device == "cpu" else "auto"
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        if adapter is not None:
            try:
                from peft import PeftModel
            except ImportError:
                raise UserError(f"loading an adapter needs peft: {HF_INSTALL_HINT}") from None
            model = PeftModel.from_pretrained(model, str(adapter))
        model.to(self._device)
        model.eval()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._model, self._tokenizer = model, tokenizer
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s on %s in %.1f s", self.config.model, self._device, self.load_seconds)
        return model, tokenizer

    def prompt_text(self, messages: list[Message]) -> tuple[str, bool]:
        """The prompt string and whether the tokenizer should add its special tokens (BOS).

        Called with the lock held (the model is loaded).
        """
        chat = [m.model_dump() for m in messages]
        if self._tokenizer.chat_template:
            return self._tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), False
        rendered = load_prompt(PLAIN_CHAT_TEMPLATE).render(messages=chat)[0].content
        # Template rendering trims trailing whitespace; the answer starts on a new line.
        return rendered + "\n", True

    def _encode(self, messages: list[Message]) -> list[int]:
        text, special = self.prompt_text(messages)
        return list(self._tokenizer(text, add_special_tokens=special)["input_ids"])

    def _max_positions(self) -> int | None:
        config = self._model.config
        return getattr(config, "max_position_embeddings", None)

    # -- generation

    def _generate_batch(self, requests: list[CompletionRequest]) -> list[Completion | Exception]:
        # The tokenizer is not safe to share across threads either, so the lock covers everything.
        with self._lock:
            return self._generate_batch_locked(requests)

    def _generate_batch_locked(self, requests: list[CompletionRequest]) -> list[Completion | Exception]:
        torch, transformers = _imports()
        model, tokenizer = self._load()
        limit = self._max_positions()
        encoded: list[tuple[int, list[int]]] = []
        results: list[Completion | Exception | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            ids = self._encode(request.messages)
            if limit is not None and len(ids) + request.sampling.max_tokens > limit:
                results[i] = LLMCallFailure(
                    f"{self.config.model}: prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                    f"exceed the model's {limit} positions",
                    kind="prompt_too_long",
                )
            else:
                encoded.append((i, ids))
        if encoded:
            self.batch_sizes.append(len(encoded))
            rows = [requests[i].sampling for i, _ in encoded]
            batch = tokenizer.pad({"input_ids": [ids for _, ids in encoded]}, return_tensors="pt", padding=True)
            input_ids = batch["input_ids"].to(self._device)
            attention = batch["attention_mask"].to(self._device)
            prompt_len = input_ids.shape[1]
            gen_config = copy.deepcopy(model.generation_config)
            gen_config.update(
                do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                max_new_tokens=max(s.max_tokens for s in rows), pad_token_id=tokenizer.pad_token_id,
            )
            sampler = _RowSampler(torch, rows)
            limits = _RowLimits(torch, tokenizer, prompt_len, rows, self.config.timeout_s)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    generation_config=gen_config,
                    logits_processor=transformers.LogitsProcessorList([sampler]),
                    stopping_criteria=transformers.StoppingCriteriaList([limits]),
                )
            eos = gen_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            for row, (i, ids) in enumerate(encoded):
                done = self._finish(out[row, prompt_len:].tolist(), len(ids), rows[row], eos_ids, sampler.logprobs[row])
                # A row the clock stopped short of its own limit is not a reply: it fails, it is not "cut off by max_tokens".
                cut_by_clock = limits.timed_out and done.finish_reason == "length" and done.completion_tokens < rows[row].max_tokens
                results[i] = LLMCallFailure(
                    f"{self.config.model}: generation ran past timeout_s={self.config.timeout_s:g} s after "
                    f"{done.completion_tokens} tokens (max_tokens {rows[row].max_tokens}); raise timeout_s or lower max_tokens",
                    kind="timeout",
                ) if cut_by_clock else done
        return [r for r in results if r is not None]

    def _finish(
        self, generated: list[int], prompt_tokens: int, sampling: Sampling, eos_ids: set[int],
        steps: list[StepLogprobs] | None = None,
    ) -> Completion:
        generated = generated[: sampling.max_tokens]
        # A row that ended (EOS, or stopped by `_RowLimits`) is filled with padding while the rest continue.
        pad = self._tokenizer.pad_token_id
        end = next((k for k, t in enumerate(generated) if t in eos_ids or t == pad), None)
        saw_eos = end is not None and generated[end] in eos_ids
        kept = generated if end is None else generated[:end]
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, sampling.stop)
        logprobs = None
        if steps is not None:
            logprobs = positions_from_steps(
                steps, kept, text, lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)
            )
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept) + (1 if saw_eos else 0),
            finish_reason="stop" if saw_eos or stopped else "length",
            logprobs=logprobs,
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            self._batcher = _MicroBatcher(self._generate_batch, self.config.batch_size)
        return await self._batcher.submit(request)

    # -- log-likelihood

    def _loglikelihood_sync(self, messages: list[Message], response: str) -> TokenLogprobs:
        with self._lock:
            return self._loglikelihood_locked(messages, response)

    def _loglikelihood_locked(self, messages: list[Message], response: str) -> TokenLogprobs:
        torch, _ = _imports()
        model, tokenizer = self._load()
        prompt_ids = self._encode(messages)
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if not response_ids:
            return TokenLogprobs(tokens=[], logprobs=[])
        ids = torch.tensor([prompt_ids + response_ids], device=self._device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        # Position t predicts token t+1: the response tokens are predicted by the positions before them.
        start = len(prompt_ids) - 1
        logprobs = torch.log_softmax(logits[start : start + len(response_ids)].float(), dim=-1)
        picked = logprobs.gather(1, torch.tensor(response_ids, device=logprobs.device).unsqueeze(1)).squeeze(1)
        return TokenLogprobs(
            tokens=tokenizer.convert_ids_to_tokens(response_ids), logprobs=[float(x) for x in picked.cpu()]
        )

    async def loglikelihood(self, messages: list[Message], response: str) -> TokenLogprobs:
        """Teacher-forced log-probability of each token of `response` given the chat `messages`."""
        return await asyncio.to_thread(self._loglikelihood_sync, messages, response)

    async def aclose(self) -> None:
        def release() -> None:
            with self._lock:
                self._model = self._tokenizer = None

        await asyncio.to_thread(release)
