"""llama.cpp slots: several generations in one llama.cpp context, one batch per step.

What llama.cpp's own server does with ``--parallel N``, through llama-cpp-python's
low-level API: a context with ``n_seq_max = N`` whose KV cache is split between the N
sequences (``n_ctx / N`` tokens each), and per step one ``llama_decode`` over a batch
that holds each decoding sequence's last token. Each sequence has its own sampler chain,
built as ``Llama.create_completion`` builds it, so a request's sampling settings are its
own. models/continuous.py runs the loop.

A new sequence's prompt is evaluated on its own, in ``n_batch`` pieces, as
``create_completion`` evaluates it, not packed with other sequences' tokens as
llama-server does: packed, the prompt's arithmetic depends on what it shares a batch
with, and greedy texts drift from what the request gives alone (3 of 11 requests in a
first try on the bundled Gemma). Decoding one token per sequence in a shared batch
keeps each sequence's rows to themselves (docs/generation.md has the measurements).
"""

from __future__ import annotations

import codecs
import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals, llama_chat_format

from models.continuous import Sequence
from models.generation import GenerationParams
from wire.errors import InferenceError


@dataclass(eq=False)
class _Slot:
    seq_id: int
    sampler: _internals.LlamaSampler | None  # None: greedy
    n_past: int = 0  # tokens of this sequence in the KV cache
    last: int = -1  # the token sampled last, fed in the next step


class Utf8Pieces:
    """Token pieces (bytes) to text as ``Llama.create_completion`` detokenizes them:
    concatenated, never cutting a character in half."""

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab
        self.buffer = ctypes.create_string_buffer(64)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def feed(self, token: int) -> str:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self.buffer, len(self.buffer), 0, False)
        if n < 0:  # a longer piece than the buffer: grow it and ask again
            self.buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self.buffer, len(self.buffer), 0, False)
        return self.decoder.decode(self.buffer.raw[:n])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class _PromptCatcher:
    """Stands in for the ``Llama`` a chat handler is given, to learn the prompt tokens and
    stop strings the handler would hand to ``create_completion``, without generating."""

    class Caught(Exception):
        def __init__(self, kwargs: dict[str, Any]) -> None:
            self.kwargs = kwargs

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any) -> Any:
        raise self.Caught(kwargs)


def chat_prompt(llm: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
    """The prompt tokens and stop strings ``Llama.create_chat_completion`` would use: the
    same handler (the GGUF's template, or llama-cpp's named chat format), asked through a
    stand-in."""
    handler = (
        llm.chat_handler
        or llm._chat_handlers.get(llm.chat_format)
        or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    )
    try:
        handler(llama=_PromptCatcher(llm), messages=messages, stream=False, max_tokens=1, temperature=0.0)
    except _PromptCatcher.Caught as caught:
        prompt = caught.kwargs["prompt"]
        tokens = prompt if isinstance(prompt, list) else completion_prompt(llm, prompt)
        stop = caught.kwargs.get("stop") or []
        return list(tokens), [stop] if isinstance(stop, str) else list(stop)
    raise InferenceError(f"chat format {llm.chat_format!r} did not produce a prompt")


def completion_prompt(llm: Any, prompt: str) -> list[int]:
    """The tokens ``Llama.create_completion(prompt=...)`` evaluates: the model's BOS where
    it asks for one, the text with special tokens parsed, and its EOS or SEP where it asks."""
    model = llm._model
    bos = model.token_cls() if model.token_cls() != -1 else llm.token_bos()
    sep = model.token_sep()
    head = [bos] if model.add_bos_token() and bos != -1 else []
    tail = [sep if sep != -1 else llm.token_eos()] if model.add_eos_token() or sep != -1 else []
    body = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
    return (head + body + tail) or [llm.token_bos()]


def sampler_for(params: GenerationParams, n_vocab: int) -> _internals.LlamaSampler | None:
    """The chain ``Llama.create_completion`` builds for the worker's sampling arguments
    (models/gguf.py ``sampling_kwargs``): penalties off, then top-k, typical (off), top-p,
    min-p (off), temperature and a seeded draw. None for temperature 0: greedy, the first
    highest logit, which is what that chain's greedy sampler picks (read without building
    the vocabulary-sized candidate array a chain builds for every token)."""
    if params.temperature == 0:
        return None
    sampler = _internals.LlamaSampler()
    sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=64, penalty_repeat=1.0, penalty_freq=0.0, penalty_present=0.0)
    sampler.add_top_k(params.top_k or 0)
    sampler.add_typical(1.0, 1)
    sampler.add_top_p(params.top_p, 1)
    sampler.add_min_p(0.0, 1)
    sampler.add_temp(params.temperature)
    sampler.add_dist(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
    return sampler


class LlamaSlots:
    """The slots of one GGUF model (the ``Backend`` of models/continuous.py)."""

    def __init__(self, llm: Any, *, parallel: int, n_ctx: int, n_batch: int) -> None:
        self.llm = llm
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, params.n_ubatch or n_batch)
        params.n_seq_max = parallel
        params.kv_unified = False  # each sequence its own share, as llama-server's slots
        self.context = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.n_batch = n_batch
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self._free = list(range(parallel - 1, -1, -1))
        self._active: dict[int, _Slot] = {}  # by sequence id

    def decoder(self) -> Utf8Pieces:
        return Utf8Pieces(self.vocab)

    def start(self, seq: Sequence) -> None:
        self._free.sort(reverse=True)
        seq.slot = slot = _Slot(self._free.pop(), sampler_for(seq.params, self.n_vocab))
        self._active[slot.seq_id] = slot

    def release(self, seq: Sequence) -> None:
        """Free the sequence's cells; then move the highest running sequence into the freed
        id, so that the running sequences keep the ids 0..n-1. llama.cpp splits a batch
        for a KV cache split between sequences into micro-batches of consecutive ids: with
        a gap, one step costs two forward passes or more (at 3 sequences: 41 ms a step
        with ids 0, 2, 3 against 28 ms with 0, 1, 2)."""
        slot: _Slot | None = seq.slot
        if slot is None:
            return
        seq.slot = None
        memory = self.context.memory
        llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
        if slot.sampler is not None:
            slot.sampler.close()
        del self._active[slot.seq_id]
        freed = slot.seq_id
        highest = max(self._active, default=-1)
        if highest > freed:
            moved = self._active.pop(highest)
            llama_cpp.llama_memory_seq_cp(memory, highest, freed, -1, -1)
            llama_cpp.llama_memory_seq_rm(memory, highest, -1, -1)
            moved.seq_id = freed
            self._active[freed] = moved
            freed = highest
        self._free.append(freed)

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.context.memory, True)
        for slot in self._active.values():
            if slot.sampler is not None:
                slot.sampler.close()
        self._free.extend(self._active)
        self._active.clear()

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """New sequences' prompts, each on its own; then one token of every sequence."""
        sampled: list[tuple[Sequence, int]] = []
        for seq in seqs:
            slot: _Slot = seq.slot
            if slot.n_past == 0:
                for start in range(0, seq.prompt_tokens, self.n_batch):
                    piece = seq.prompt_ids[start : start + self.n_batch]
                    self._decode([(token, start + i, slot.seq_id) for i, token in enumerate(piece)])
                slot.n_past = seq.prompt_tokens
                slot.last = self._sample(slot, -1)
                sampled.append((seq, slot.last))
        # in the order of their sequence ids: llama.cpp splits a batch for a KV cache split
        # between sequences into micro-batches of ascending, consecutive sequences, and rows
        # out of that order cost a forward pass each (twice the time per step at 4 slots)
        seqs = sorted(seqs, key=lambda seq: seq.slot.seq_id)
        rows = [(seq.slot.last, seq.slot.n_past, seq.slot.seq_id) for seq in seqs]
        self._decode(rows, logits_all=True)
        for row, seq in enumerate(seqs):
            slot = seq.slot
            slot.n_past += 1
            slot.last = self._sample(slot, row)
            sampled.append((seq, slot.last))
        return sampled

    def _sample(self, slot: _Slot, row: int) -> int:
        if slot.sampler is not None:
            return int(slot.sampler.sample(self.context, row))
        logits = llama_cpp.llama_get_logits_ith(self.ctx, row)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def _decode(self, tokens: list[tuple[int, int, int]], logits_all: bool = False) -> None:
        """One ``llama_decode`` of (token, position, sequence) rows: logits for every row,
        or for the last only."""
        batch = self.batch.batch
        for n, (token, pos, seq_id) in enumerate(tokens):
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq_id
            batch.logits[n] = logits_all
        batch.logits[len(tokens) - 1] = True
        batch.n_tokens = len(tokens)
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise InferenceError(f"llama_decode returned {rc}")

    def close(self) -> None:
        self.batch.close()
        self.context.close()
