"""GGUF models through llama-cpp-python.

With ``parallel: 1`` (the default) chats go through ``Llama.create_chat_completion``
(the template in the GGUF metadata, llama-cpp's own fallback where there is none) and
raw prompts through ``create_completion``, both streamed, so the text is what llama-cpp
gives directly for the same settings; the model's thread serves one generation at a
time. With ``parallel: N`` the model decodes up to N generations together in llama.cpp
slots (models/gguf_slots.py, models/continuous.py), their prompts built by the same
chat handler.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import structlog

from models.base import GENERATE
from models.compute import ComputeThread
from models.continuous import Scheduler, Sequence
from models.generation import (
    GenerationControl,
    GenerationParams,
    GenerationResult,
    StopScanner,
    check_context,
    wait_for_turn,
)
from models.options import GGUFOptions
from wire.errors import InferenceError, InvalidRequest, TimeLimitReached

log = structlog.get_logger(__name__)


_AMX_BUG = "https://github.com/ggml-org/llama.cpp/issues/20824"
_load_lock = threading.Lock()


def build_uses_amx() -> bool:
    """Whether this llama.cpp build runs quantised matmuls on the CPU's AMX tiles."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def open_llama(path: str, *, weight_repacking: bool | None = None, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(path, **kwargs)``, with llama.cpp's weight repacking chosen.

    llama.cpp repacks weights into CPU-specific layouts at load ("extra buffer types":
    AMX tiles, interleaved AVX blocks). Its AMX kernels crash on K-quants (segfault in
    ``ggml_backend_amx_mul_mat`` at the first forward pass, with the bundled
    Gemma Q4_K_M on a Sapphire Rapids host; llama.cpp #20824, closed unfixed), and a
    build compiled with ``-march=native`` on such a host uses them. ``None`` turns
    repacking off exactly there; ``llama-cli --no-repack`` is the same switch.
    Tests and benchmarks load their oracle through here too, so both sides run the same
    kernels.
    """
    import llama_cpp
    from llama_cpp import Llama

    if weight_repacking is None:
        weight_repacking = not build_uses_amx()
        if not weight_repacking:
            log.warning("gguf.repacking_off", reason="llama.cpp build uses AMX", see=_AMX_BUG)
    if weight_repacking:
        return Llama(model_path=path, **kwargs)
    # Llama() takes no argument for it: it builds its params from this function, so
    # hand it params with the switch off (under a lock: the module is shared)
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        if "use_extra_bufts" not in {name for name, *_ in type(params)._fields_}:
            raise InferenceError("this llama-cpp-python cannot turn weight repacking off: upgrade it")
        params.use_extra_bufts = False
        return params

    with _load_lock:
        low_level.llama_model_default_params = without_repacking
        try:
            return Llama(model_path=path, **kwargs)
        finally:
            low_level.llama_model_default_params = defaults


def sampling_kwargs(params: GenerationParams) -> dict[str, Any]:
    """The contract's sampling settings as llama-cpp arguments, with its extras turned off.

    Stop strings are not passed: the runtime cuts them itself (as llama-cpp would, before
    the first match) so it knows whether the model ended with its own end-of-text token.
    """
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,  # 0: greedy
        "top_p": params.top_p,
        "top_k": params.top_k or 0,  # 0 disables top-k in llama.cpp
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "seed": params.seed,
    }


class GGUFRuntime:
    def __init__(self, alias: str, path: str, device: str, options: GGUFOptions) -> None:
        self.alias = alias
        self.options = options
        self.path = path
        self.device = device
        self.capabilities = frozenset({GENERATE})
        # every llama.cpp call (load, warm-up, each generation) runs on the model's own
        # thread (see models/compute.py), which also serialises generations on its context
        self._compute = ComputeThread(alias)
        self.compute = self._compute
        self._steps = _StepCounter()
        self.scheduler: Scheduler | None = None  # with parallel > 1
        self._slots: Any = None

    def load(self) -> None:
        self._compute.run(self._load)

    def _load(self) -> None:
        opts = self.options
        n_gpu_layers = opts.n_gpu_layers
        if n_gpu_layers is None:
            n_gpu_layers = -1 if self.device != "cpu" else 0  # every layer on a GPU, none on the CPU
        parallel = opts.parallel > 1
        with structlog.contextvars.bound_contextvars(model=self.alias):  # on the loader's log lines
            # with slots, the Llama's own context goes unused (its model, vocabulary and chat
            # handler serve): the smallest there is
            self.llm = self._open(opts, n_gpu_layers, n_ctx=256 if parallel else opts.n_ctx)
        self._formatter = self._template_formatter()
        self._count_samples()
        self.n_ctx = self.llm.n_ctx()
        if parallel:
            from models.gguf_slots import LlamaSlots

            self._slots = LlamaSlots(self.llm, parallel=opts.parallel, n_ctx=opts.n_ctx, n_batch=opts.n_batch)
            self.n_ctx = self._slots.n_ctx_seq
            self.scheduler = Scheduler(self.alias, self._slots, self._compute, opts.parallel, opts.max_waiting)

    def _open(self, opts: GGUFOptions, n_gpu_layers: int, n_ctx: int) -> Any:
        return open_llama(
            self.path,
            weight_repacking=opts.weight_repacking,
            n_ctx=n_ctx,
            n_batch=opts.n_batch,
            n_threads=opts.n_threads or os.cpu_count(),
            n_gpu_layers=n_gpu_layers,
            main_gpu=int(self.device.split(":", 1)[1]) if self.device.startswith("cuda:") else 0,
            chat_format=opts.chat_format,
            verbose=False,
        )

    def _count_samples(self) -> None:
        """Count sampled tokens for ``usage`` by wrapping this instance's ``sample``.

        llama-cpp's streamed chunks carry no token counts. A pass-through logits
        processor would count too, but llama-cpp builds a numpy view of the whole
        vocabulary for it on every token (262k entries for Gemma 3).
        """
        sample = self.llm.sample
        llm = self.llm

        def counted_sample(*args: Any, **kwargs: Any) -> Any:
            self._steps.tick(llm.n_tokens)
            return sample(*args, **kwargs)

        llm.sample = counted_sample

    def warmup(self) -> None:
        self.generate(GenerationParams(prompt="Hello", max_tokens=2, temperature=0.0), GenerationControl())

    def close(self) -> None:
        def close_llm() -> None:
            if self._slots is not None:
                self._slots.close()
                self._slots = None
            llm = getattr(self, "llm", None)
            if llm is not None:
                llm.close()
                self.llm = None

        if self.scheduler is not None:
            self.scheduler.close()
        self._compute.run(close_llm)
        self._compute.close()

    def describe(self) -> dict[str, Any]:
        described = {"n_ctx": self.n_ctx, "chat_format": self.llm.chat_format, "path": self.path}
        if self.scheduler is not None:
            described.update(parallel=self.options.parallel, n_ctx_total=self.options.n_ctx)
        return described

    def stats(self) -> dict[str, Any]:
        return self.scheduler.stats() if self.scheduler is not None else {}

    def generation_load(self) -> tuple[int, int]:
        """Generations decoding now, and waiting for their turn (for the metrics)."""
        if self.scheduler is not None:
            return self.scheduler.load()
        return (1 if self._compute.busy else 0), self._compute.waiting

    def _template_formatter(self) -> Any:
        """The Jinja formatter llama-cpp builds from the GGUF template, to count prompt tokens."""
        from llama_cpp import llama_chat_format

        template = self.llm.metadata.get("tokenizer.chat_template")
        if self.llm.chat_format != "chat_template.default" or not template:
            return None
        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def count_prompt_tokens(self, params: GenerationParams) -> int:
        if params.prompt is not None:
            return len(self.llm.tokenize(params.prompt.encode("utf-8"), add_bos=True, special=True))
        assert params.messages is not None
        if self._formatter is not None:
            rendered = self._formatter(messages=params.messages)
            tokens = self.llm.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            return len(tokens)
        # a built-in chat format: count the contents, a lower bound llama-cpp re-checks
        text = "\n".join(m["content"] for m in params.messages)
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationResult:
        """With slots, decoded together with the model's other generations; else on the
        model's thread, where concurrent requests wait their turn."""
        if self.scheduler is not None:
            return self.scheduler.follow(self._sequence(params, control), control)
        started = threading.Event()
        done = self._compute.submit(self._generate, params, control, started)
        if not wait_for_turn(done, started, control):
            # never started: the prompt is counted here (tokenizing only reads the vocabulary)
            return GenerationResult("", "cancelled", self.count_prompt_tokens(params), 0)
        return done.result()

    def _sequence(self, params: GenerationParams, control: GenerationControl) -> Sequence:
        """A request as a sequence for the slots: its prompt built as llama-cpp would build
        it, checked against a slot's share of the context, and submitted."""
        from models.gguf_slots import chat_prompt, completion_prompt

        assert self.scheduler is not None and self._slots is not None
        if params.messages is not None:
            prompt_ids, stops = chat_prompt(self.llm, params.messages)
        else:
            prompt_ids, stops = completion_prompt(self.llm, params.prompt or ""), []
        window = f"a slot's share of the context (n_ctx {self.options.n_ctx} / parallel {self.options.parallel})"
        check_context(len(prompt_ids), params.max_tokens, self.n_ctx, window)
        seq = Sequence(params, prompt_ids, self._slots.decoder(), control.deadline, extra_stops=stops)
        self.scheduler.submit(seq)
        return seq

    def _generate(
        self, params: GenerationParams, control: GenerationControl, started: threading.Event
    ) -> GenerationResult:
        started.set()
        if getattr(self, "llm", None) is None:
            raise InferenceError(f"model {self.alias} is shutting down")
        estimate = self.count_prompt_tokens(params)
        check_context(estimate, params.max_tokens, self.n_ctx)
        # evaluate every prompt from scratch: reusing the previous request's KV prefix
        # changes the batch shapes of the evaluation, hence the rounding, hence at times
        # the greedy text; a request's output must not depend on the one before it
        self.llm.reset()
        self._steps = steps = _StepCounter()
        kwargs = sampling_kwargs(params)
        try:
            if params.messages is not None:
                chunks = self.llm.create_chat_completion(messages=params.messages, stream=True, **kwargs)
            else:
                chunks = self.llm.create_completion(prompt=params.prompt, stream=True, **kwargs)
            return self._consume(chunks, params, control, steps, estimate)
        except ValueError as exc:
            if steps.calls == 0:  # llama-cpp's own context check, before any token
                raise InvalidRequest(f"prompt/messages: {exc}") from None
            raise

    def _consume(
        self, chunks: Any, params: GenerationParams, control: GenerationControl, steps: _StepCounter, estimate: int
    ) -> GenerationResult:
        pieces: list[str] = []
        scanner = StopScanner(params.stop)
        finish_reason = "length"
        eos = False

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if control.on_text is not None:
                    control.on_text(text)

        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                if text:
                    emit(scanner.feed(text))
                    if scanner.stopped:
                        finish_reason = "stop"
                        break
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                    eos = finish_reason == "stop"  # the model's end-of-text (or the template's stop)
                    break
                self._compute.progress()
                if control.should_stop():
                    finish_reason = "cancelled"
                    break
                if time.monotonic() > control.deadline:
                    raise TimeLimitReached(f"generate: time limit reached after {steps.calls} tokens")
        finally:
            chunks.close()  # ends llama-cpp's generator and frees the context for the next request
        emit(scanner.flush())
        # every sampled token passes the counter once; an end-of-text token is not part of the text
        completion_tokens = max(0, steps.calls - (1 if eos else 0))
        prompt_tokens = steps.prompt_tokens if steps.prompt_tokens is not None else estimate
        return GenerationResult("".join(pieces), finish_reason, prompt_tokens, completion_tokens)


class _StepCounter:
    """Sampled tokens of one generation; the first sample comes right after the prompt's
    evaluation, so the context then holds exactly the prompt's tokens."""

    def __init__(self) -> None:
        self.calls = 0
        self.prompt_tokens: int | None = None

    def tick(self, n_tokens: int) -> None:
        if self.calls == 0:
            self.prompt_tokens = n_tokens
        self.calls += 1
