"""Streaming generation through the worker vs the backend library called directly.

For each runtime, the direct path and the worker take turns, one generation each
(direct-worker, then worker-direct, ...), never running at the same time; a change in the
machine's speed during the run (other tenants on a shared host) then weighs on both alike:

* ``llama_cpp``, the bundled Gemma-3 270M GGUF:
  - direct: ``Llama(...).create_completion(prompt, stream=True, temperature=0, ...)`` in
    this process, with the worker's settings (n_ctx, n_batch, n_threads, no GPU layers,
    and the sampling arguments the worker passes: top_p=1, top_k=0, min_p=0,
    repeat_penalty=1, which greedy decoding ignores);
  - worker: ``InferenceClient.stream_generate(prompt=..., temperature=0, max_tokens=...)``
    against a worker hosting the same file, timing the Redis stream messages.
* ``transformers``, Gemma-3 270M converted from the same GGUF by
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (needs the ``gguf``
  package; converted once and cached with ``save_pretrained`` under
  ~/.cache/inference-worker-bench/), or with ``--tiny`` the small seeded Llama from
  tests/model_builders.py:
  - direct: ``model.generate(..., do_sample=False, max_new_tokens=..., streamer=TextIteratorStreamer)``;
  - worker: as above, a worker hosting the saved folder.

Per request: time to first token (TTFT: request start to the first piece of text),
decode rate ((completion tokens - 1) / (end - first piece)), end-to-end rate
(completion tokens / total). Medians of R repetitions after a warm-up. The same fixed
prompt every time; both paths evaluate it from scratch each time (the worker resets
the llama.cpp context per request so no output depends on the request before;
``--vary-prompt`` makes every request's prompt different).

With ``--sweep 1,2,4,8`` it then runs a concurrency sweep (bench/_sweep.py): that many
streams at once against a worker whose model has ``parallel`` set to the highest level,
for each backend (transformers in each of ``--hf-dtypes``), against one stream and
against the library called directly with the same concurrency; TTFT of a request that
arrives while the others decode; inter-token latency p50 and p99.

Run by hand (not a test)::

    python bench/bench_generate.py --write
    python bench/bench_generate.py --tiny --write    # without the gguf package
    python bench/bench_generate.py --only-sweep --sweep 1,2,4,8 --write
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
import _sweep  # noqa: E402

PROMPT = (
    "The following is a short article about the history of the bicycle, written for a general audience.\n\nThe bicycle"
)
LLAMA_SAMPLING = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}  # what the worker passes


class Run:
    """One timed generation."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: float | None = None
        self.end = start
        self.pieces: list[str] = []
        self.tokens = 0

    def piece(self, text: str) -> None:
        if text:
            if self.first is None:
                self.first = time.perf_counter()
            self.pieces.append(text)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def ttft(self) -> float:
        return (self.first if self.first is not None else self.end) - self.start

    @property
    def total(self) -> float:
        return self.end - self.start

    @property
    def decode_rate(self) -> float:
        if self.first is None or self.tokens < 2 or self.end <= self.first:
            return float("nan")
        return (self.tokens - 1) / (self.end - self.first)

    @property
    def e2e_rate(self) -> float:
        return self.tokens / self.total if self.total > 0 else float("nan")


def prompts(args: Any) -> list[str]:
    """The warm-up prompts, then the timed ones."""
    n = args.warmup + args.reps
    if args.vary_prompt:
        return [f"Request {i}. {args.prompt}" for i in range(n)]
    return [args.prompt] * n


# -- llama.cpp ------------------------------------------------------------------------------


