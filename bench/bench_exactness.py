"""How often a model's greedy text under ``parallel: N`` differs from the same request
alone (docs/generation.md, "How often the text differs").

A backend's arithmetic for one row can change with the rows computed beside it, so a
greedy choice between two near-equal tokens can flip. This counts it: P greedy prompts
(default 60), all submitted at once to the model's slots (every slot busy while requests
remain: the most rows per step there can be), each text compared with the backend's for
that prompt alone. Runs the worker's runtime in this process (models/gguf.py or
models/causal_lm.py, with models/continuous.py): no Redis, no worker; what is measured is
the decoding, not the transport.

* ``--backend gguf`` (default): the bundled Gemma 3 270M Q4_K_M; alone is
  ``Llama.create_completion`` on a fresh context, for each setting of llama.cpp's weight
  repacking.
* ``--backend transformers``: Gemma 3 270M converted from the same GGUF
  (bench_generate.py's cached folder), in each of ``--dtypes``; alone is the worker's
  ``parallel: 1`` path, which is ``model.generate(do_sample=False)``. Requests submitted
  together have their prompts evaluated together (one left-padded pass), so this covers
  the batched prompt pass as well as the batched decode.

Run by hand (not a test)::

    python bench/bench_exactness.py --parallel 1,2,3,4,7,8 --weight-repacking on,off --write
    python bench/bench_exactness.py --backend transformers --parallel 2,4,8 --dtypes float32,bfloat16 --write
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

SUBJECTS = [
    "The history of the city of Rome",
    "A recipe for bread",
    "The largest planets",
    "The fishermen of the northern coast",
    "The rules of chess",
    "Boiling water",
    "The old lighthouse keeper",
    "A good night's sleep",
    "The first railway",
    "A walk in the mountains",
    "The invention of paper",
    "The migration of birds",
    "A small village market",
    "The theory of evolution",
    "The city library",
]
N_CTX_SEQ = 1024  # each slot's share of the context, and the oracle's context
OPENINGS = ["{} begins", "{} is a story of", "Everyone knows that {}", "Here is what to know about {}:"]


def prompts(count: int) -> list[str]:
    pairs = itertools.cycle(itertools.product(OPENINGS, SUBJECTS))
    out = []
    for opening, subject in itertools.islice(pairs, count):
        out.append(opening.format(subject if opening.startswith("{}") else subject[0].lower() + subject[1:]))
    return out


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--parallel", default="1,2,3,4,8", help="comma-separated slot counts")
    p.add_argument("--prompts", type=int, default=60, help="greedy prompts per slot count")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per prompt")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument(
        "--weight-repacking",
        default="default",
        help="comma-separated settings of llama.cpp's weight repacking for this CPU, each measured on both "
        "sides: default (the worker's: on, except with a build that uses AMX), on, off",
    )
    p.add_argument("--backend", choices=["gguf", "transformers"], default="gguf")
    p.add_argument("--dtypes", default="float32", help="transformers: comma-separated dtypes")
    args = p.parse_args()
    if args.backend == "transformers":
        transformers_main(args)
        return

    path = h.gguf_path()
    texts = prompts(args.prompts)
    levels = [int(n) for n in args.parallel.split(",")]
    settings = args.weight_repacking.split(",")
    repacking = {"default": None, "on": True, "off": False}
    rows = count_differences(
        settings,
        levels,
        lambda setting, parallel: (
            texts_alone(path, texts, args, repacking[setting])
            if parallel is None
            else texts_batched(path, texts, args, repacking[setting], parallel)
        ),
    )
    body = (
        f"Gemma 3 270M Q4_K_M (llama.cpp's CPU backend), {len(texts)} greedy prompts of 5-12 tokens, "
        f"{args.max_tokens} new tokens each, all submitted at once; how many texts differ from "
        "`create_completion` for the prompt alone (on a fresh context, with the same weight "
        "repacking), and the median point, as a share of the text alone, where a differing text "
        "leaves it.\n\n"
        + h.markdown_table(
            ["`parallel`"] + [f"weight repacking: {s}" for s in settings], rows, "r" * (1 + len(settings))
        )
    )
    h.report("bench_exactness", "Greedy text under `parallel: N` against the request alone (GGUF)", body, args)


def texts_alone(path: str, texts: list[str], args: argparse.Namespace, repacking: bool | None) -> list[str]:
    from models.gguf import open_llama

    oracle = open_llama(path, weight_repacking=repacking, n_ctx=N_CTX_SEQ, n_threads=args.threads, verbose=False)
    alone = []
    for prompt in texts:
        oracle.reset()
        out = oracle.create_completion(
            prompt, max_tokens=args.max_tokens, temperature=0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0
        )
        alone.append(out["choices"][0]["text"])
    h.free(oracle)
    return alone


def texts_batched(
    path: str, texts: list[str], args: argparse.Namespace, repacking: bool | None, parallel: int
) -> list[str]:
    """Every prompt submitted at once to the worker's GGUF runtime with that many slots."""
    from models.gguf import GGUFRuntime
    from models.options import GGUFOptions

    options = GGUFOptions(
        parallel=parallel,
        max_waiting=len(texts),
        n_ctx=N_CTX_SEQ * parallel,
        n_threads=args.threads,
        weight_repacking=repacking,
    )
    return all_at_once(GGUFRuntime("gemma", path, "cpu", options), texts, args)


def all_at_once(runtime: Any, texts: list[str], args: argparse.Namespace) -> list[str]:
    """Load ``runtime``, submit every prompt to it at once, gather the texts, close it."""
    from models.generation import GenerationControl, GenerationParams

    runtime.load()
    params = [GenerationParams(prompt=t, max_tokens=args.max_tokens, temperature=0.0) for t in texts]
    try:
        with ThreadPoolExecutor(len(params)) as pool:
            return [r.text for r in pool.map(lambda p: runtime.generate(p, GenerationControl()), params)]
    finally:
        runtime.close()
        h.free(runtime)


def transformers_main(args: argparse.Namespace) -> None:
    from bench_generate import gemma_hf_folder

    folder = str(gemma_hf_folder(h.gguf_path()))
    texts = prompts(args.prompts)
    levels = [int(n) for n in args.parallel.split(",")]
    dtypes = args.dtypes.split(",")
    rows = count_differences(
        dtypes, levels, lambda dtype, parallel: hf_texts(folder, texts, args, dtype, parallel or 1)
    )
    body = (
        f"Gemma 3 270M (converted from the GGUF, transformers on the CPU), {len(texts)} greedy prompts of "
        f"5-12 tokens, {args.max_tokens} new tokens each, all submitted at once (each step's new prompts "
        "evaluated together in one left-padded pass, then decoded as rows of one cache); how many texts "
        "differ from the same runtime with `parallel: 1` (`model.generate`), and the median point, as a "
        "share of the text alone, where a differing text leaves it.\n\n"
        + h.markdown_table(["`parallel`"] + list(dtypes), rows, "r" * (1 + len(dtypes)))
    )
    h.report(
        "bench_exactness_transformers",
        "Greedy text under `parallel: N` against the request alone (transformers)",
        body,
        args,
    )


def count_differences(
    settings: list[str], levels: list[int], texts: Callable[[str, int | None], list[str]]
) -> list[list[Any]]:
    """A table's rows: for each level, in each setting, how many of ``texts(setting, level)``
    differ from ``texts(setting, None)`` (the requests alone)."""
    counts: dict[tuple[str, int], str] = {}
    for setting in settings:
        alone = texts(setting, None)
        for parallel in levels:
            counts[setting, parallel] = differing(texts(setting, parallel), alone)
            h.log(f"{setting}, parallel {parallel}: {counts[setting, parallel]} differ")
    return [[parallel] + [counts[s, parallel] for s in settings] for parallel in levels]


def differing(results: list[str], alone: list[str]) -> str:
    differ = [(r, a) for r, a in zip(results, alone, strict=True) if r != a]
    where = sorted(common_prefix(r, a) * 100 // max(len(a), 1) for r, a in differ)
    parts = f" (parts at {where[len(where) // 2]}%)" if where else ""
    return f"{len(differ)} of {len(results)}{parts}"


def hf_texts(folder: str, texts: list[str], args: argparse.Namespace, dtype: str, parallel: int) -> list[str]:
    """Every prompt submitted at once to the worker's transformers runtime with that many
    slots (with 1, each runs ``model.generate`` in turn)."""
    from models.causal_lm import CausalLMRuntime
    from models.options import CausalLMOptions

    options = CausalLMOptions(parallel=parallel, max_waiting=len(texts), dtype=dtype)
    return all_at_once(CausalLMRuntime("gemma", folder, "cpu", options), texts, args)


if __name__ == "__main__":
    main()
