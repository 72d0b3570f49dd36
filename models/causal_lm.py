"""Transformers causal LMs (``AutoModelForCausalLM``).

With ``parallel: 1`` (the default), ``model.generate`` runs on the model's thread, one
generation at a time, and hands text to a ``TextIteratorStreamer``; the request's thread
reads the streamer, cuts stop strings, and publishes pieces. A stopping criterion polls
for cancellation and the deadline between tokens. Greedy decoding (``temperature=0``) is
``generate(do_sample=False)``: the text equals what the library gives directly for the
same prompt. With ``parallel: N`` up to N generations are decoded together, as rows of
one KV cache (models/causal_lm_rows.py, models/continuous.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from models.base import GENERATE
from models.compute import ComputeThread
from models.continuous import Scheduler, Sequence
from models.device import flash_attention_available, resolve_dtype
from models.generation import (
    GenerationControl,
    GenerationParams,
    GenerationResult,
    StopScanner,
    check_context,
    wait_for_turn,
)
from models.options import CausalLMOptions
from wire.errors import InferenceError, TimeLimitReached

log = structlog.get_logger(__name__)


def fallback_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The plain ``role: content`` layout for a tokenizer without a chat template."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


class _Halt(StoppingCriteria):
    """Stops ``generate`` when asked: cancellation, a stop string, or the deadline."""

    def __init__(self, control: GenerationControl, progress: Callable[[], None]) -> None:
        self.control = control
        self.progress = progress  # the compute thread's: a step was taken
        self.reason: str | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.progress()
        if self.reason is None:
            if self.control.should_stop():
                self.reason = "cancelled"
            elif time.monotonic() > self.control.deadline:
                self.reason = "deadline"
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


class CausalLMRuntime:
    def __init__(self, alias: str, source: str, device: str, options: CausalLMOptions) -> None:
        self.alias = alias
        self.options = options
        self.source = source
        self.capabilities = frozenset({GENERATE})
        self.device = device
        # loading and every generation on the model's own thread (models/compute.py); a
        # request's thread reads the streamer while its generation runs there, and
        # concurrent requests take their turns
        self._compute = ComputeThread(alias)
        self.compute = self._compute
        self.scheduler: Scheduler | None = None  # with parallel > 1

    def load(self) -> None:
        self._compute.run(self._load)

    def _load(self) -> None:
        opts = self.options
        common: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code, "revision": opts.revision}
        if opts.gguf_file:
            common["gguf_file"] = opts.gguf_file
        config = AutoConfig.from_pretrained(self.source, **common)
        self.context = opts.max_length or next(
            (int(v) for v in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions")) if v),
            2048,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **common)
        model_kwargs: dict[str, Any] = {"dtype": resolve_dtype(opts.dtype, self.device), **common}
        if flash_attention_available(self.device):
            model_kwargs["attn_implementation"] = "flash_attention_2"
        self.model = AutoModelForCausalLM.from_pretrained(self.source, config=config, **model_kwargs)
        self.model.to(self.device)
        self.model.eval()
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        if opts.parallel > 1:
            from models.causal_lm_rows import CacheRows

            self._rows = CacheRows(self.model, self.tokenizer, self.device, self._eos_ids())
            self.scheduler = Scheduler(self.alias, self._rows, self._compute, opts.parallel, opts.max_waiting)

    def warmup(self) -> None:
        self.generate(GenerationParams(prompt="Hello", max_tokens=2, temperature=0.0), GenerationControl())

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self._compute.close()

    def describe(self) -> dict[str, Any]:
        described = {"context": self.context, "dtype": str(self.model.dtype), "chat_template": self.has_chat_template}
        if self.scheduler is not None:
            described["parallel"] = self.options.parallel
        return described

    def stats(self) -> dict[str, Any]:
        return self.scheduler.stats() if self.scheduler is not None else {}

    def generation_load(self) -> tuple[int, int]:
        """Generations decoding now, and waiting for their turn (for the metrics)."""
        if self.scheduler is not None:
            return self.scheduler.load()
        return (1 if self._compute.busy else 0), self._compute.waiting

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, params: GenerationParams) -> tuple[str, bool]:
        """The prompt text, and whether the tokenizer should add its special tokens."""
        if params.prompt is not None:
            return params.prompt, True
        assert params.messages is not None
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(params.messages, tokenize=False, add_generation_prompt=True)
            return text, False  # the template already holds BOS and friends
        return fallback_chat_prompt(params.messages), True

    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationResult:
        text, add_special = self.render(params)
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
        prompt_tokens = int(encoded["input_ids"].shape[1])
        check_context(prompt_tokens, params.max_tokens, self.context)
        if self.scheduler is not None:
            ids = encoded["input_ids"][0].tolist()
            seq = Sequence(params, ids, self._rows.decoder(), control.deadline)
            self.scheduler.submit(seq)
            return self.scheduler.follow(seq, control)
        # a causal LM takes ids and mask only (a BERT-style tokenizer also gives token types)
        inputs = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask") if k in encoded}

        halt = _Halt(control, self._compute.progress)
        scanner = StopScanner(params.stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60.0)
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k or 0,
            }
        kwargs = {
            **inputs,
            **sampling,
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self.pad_token_id,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([halt]),
        }
        outcome: dict[str, Any] = {}

        started = threading.Event()

        def run() -> None:
            started.set()
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    outcome["sequences"] = self.model.generate(**kwargs)
            except BaseException as exc:  # handed to the request's thread below
                outcome["error"] = exc
                streamer.end()

        done = self._compute.submit(run)
        # behind another generation on this model: wait for the turn before reading the
        # streamer (its timeout counts from the start)
        if not wait_for_turn(done, started, control):
            return GenerationResult("", "cancelled", prompt_tokens, 0)
        pieces: list[str] = []
        try:
            for piece in streamer:
                safe = scanner.feed(piece)
                if safe:
                    pieces.append(safe)
                    if control.on_text is not None:
                        control.on_text(safe)
                if scanner.stopped and halt.reason is None:
                    halt.reason = "stop"
        except BaseException:
            halt.reason = halt.reason or "aborted"  # the reader failed: end the generation now
            raise
        finally:
            done.result()
        if "error" in outcome:
            raise InferenceError(f"generate failed: {type(outcome['error']).__name__}: {outcome['error']}")
        tail = scanner.flush()
        if tail:
            pieces.append(tail)
            if control.on_text is not None:
                control.on_text(tail)
        if halt.reason == "deadline":
            raise TimeLimitReached("generate: time limit reached")

        new_tokens = outcome["sequences"][0, prompt_tokens:]
        completion_tokens = int(new_tokens.shape[0])
        if halt.reason in ("cancelled", "stop"):
            finish_reason = halt.reason
        else:
            eos_ids = self._eos_ids()
            ended = completion_tokens > 0 and int(new_tokens[-1]) in eos_ids
            finish_reason = "stop" if ended or completion_tokens < params.max_tokens else "length"
            if ended:
                completion_tokens -= 1
        return GenerationResult("".join(pieces), finish_reason, prompt_tokens, completion_tokens)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids
