"""Rerank and NER through the worker vs the libraries called directly.

The models are the seeded test heads on the bundled MiniLM (tests/model_builders.py):
real encoder weights and tokenizer, so the cost is that of a MiniLM-L6 cross-encoder and
token classifier. Measured in one run, the paths of a task taking turns (never two at once):

* rerank of D documents against one query (default 100):
  - one ``rerank`` request through the worker;
  - the one-pair-at-a-time loop on the raw HF model (AutoModelForSequenceClassification,
    a batch of 1 per pair, sigmoid of the logit);
  - ``sentence_transformers.CrossEncoder(path).predict(pairs)`` (its default batch size);
* rerank of P passages of 107-289 tokens (default 64), the length of retrieved passages
  in a RAG pipeline: the same three paths, and a second worker with ``retain_memory:
  true`` (worker/memory.py), with each worker's page faults per request;
* ner of T texts (default 32):
  - one ``ner`` request with the list, through the worker;
  - ``pipeline("token-classification", aggregation_strategy="simple")`` called once per text;
  - the same pipeline given the whole list (its default batch size, and batch_size=T).

Each number is the median of R rounds (after a warm-up round). Run by hand (not a test)::

    python bench/bench_rerank_ner.py --write
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

QUERY = "How can I repair a broken umbrella without special tools?"
TOPICS = [
    "umbrella",
    "bicycle",
    "garden hose",
    "kitchen tap",
    "laptop hinge",
    "zipper",
    "wooden chair",
    "tent pole",
    "shoe sole",
    "window blind",
    "desk lamp",
    "backpack strap",
]
ACTIONS = ["repair", "replace", "clean", "store", "fold", "buy", "recycle", "inspect", "protect", "adjust"]
DETAILS = [
    "with tape and a bit of wire",
    "using only household tools",
    "in under ten minutes",
    "after it has been damaged by wind",
    "before winter starts",
    "when a part has snapped",
    "without voiding the warranty",
    "the way professionals do it",
    "on a tight budget",
]
EXTRAS = [
    "",
    " Most people skip this step.",
    " A spare part costs very little.",
    " The manual describes it on page twelve.",
    " Safety glasses are a good idea.",
    " It works for most models sold in the last decade.",
]

FIRST = ["Maria", "Peter", "Aiko", "Olu", "Jean", "Sofia", "Rahul", "Ingrid", "Carlos", "Mei"]
LAST = ["Lopez", "Schmidt", "Tanaka", "Adeyemi", "Dupont", "Rossi", "Sharma", "Larsen", "Silva", "Chen"]
PLACES = ["Madrid", "Berlin", "Osaka", "Lagos", "Lyon", "Milan", "Mumbai", "Oslo", "Lisbon", "Shanghai"]
EVENTS = [
    "the annual science fair",
    "a trade conference",
    "the city marathon",
    "a jazz festival",
    "the board meeting",
    "a cooking class",
]


def make_documents(n: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [
        f"How to {rng.choice(ACTIONS)} a {rng.choice(TOPICS)} {rng.choice(DETAILS)}.{rng.choice(EXTRAS)}"
        for _ in range(n)
    ]


def make_passages(n: int, seed: int = 3) -> list[str]:
    """Passages of 6-14 of the short documents each: 107-289 tokens as pairs with QUERY."""
    rng = random.Random(seed)
    pool = make_documents(400)
    return [" ".join(rng.sample(pool, rng.randint(6, 14))) for _ in range(n)]


def make_ner_texts(n: int, seed: int = 13) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        b = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        out.append(
            f"{a} flew from {rng.choice(PLACES)} to {rng.choice(PLACES)} for {rng.choice(EVENTS)}, "
            f"where {b} was waiting with the tickets."
        )
    return out


def encoder_flops(config: Any, lengths: list[int]) -> tuple[float, float]:
    """Floating-point operations of a BERT-style encoder over sequences of these lengths,
    unpadded: per layer and token the Q, K, V and output projections and the two
    feed-forward matrices, plus the attention products QK^T and AV (the head is negligible).

    Returns (all of it, the least a score needs): a score reads only the [CLS] row of the
    last layer, so there the other rows need only their K and V projections."""
    hidden, inter = config.hidden_size, config.intermediate_size
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * inter)
    full = config.num_hidden_layers * sum(n * per_token + 4 * n * n * hidden for n in lengths)
    unread = sum((n - 1) * (2 * (2 * hidden * hidden + 2 * hidden * inter) + 4 * n * hidden) for n in lengths)
    return full, full - unread


def gemm_paths(config: Any, rows: int, args: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """The device's GEMM at its best, as paths for ``timed_in_turns`` and their FLOPs: the
    model's feed-forward pair of matrices with ``rows`` rows (every token of the request in
    one product, the most favourable shape the model has) and a 1024x1024 square. On the CPU
    with torch (MKL in float32), with oneDNN's linear (which the worker may pick) and in
    float32 with numpy (its bundled OpenBLAS); on a GPU with torch; all in the benchmark's
    dtype."""
    import numpy as np
    import torch

    hidden, inter = config.hidden_size, config.intermediate_size
    rng = np.random.default_rng(0)
    x, w1, w2 = (rng.standard_normal(s, dtype=np.float32) for s in ((rows, hidden), (hidden, inter), (inter, hidden)))
    a, b = (rng.standard_normal((1024, 1024), dtype=np.float32) for _ in range(2))
    on_gpu = args.device != "cpu"
    dtype = h.torch_dtype(args)
    tx, tw1, tw2, ta, tb = (torch.from_numpy(m).to(args.device, dtype) for m in (x, w1, w2, a, b))

    def repeat(fn: Any) -> Any:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(4):
                    fn()
            h.synchronize(args)

        return run

    paths = {
        "torch ffn": repeat(lambda: torch.mm(torch.mm(tx, tw1), tw2)),
        "torch square": repeat(lambda: torch.mm(ta, tb)),
    }
    if not on_gpu:  # numpy: float32 only
        from models.packed import available_linears

        if "onednn" in available_linears():
            linear = torch.ops.mkldnn._linear_pointwise  # x @ w.T, w as [out, in]
            ow1, ow2, ob = (m.t().contiguous() for m in (tw1, tw2, tb))
            paths["onednn ffn"] = repeat(
                lambda: linear(linear(tx, ow1, None, "none", [], ""), ow2, None, "none", [], "")
            )
            paths["onednn square"] = repeat(lambda: linear(ta, ob, None, "none", [], ""))
        if dtype == torch.float32:
            paths["numpy ffn"] = repeat(lambda: (x @ w1) @ w2)
            paths["numpy square"] = repeat(lambda: a @ b)
    ffn, square = 4 * 2 * 2.0 * rows * hidden * inter, 4 * 2.0 * 1024**3
    return paths, {name: ffn if name.endswith("ffn") else square for name in paths}


def measure(
    paths: dict[str, str], docs: list[str], texts: list[str], passages: list[str], args: Any, workdir: Path
) -> dict[str, Any]:
    """Every path of a task in turns (rounds of worker, raw loop, library batched call)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    dtype, device = h.torch_dtype(args), args.device
    tok = AutoTokenizer.from_pretrained(paths["reranker"])
    hf = AutoModelForSequenceClassification.from_pretrained(paths["reranker"], dtype=dtype).to(device).eval()
    ce = CrossEncoder(paths["reranker"], device=device, model_kwargs={"dtype": dtype})
    pipe = pipeline(
        "token-classification", model=paths["ner"], aggregation_strategy="simple", device=device, dtype=dtype
    )
    pairs = [(QUERY, d) for d in docs]

    def loop_pairs(documents: list[str] = docs) -> list[float]:
        """The raw HF model, one (query, document) pair per forward pass."""
        scores = []
        with torch.inference_mode():
            for doc in documents:
                enc = tok(QUERY, doc, return_tensors="pt", truncation=True).to(device)
                scores.append(float(torch.sigmoid(hf(**enc).logits[0, 0])))
        return scores

    models = {
        "reranker": {"task": "rerank", "source": paths["reranker"], "queue": h.unique("rerank"), "dtype": args.dtype},
        "ner": {"task": "ner", "source": paths["ner"], "queue": h.unique("ner"), "dtype": args.dtype},
    }
    settings: dict[str, Any] = {"concurrency": args.concurrency, "device": device}
    if args.threads:
        settings["threads_per_worker"] = args.threads
    client = h.client(args.redis_url)
    out: dict[str, Any] = {}
    try:
        with h.running_worker(
            "rerank-ner", models, redis_url=args.redis_url, workdir=workdir, boot_timeout=args.boot_timeout, **settings
        ) as worker:
            rq, nq = models["reranker"]["queue"], models["ner"]["queue"]
            h.log(f"rerank, {len(docs)} documents: worker, one-pair loop, CrossEncoder in turns, {args.reps} rounds")
            out["rerank"] = h.timed_in_turns(
                {
                    "worker": lambda: client.rerank("reranker", QUERY, docs, queue=rq, timeout=args.task_timeout),
                    "loop": loop_pairs,
                    "ce": lambda: ce.predict(pairs, show_progress_bar=False),
                },
                args.reps,
                args.warmup,
            )
            lengths = [len(tok(QUERY, d, truncation=True)["input_ids"]) for d in docs]
            gemm, gemm_flops = gemm_paths(hf.config, sum(lengths), args)
            h.log(f"the device's GEMM peak, {args.reps} rounds")
            out["gemm"] = h.timed_in_turns(gemm, args.reps, args.warmup)
            out["gemm_flops"] = gemm_flops
            out["rerank_flops"], out["rerank_flops_needed"] = encoder_flops(hf.config, lengths)
            out["rerank_tokens"] = sum(lengths)
            result = client.rerank("reranker", QUERY, docs, queue=rq, timeout=args.task_timeout)
            scores = [0.0] * len(docs)
            for item in result["results"]:
                scores[item["index"]] = item["relevance_score"]
            out["rerank_scores"] = scores
            out["ce_scores"] = [float(x) for x in ce.predict(pairs, show_progress_bar=False)]
            if dtype != torch.float32:  # what the dtype costs: the same pairs in float32
                ce32 = CrossEncoder(paths["reranker"], device=device, model_kwargs={"dtype": torch.float32})
                out["ce32_scores"] = [float(x) for x in ce32.predict(pairs, show_progress_bar=False)]
                del ce32

            h.log(f"ner, {len(texts)} texts: worker and the pipeline's three ways in turns, {args.reps} rounds")
            out["ner"] = h.timed_in_turns(
                {
                    "worker": lambda: client.ner("ner", texts, queue=nq, timeout=args.task_timeout),
                    "loop": lambda: [pipe(t) for t in texts],
                    "list": lambda: pipe(texts),
                    "list_batched": lambda: pipe(texts, batch_size=len(texts)),
                },
                args.reps,
                args.warmup,
            )
            out["ner_entities"] = client.ner("ner", texts, queue=nq, timeout=args.task_timeout)["entities"]
            out["ner_ref"] = [pipe(t) for t in texts]

            if passages:
                out["passage_lengths"] = [len(tok(QUERY, d, truncation=True)["input_ids"]) for d in passages]
                out.update(
                    measure_passages(worker, models["reranker"], client, ce, loop_pairs, passages, args, workdir)
                )
    finally:
        client.close()
    return out


def measure_passages(
    worker: Any,
    spec: dict[str, Any],
    client: Any,
    ce: Any,
    loop_pairs: Any,
    passages: list[str],
    args: Any,
    workdir: Path,
) -> dict[str, Any]:
    """The long-passage rerank: the worker above, a second one with ``retain_memory:
    true``, the one-pair loop and ``CrossEncoder.predict``, in turns; and each worker's
    minor page faults per request over the timed rounds."""
    settings: dict[str, Any] = {"concurrency": args.concurrency, "device": args.device, "retain_memory": True}
    if args.threads:
        settings["threads_per_worker"] = args.threads
    spec_retained = {**spec, "queue": h.unique("rerank-retained")}
    faults = {"worker": 0, "worker_retained": 0}
    out: dict[str, Any] = {}
    with h.running_worker(
        "rerank-retained",
        {"reranker": spec_retained},
        redis_url=args.redis_url,
        workdir=workdir,
        boot_timeout=args.boot_timeout,
        **settings,
    ) as worker_retained:
        processes = {"worker": (worker, spec["queue"]), "worker_retained": (worker_retained, spec_retained["queue"])}

        def call(name: str) -> Any:
            process, queue = processes[name]

            def run() -> None:
                before = process.minor_faults()
                client.rerank("reranker", QUERY, passages, queue=queue, timeout=args.task_timeout)
                faults[name] += process.minor_faults() - before

            return run

        pairs = [(QUERY, d) for d in passages]
        h.log(f"rerank, {len(passages)} passages: two workers, one-pair loop, CrossEncoder in turns")
        out["passages"] = h.timed_in_turns(
            {
                "worker": call("worker"),
                "worker_retained": call("worker_retained"),
                "loop": lambda: loop_pairs(passages),
                "ce": lambda: ce.predict(pairs, show_progress_bar=False),
            },
            args.passage_reps,
            args.warmup,
        )
    rounds = args.warmup + args.passage_reps
    out["passage_faults"] = {name: count / rounds for name, count in faults.items()}
    return out


def ner_mismatches(ours: list[list[dict[str, Any]]], ref: list[list[dict[str, Any]]]) -> tuple[int, float]:
    """Texts whose spans/labels differ from the pipeline's, and the largest score difference."""
    bad, worst = 0, 0.0
    for mine, theirs in zip(ours, ref, strict=True):
        a = [(e["start"], e["end"], e["label"]) for e in mine]
        b = [(e["start"], e["end"], e["entity_group"]) for e in theirs]
        if a != b:
            bad += 1
        else:
            worst = max([worst] + [abs(x["score"] - float(y["score"])) for x, y in zip(mine, theirs, strict=True)])
    return bad, worst


def main() -> None:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=100, help="documents in the rerank request")
    p.add_argument("--texts", type=int, default=32, help="texts in the ner request")
    p.add_argument("--passages", type=int, default=64, help="passages in the long-passage rerank request (0: skip it)")
    p.add_argument("--passage-reps", type=int, default=5, help="timed repetitions of the long-passage rerank")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--concurrency", type=int, default=8, help="worker pool threads")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the worker (threads_per_worker)")
    p.add_argument("--task-timeout", type=float, default=300.0, help="seconds to wait for one result")
    args = p.parse_args()
    h.check_redis(args.redis_url)

    from tests.model_builders import build_test_models

    docs = make_documents(args.documents)
    texts = make_ner_texts(args.texts)
    passages = make_passages(args.passages)
    with h.workdir(args) as wd:
        h.log("building the test rerank/ner models from the bundled MiniLM")
        paths = build_test_models(h.minilm_path(), wd / "models")
        res = measure(paths, docs, texts, passages, args, wd)
    rr, nr = res["rerank"], res["ner"]

    headers = ["path", "median ms", "min ms", "items/s", "speedup vs one-at-a-time", "time / worker's"]

    def table(rows: list[tuple[str, list[float]]], loop: list[float], ours: list[float], items: int) -> str:
        out = []
        for label, samples in rows:
            m = h.median(samples)
            out.append(
                [
                    label,
                    h.ms(m),
                    h.ms(min(samples)),
                    h.num(items / m),
                    h.ratio(h.median(loop), m),
                    h.ratio(m, h.median(ours)),
                ]
            )
        return h.markdown_table(headers, out)

    rerank_table = table(
        [
            ("worker: one `rerank` request", rr["worker"]),
            ("HF model, one pair at a time (batch 1)", rr["loop"]),
            ("CrossEncoder.predict(pairs)", rr["ce"]),
        ],
        rr["loop"],
        rr["worker"],
        args.documents,
    )
    ner_table = table(
        [
            ("worker: one `ner` request with the list", nr["worker"]),
            ("pipeline, one text at a time", nr["loop"]),
            ("pipeline(list) (default batch size)", nr["list"]),
            (f"pipeline(list, batch_size={args.texts})", nr["list_batched"]),
        ],
        nr["loop"],
        nr["worker"],
        args.texts,
    )

    flops = res["rerank_flops"]
    peak = max(res["gemm_flops"][k] / h.median(res["gemm"][k]) for k in res["gemm"])
    gemm_rates = ", ".join(
        f"{name} {h.num(res['gemm_flops'][name] / h.median(times) / 1e9)}" for name, times in res["gemm"].items()
    )
    needed = res["rerank_flops_needed"]
    floor = needed / peak
    loop_m = h.median(rr["loop"])

    def rate(seconds: float) -> str:
        return h.num(flops / seconds / 1e9)

    bound = f"""### Rerank: the compute bound

The {args.documents} pairs are {res["rerank_tokens"]:,} tokens: {flops / 1e9:.1f} GFLOP for the whole model, unpadded, counted
from its config. A score reads only the last layer's [CLS] row, so the least any implementation
must compute is {needed / 1e9:.1f} GFLOP. This device's {args.dtype} GEMM at its best, medians of {args.reps} in the same
run, in GFLOP/s: {gemm_rates} (ffn: the model's feed-forward matrices with all
{res["rerank_tokens"]:,} tokens as rows; square: 1024x1024). With every operation at the best of these rates, the pairs would take
{h.ms(floor)} ms. So no implementation of this model in this dtype using these libraries can beat the
one-pair loop's median ({h.ms(loop_m)} ms) by more than **{loop_m / floor:.2f}x**.

| path | GFLOP/s (the whole model's count) | time / that least time |
| :-- | --: | --: |
| HF model, one pair at a time | {rate(loop_m)} | {loop_m / floor:.2f}x |
| CrossEncoder.predict(pairs) | {rate(h.median(rr["ce"]))} | {h.median(rr["ce"]) / floor:.2f}x |
| worker: one `rerank` request (send to result) | {rate(h.median(rr["worker"]))} | {h.median(rr["worker"]) / floor:.2f}x |
"""

    score_diff = max(abs(a - b) for a, b in zip(res["rerank_scores"], res["ce_scores"], strict=True))
    if "ce32_scores" in res:
        diffs = [
            max(abs(a - b) for a, b in zip(res[k], res["ce32_scores"], strict=True))
            for k in ("rerank_scores", "ce_scores")
        ]
        vs_float32 = (
            f"\nIn {args.dtype}, against `CrossEncoder.predict` in float32: the worker's scores differ by up to "
            f"{diffs[0]:.2e}, the library's own in {args.dtype} by up to {diffs[1]:.2e}."
        )
    else:
        vs_float32 = ""
    passages_part = ""
    if "passages" in res:
        pr = res["passages"]
        passage_table = table(
            [
                ("worker: one `rerank` request", pr["worker"]),
                ("worker, `retain_memory: true`", pr["worker_retained"]),
                ("HF model, one pair at a time (batch 1)", pr["loop"]),
                ("CrossEncoder.predict(pairs)", pr["ce"]),
            ],
            pr["loop"],
            pr["worker"],
            args.passages,
        )
        pf = res["passage_faults"]
        lengths = res["passage_lengths"]
        passages_part = f"""### Rerank: {args.passages} passages, one query (median of {args.passage_reps})

The passages are {sum(lengths):,} tokens as pairs with the query, {min(lengths)}-{max(lengths)} each.

{passage_table}

Minor page faults per request in the worker process: {pf["worker"]:,.0f} (default),
{pf["worker_retained"]:,.0f} (`retain_memory: true`). Two workers run side by side, one
request at a time.

"""
    bad, worst = ner_mismatches(res["ner_entities"], res["ner_ref"])
    body = f"""### Rerank: {args.documents} documents, one query (median of {args.reps})

{rerank_table}

{bound}
{passages_part}### NER: {args.texts} texts (median of {args.reps})

{ner_table}

"speedup vs one-at-a-time": the one-item-at-a-time loop's median / this row's median.
"time / worker's": this row's median / the worker's (above 1: the worker is faster).
Worker times are send-to-result through Redis, one request at a time. The paths of a
table take turns, one call each per round (the order rotating), so a change in the
machine's speed during the run weighs on all of them alike.

Sanity: max |worker score - CrossEncoder score| = {score_diff:.2e}; NER texts whose spans or
labels differ from the pipeline's: {bad} of {args.texts} (max score difference where equal: {worst:.2e}).{vs_float32}
"""
    h.report(
        h.section("bench_rerank_ner", args),
        f"Rerank and NER: worker vs CrossEncoder / pipeline{h.on_device(args)}",
        body,
        args,
    )


if __name__ == "__main__":
    main()