@contextmanager
def llama_direct(path: str, args: Any) -> Iterator[Callable[[str], Run]]:
    from models.gguf import open_llama  # Llama(), with the worker's choice of kernels (AMX)

    llm = open_llama(
        path, n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=args.n_threads, n_gpu_layers=0, verbose=False
    )
    try:

        def one(prompt: str) -> Run:
            run = Run(time.perf_counter())
            llm.reset()  # as the worker does: every prompt evaluated from scratch
            chunks = llm.create_completion(
                prompt=prompt, stream=True, temperature=0.0, max_tokens=args.max_tokens, **LLAMA_SAMPLING
            )
            for chunk in chunks:
                text = chunk["choices"][0].get("text") or ""
                if text:
                    run.tokens += 1  # one chunk per token (llama-cpp holds back only split UTF-8)
                run.piece(text)
            run.end = time.perf_counter()
            return run

        yield one
    finally:
        llm.close()


@contextmanager
def worker_stream(
    alias: str, spec: dict[str, Any], args: Any, workdir: Path, label: str
) -> Iterator[Callable[[str], Run]]:
    spec = {**spec, "queue": h.unique(f"gen-{label}")}
    models = {alias: spec}
    if args.with_encoder:  # a mixed worker: MiniLM loaded and warmed beside the generation model, idle
        models["minilm"] = {"task": "embed", "source": h.minilm_path(), "queue": h.unique(f"embed-{label}")}
    client = h.client(args.redis_url, timeouts={"generate": args.task_timeout})
    settings: dict[str, Any] = {"concurrency": 1}
    if args.threads:
        settings["threads_per_worker"] = args.threads
    try:
        with h.running_worker(
            f"gen-{label}",
            models,
            redis_url=args.redis_url,
            workdir=workdir,
            boot_timeout=args.boot_timeout,
            **settings,
        ) as worker:

            def one(prompt: str) -> Run:
                run = Run(time.perf_counter())
                for msg in client.stream_generate(
                    alias,
                    queue=spec["queue"],
                    timeout=args.task_timeout,
                    prompt=prompt,
                    max_tokens=args.max_tokens,
                    temperature=0.0,
                ):
                    if msg["type"] == "token":
                        run.piece(msg["text"])
                    elif msg["type"] == "end":
                        run.tokens = int(msg["usage"]["completion_tokens"])
                    else:
                        raise RuntimeError(f"stream error: {msg.get('error')}\n{worker.log_tail()}")
                run.end = time.perf_counter()
                return run

            yield one
    finally:
        client.close()


def interleaved(
    direct: Callable[[str], Run], worker: Callable[[str], Run], args: Any, label: str
) -> tuple[list[Run], list[Run]]:
    """Both paths in turns (direct-worker, worker-direct, ...), so that a change in the
    machine's speed during the run (other tenants, clocks) weighs on both alike."""
    h.log(f"{label}: {args.warmup}+{args.reps} generations of {args.max_tokens} tokens per path, interleaved")
    d: list[Run] = []
    w: list[Run] = []
    for i, prompt in enumerate(prompts(args)):
        order = [(direct, d), (worker, w)]
        for fn, runs in order if i % 2 == 0 else order[::-1]:
            runs.append(fn(prompt))
    return d[args.warmup :], w[args.warmup :]


# -- transformers ---------------------------------------------------------------------------


def gemma_hf_folder(gguf: str) -> Path:
    """Gemma-3 270M as a transformers folder, converted from the GGUF once and cached."""
    src = Path(gguf)
    target = h.CACHE_DIR / f"gemma3-270m-from-gguf-{src.stat().st_size}"
    if (target / ".complete").exists():
        return target
    try:
        import gguf as _gguf  # noqa: F401  # transformers' GGUF loader needs it
    except ImportError:
        raise SystemExit(
            "bench_generate: converting the Gemma GGUF for transformers needs the `gguf` package "
            "(pip install gguf; accelerate is already a dev dependency), or run with --tiny for the "
            "small seeded LM, or --runtimes llama_cpp"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    h.log(f"converting {src.name} to a transformers folder (about a minute; cached in {target})")
    tmp = target.with_name(target.name + f".tmp-{h.RUN_ID}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        extra: dict[str, Any] = {}
        try:  # transformers >= 5 may keep GGUF blocks packed: ask for a plain dense model
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32, **extra)
        # the weights are plain float32 tensors now: drop the GGUF loader's marks, which forbid
        # save_pretrained, so the folder is an ordinary transformers checkpoint
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"from {src}\n")
        del model, tokenizer
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    h.free()
    return target


@contextmanager
def hf_direct(folder: str, args: Any) -> Iterator[Callable[[str], Run]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)

    def one(prompt: str) -> Run:
        run = Run(time.perf_counter())
        enc = tok(prompt, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=args.task_timeout)
        out: dict[str, Any] = {}

        def gen() -> None:
            try:
                with torch.inference_mode():
                    out["seq"] = model.generate(
                        **inputs, do_sample=False, max_new_tokens=args.max_tokens, streamer=streamer, pad_token_id=pad
                    )
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                out["error"] = exc
                streamer.end()

        thread = threading.Thread(target=gen, daemon=True)
        thread.start()
        for piece in streamer:
            run.piece(piece)
        thread.join(args.task_timeout)
        run.end = time.perf_counter()
        if "error" in out:
            raise out["error"]
        new = out["seq"][0, inputs["input_ids"].shape[1] :]
        run.tokens = int(new.shape[0]) - (1 if new.shape[0] and int(new[-1]) in eos_ids else 0)
        return run

    yield one


# -- report ---------------------------------------------------------------------------------


def stats(runs: list[Run]) -> dict[str, float]:
    return {
        "ttft": h.median([r.ttft for r in runs]),
        "decode": h.median([r.decode_rate for r in runs]),
        "e2e": h.median([r.e2e_rate for r in runs]),
        "total": h.median([r.total for r in runs]),
        "tokens": h.median([r.tokens for r in runs]),
    }


def section(runtime: str, model: str, direct_label: str, direct: list[Run], worker: list[Run]) -> str:
    d, w = stats(direct), stats(worker)
    same = sum(a.text == b.text for a, b in zip(direct, worker, strict=True))
    rows = [
        [
            direct_label,
            h.ms(d["ttft"]),
            h.num(d["decode"]),
            h.num(d["e2e"]),
            f"{d['total']:.3f}",
            h.num(d["tokens"], 0),
        ],
        [
            "worker, `stream_generate`",
            h.ms(w["ttft"]),
            h.num(w["decode"]),
            h.num(w["e2e"]),
            f"{w['total']:.3f}",
            h.num(w["tokens"], 0),
        ],
    ]
    table = h.markdown_table(
        ["path", "TTFT ms", "decode tok/s", "end-to-end tok/s", "total s", "completion tokens"], rows
    )
    ratios = h.markdown_table(
        ["worker vs direct", "value"],
        [
            ["decode tok/s ratio (worker / direct)", h.ratio(w["decode"], d["decode"])],
            ["end-to-end tok/s ratio (worker / direct)", h.ratio(w["e2e"], d["e2e"])],
            ["TTFT difference (worker - direct)", f"{(w['ttft'] - d['ttft']) * 1000:+.2f} ms"],
        ],
    )
    return f"""### {runtime}: {model}

{table}

{ratios}

Same text as the direct call in {same} of {len(direct)} repetitions (greedy decoding).
"""


def main() -> None:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per generation")
    p.add_argument("--reps", type=int, default=7, help="timed generations per path (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations first")
    p.add_argument("--prompt", default=PROMPT, help="the prompt (raw completion)")
    p.add_argument("--vary-prompt", action="store_true", help="a different prompt per request")
    p.add_argument("--n-threads", type=int, default=os.cpu_count(), help="llama.cpp threads (both paths)")
    p.add_argument("--n-ctx", type=int, default=1024, help="llama.cpp context (both paths)")
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp batch (both paths)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the worker (threads_per_worker)")
    p.add_argument("--runtimes", default="llama_cpp,transformers", help="comma-separated: llama_cpp, transformers")
    p.add_argument("--tiny", action="store_true", help="transformers: the small seeded LM instead of converted Gemma")
    p.add_argument(
        "--with-encoder", action="store_true", help="the worker also hosts MiniLM (embed), idle: a mixed CPU worker"
    )
    p.add_argument("--task-timeout", type=float, default=600.0, help="seconds one generation may take")
    p.add_argument("--sweep", default="", help="concurrency levels for the sweep, e.g. 1,2,4,8 (default: no sweep)")
    p.add_argument("--only-sweep", action="store_true", help="skip the one-stream comparison")
    p.add_argument("--sweep-tokens", type=int, default=64, help="sweep: max_tokens per stream")
    p.add_argument("--sweep-reps", type=int, default=3, help="sweep: repetitions per level (the median is reported)")
    p.add_argument("--sweep-slot-ctx", type=int, default=512, help="sweep: llama.cpp context per slot")
    p.add_argument(
        "--hf-dtypes", default="float32,bfloat16", help="sweep: transformers dtypes, comma-separated (float16 on a GPU)"
    )
    args = p.parse_args()
    args.levels = sorted({int(x) for x in args.sweep.split(",") if x.strip()})
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = set(runtimes) - {"llama_cpp", "transformers"}
    if unknown or not runtimes:
        p.error(f"--runtimes: unknown {sorted(unknown)}")
    h.check_redis(args.redis_url)

    gguf = h.gguf_path()
    hf_folder: str | None = None
    with h.workdir(args) as wd:
        if "transformers" in runtimes:  # prepare first: fail before any measurement
            if args.tiny:
                from tests.model_builders import build_tiny_causal_lm

                hf_folder = build_tiny_causal_lm(h.minilm_path(), wd / "lms", chat_template=False)
            else:
                hf_folder = str(gemma_hf_folder(gguf))
        parts = []
        if args.levels:
            sweep = run_sweep(runtimes, gguf, hf_folder, args, wd)
        if args.only_sweep:
            runtimes = []
        if "llama_cpp" in runtimes:
            spec = {
                "task": "generate",
                "source": gguf,
                "backend": "llama_cpp",
                "n_ctx": args.n_ctx,
                "n_batch": args.n_batch,
                "n_threads": args.n_threads,
                "n_gpu_layers": 0,
            }
            with worker_stream("gemma", spec, args, wd, "llama") as served, llama_direct(gguf, args) as direct:
                direct_runs, served_runs = interleaved(direct, served, args, "llama.cpp")
            parts.append(
                section(
                    "llama.cpp",
                    f"Gemma-3 270M Q4_K_M GGUF, n_threads {args.n_threads}, n_ctx {args.n_ctx}",
                    "direct `create_completion(stream=True)`",
                    direct_runs,
                    served_runs,
                )
            )
            h.free()
        if "transformers" in runtimes:
            assert hf_folder is not None
            spec = {"task": "generate", "source": hf_folder, "backend": "transformers", "dtype": "float32"}
            with worker_stream("lm", spec, args, wd, "hf") as served, hf_direct(hf_folder, args) as direct:
                direct_runs, served_runs = interleaved(direct, served, args, "transformers")
            h.free()
            model = (
                "tiny seeded Llama (tests/model_builders.py)" if args.tiny else "Gemma-3 270M from the GGUF, float32"
            )
            parts.append(
                section(
                    "transformers",
                    model,
                    "direct `generate(streamer=TextIteratorStreamer)`",
                    direct_runs,
                    served_runs,
                )
            )

    body = (
        f"Prompt: {len(args.prompt)} characters, raw completion, temperature 0, max_tokens {args.max_tokens}, "
        f"median of {args.reps} per path after {args.warmup} warm-up, the two paths taking turns"
        f"{'; a different prompt per request' if args.vary_prompt else ''}.\n"
        "TTFT: request start to the first piece of text (through the worker: send, queue, task start, "
        "prompt, first token, Redis pub/sub). Decode: (completion tokens - 1) / (end - first piece). "
        "The worker's numbers include its cancellation checks, its token counting and the reader "
        "(this process) sharing the machine's cores."
        + (" The worker also hosts MiniLM (embed), loaded and idle." if args.with_encoder else "")
        + "\n\n"
        + "\n".join(parts)
    )
    if parts:
        h.report("bench_generate", "Generate: worker streaming vs the library directly", body, args)
    if args.levels:
        name = "bench_generate-sweep" + ("" if args.device == "cpu" else f"-{args.device.split(':')[0]}")
        where = "" if args.device == "cpu" else f" ({args.device})"
        h.report(name, f"Generate: many streams at once (continuous batching){where}", sweep, args)


def run_sweep(runtimes: list[str], gguf: str, hf_folder: str | None, args: Any, wd: Path) -> str:
    parallel = max(args.levels)
    gpu_layers = -1 if args.device.startswith("cuda") else 0  # every layer on the GPU, or none
    parts = []
    backends: list[tuple[str, str, dict[str, Any], Callable[[int], float]]] = []
    if "llama_cpp" in runtimes:
        spec = {
            "task": "generate",
            "source": gguf,
            "n_ctx": args.sweep_slot_ctx * parallel,
            "n_threads": args.n_threads,
            "n_gpu_layers": gpu_layers,
        }
        backends.append(
            (
                "llama.cpp",
                f"Gemma-3 270M Q4_K_M GGUF, n_threads {args.n_threads}, {args.sweep_slot_ctx} tokens per slot",
                spec,
                lambda level: _sweep.llama_direct_rate(gguf, level, args, gpu_layers),
            )
        )
    if "transformers" in runtimes:
        assert hf_folder is not None
        for dtype in [d.strip() for d in args.hf_dtypes.split(",") if d.strip()]:
            spec = {"task": "generate", "source": hf_folder, "backend": "transformers", "dtype": dtype}
            backends.append(
                (
                    "transformers",
                    f"{'tiny seeded Llama' if args.tiny else 'Gemma-3 270M from the GGUF'}, {dtype}",
                    spec,
                    lambda level, dtype=dtype: _sweep.hf_direct_rate(hf_folder, level, dtype, args),
                )
            )
    for runtime, model, spec, direct_rate in backends:
        spec = {**spec, "parallel": parallel, "max_waiting": 2 * parallel, "queue": h.unique("gen-sweep")}
        client = h.client(args.redis_url, timeouts={"generate": args.task_timeout})
        try:
            with h.running_worker(
                "gen-sweep",
                {"lm": spec},
                redis_url=args.redis_url,
                workdir=wd,
                boot_timeout=args.boot_timeout,
                concurrency=2 * parallel + 2,
                device=args.device,
            ):
                served = _sweep.run_worker_sweep(client, "lm", spec["queue"], args)
        finally:
            client.close()
        h.free()
        direct = {}
        for level in args.levels:
            h.log(f"sweep: {runtime} directly, {level} sequence(s)")
            direct[level] = direct_rate(level)
        parts.append(f"### {runtime}: {model}\n\n{_sweep.table(served, direct)}\n")
    library = (
        "Library: llama.cpp's batch API (one context, that many sequences, one `llama_decode` per step); "
        "transformers' `generate` over that many left-padded prompts."
    )
    return (
        f"Greedy, {args.sweep_tokens} new tokens per stream, a different prompt per stream, median of "
        f"{args.sweep_reps} per level (the worker's levels in turn, once per repetition); the worker's model has `parallel: {parallel}`. Worker tok/s: every "
        "stream's completion tokens over the wall time from the first send to the last end. TTFT under load: a "
        "request sent while the other streams decode, against the same request on an idle worker (the 1-stream "
        "row). TTFT all sent at once: the median over the level's streams, sent together. ITL: gaps between a "
        f"stream's token messages, over every stream. {library}\n\n" + "\n".join(parts)
    )


if __name__ == "__main__":
    main()
