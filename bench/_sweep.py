"""bench_generate.py's concurrency sweep: many streams at once on a model with ``parallel``.

For each level of concurrency (1, 2, 4, 8 streams by default) against one worker whose
model has ``parallel`` = the highest level:

* aggregate tokens/s of the worker (every stream's completion tokens over the wall time
  from the first send to the last ``end``), against the worker's own one stream;
* the library called directly with the same concurrency: for llama.cpp, one context with
  that many sequences decoded in one ``llama_decode`` per step (its own batch API); for
  transformers, one ``model.generate`` over that many left-padded prompts;
* time to first token of a request sent while the others decode, against its TTFT with
  the worker idle; and the median TTFT of the level's streams, all sent at once (a burst:
  their prompts arrive together);
* inter-token latency p50 and p99 over every stream (gaps between stream messages).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import _harness as h

SUBJECTS = "bread,rivers,chess,the moon,volcanoes,trains,bees,winter,music,glass,maps,salt,tigers,clocks,paper,storms"
STARTS = ["The history of {} begins", "Everything you need to know about {}:", "Ten facts about {}. 1."]


def sweep_prompts(n: int) -> list[str]:
    subjects = SUBJECTS.split(",")
    return [STARTS[i % len(STARTS)].format(subjects[(i * 5) % len(subjects)]) for i in range(n)]


class Stream:
    """One streamed generation's timings, as its producer sees them."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []  # each token message
        self.end = self.start
        self.tokens = 0
        self.text = ""

    @property
    def ttft(self) -> float:
        return (self.stamps[0] if self.stamps else self.end) - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def stream_once(
    client: Any,
    alias: str,
    queue: str,
    prompt: str,
    max_tokens: int,
    timeout: float,
    on_token: Callable[[Stream], None] | None = None,
) -> Stream:
    s = Stream()
    for msg in client.stream_generate(
        alias, queue=queue, timeout=timeout, prompt=prompt, max_tokens=max_tokens, temperature=0.0
    ):
        if msg["type"] == "token":
            s.stamps.append(time.perf_counter())
            s.text += msg["text"]
            if on_token is not None:
                on_token(s)
        elif msg["type"] == "end":
            s.tokens = int(msg["usage"]["completion_tokens"])
        else:
            raise RuntimeError(f"stream error: {msg.get('error')}")
    s.end = time.perf_counter()
    return s


def concurrent(fn: Callable[[int], Stream], n: int) -> tuple[list[Stream], float]:
    """``fn(i)`` for i < n, all at once: the streams and the wall time."""
    out: list[Stream | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [s for s in out if s is not None], time.perf_counter() - started


def worker_rep(client: Any, alias: str, queue: str, level: int, args: Any) -> tuple[float, list[float], float]:
    """``level`` streams at once, once: aggregate tokens/s, every inter-token gap and the
    streams' median time to first token."""
    prompts = sweep_prompts(level)
    streams, wall = concurrent(
        lambda i: stream_once(client, alias, queue, prompts[i], args.sweep_tokens, args.task_timeout), level
    )
    gaps = [g for s in streams for g in s.gaps]
    return sum(s.tokens for s in streams) / wall, gaps, h.median([s.ttft for s in streams])


def _probe(client: Any, alias: str, queue: str, level: int, args: Any, rep: int) -> float:
    prompt = f"Request {rep}: a note on rivers"
    if level == 1:
        return stream_once(client, alias, queue, prompt, 8, args.task_timeout).ttft
    decoding = threading.Barrier(level)  # the level - 1 background streams, and this thread

    def background(i: int) -> Stream:
        seen = {"n": 0}

        def tick(s: Stream) -> None:
            seen["n"] += 1
            if seen["n"] == 3:
                decoding.wait(timeout=args.task_timeout)

        prompts = sweep_prompts(level)
        return stream_once(client, alias, queue, prompts[i], args.sweep_tokens * 3, args.task_timeout, tick)

    runner = threading.Thread(target=concurrent, args=(background, level - 1))
    runner.start()
    decoding.wait(timeout=args.task_timeout)
    ttft = stream_once(client, alias, queue, prompt, 8, args.task_timeout).ttft
    runner.join()
    return ttft


def run_worker_sweep(client: Any, alias: str, queue: str, args: Any) -> dict[int, dict[str, float]]:
    """Every level once per repetition (1, 2, 4, 8, then again), so that a change in the
    host's speed during the sweep weighs on every level alike, not on one level's block;
    the medians per level are reported."""
    stream_once(client, alias, queue, "Warm up", 8, args.task_timeout)
    rates: dict[int, list[float]] = {level: [] for level in args.levels}
    gaps: dict[int, list[float]] = {level: [] for level in args.levels}
    ttfts: dict[int, list[float]] = {level: [] for level in args.levels}
    bursts: dict[int, list[float]] = {level: [] for level in args.levels}
    for rep in range(args.sweep_reps):
        for level in args.levels:
            h.log(f"sweep: {alias}, {level} stream(s), repetition {rep + 1} of {args.sweep_reps}")
            rate, level_gaps, burst = worker_rep(client, alias, queue, level, args)
            rates[level].append(rate)
            bursts[level].append(burst)
            gaps[level] += level_gaps
            # TTFT of a request sent once level - 1 others are decoding
            ttfts[level].append(_probe(client, alias, queue, level, args, rep))
    return {
        level: {
            "rate": h.median(rates[level]),
            "itl50": h.percentile(gaps[level], 50),
            "itl99": h.percentile(gaps[level], 99),
            "ttft": h.median(ttfts[level]),
            "burst": h.median(bursts[level]),
        }
        for level in args.levels
    }


# -- the library directly, with the same concurrency -------------------------------------------


def llama_direct_rate(gguf: str, level: int, args: Any, gpu_layers: int = 0) -> float:
    """llama.cpp's batch API: ``level`` sequences in one context, each prompt evaluated,
    then one ``llama_decode`` of one token per sequence per step, greedy."""
    import llama_cpp
    from llama_cpp import _internals

    from models.gguf import open_llama

    llm = open_llama(gguf, n_ctx=256, n_threads=args.n_threads, n_gpu_layers=gpu_layers, verbose=False)
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx, params.n_seq_max, params.kv_unified = args.sweep_slot_ctx * level, level, False
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    b = batch.batch
    rates = []
    try:
        for _ in range(args.sweep_reps):
            llama_cpp.llama_memory_clear(ctx.memory, True)
            started = time.perf_counter()
            last, pos = [], []
            for s, prompt in enumerate(sweep_prompts(level)):
                tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
                for i, t in enumerate(tokens):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = t, i, 1, s, i == len(tokens) - 1
                b.n_tokens = len(tokens)
                assert llama_cpp.llama_decode(ctx.ctx, b) == 0
                last.append(_argmax(llama_cpp.llama_get_logits_ith(ctx.ctx, -1), llm.n_vocab()))
                pos.append(len(tokens))
            for _step in range(args.sweep_tokens - 1):
                for s in range(level):
                    b.token[s], b.pos[s], b.n_seq_id[s], b.seq_id[s][0], b.logits[s] = last[s], pos[s], 1, s, True
                    pos[s] += 1
                b.n_tokens = level
                assert llama_cpp.llama_decode(ctx.ctx, b) == 0
                last = [_argmax(llama_cpp.llama_get_logits_ith(ctx.ctx, s), llm.n_vocab()) for s in range(level)]
            rates.append(level * args.sweep_tokens / (time.perf_counter() - started))
    finally:
        batch.close()
        ctx.close()
        llm.close()
    return h.median(rates)


def _argmax(logits: Any, n: int) -> int:
    import numpy as np

    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n,))))


def hf_direct_rate(folder: str, level: int, dtype: str, args: Any) -> float:
    """transformers: one ``model.generate`` over ``level`` left-padded prompts, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval().to(args.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = tok(sweep_prompts(level), return_tensors="pt", padding=True).to(args.device)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # a BERT-style tokenizer adds token types
    rates = []
    with torch.inference_mode():
        for _ in range(args.sweep_reps):
            started = time.perf_counter()
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.sweep_tokens, pad_token_id=pad)
            h.synchronize(args)
            new = out[:, enc["input_ids"].shape[1] :]
            rates.append(int((new != pad).sum()) / (time.perf_counter() - started))
    h.free(model)
    return h.median(rates)


def table(worker: dict[int, dict[str, float]], direct: dict[int, float]) -> str:
    one = worker[min(worker)]
    rows = []
    for level, w in worker.items():
        d = direct.get(level, float("nan"))
        rows.append(
            [
                level,
                h.num(w["rate"]),
                h.ratio(w["rate"], one["rate"]),
                h.num(d),
                h.ratio(d, direct.get(min(worker), float("nan"))),
                h.ratio(w["rate"], d),
                h.ms(w["ttft"]),
                h.ratio(w["ttft"], one["ttft"]),
                h.ms(w["burst"]),
                h.ms(w["itl50"]),
                h.ms(w["itl99"]),
            ]
        )
    return h.markdown_table(
        [
            "streams",
            "worker tok/s",
            "vs 1 stream",
            "library tok/s",
            "vs 1 sequence",
            "worker / library",
            "TTFT under load ms",
            "vs idle",
            "TTFT all sent at once ms",
            "ITL p50 ms",
            "ITL p99 ms",
        ],
        rows,
    )
