"""The sample producer that ``./dev run`` starts next to a worker with the bundled models.

It waits (bounded) for a worker to answer, then embeds a few sentences and, when the
worker hosts the bundled Gemma, streams a chat completion token by token.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from producer.client import InferenceClient


def wait_for_worker(client: InferenceClient, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = client.celery.control.ping(timeout=1.0)
        if replies:
            return [name for reply in replies for name in reply]
        time.sleep(0.5)
    raise SystemExit(f"no worker answered within {timeout:.0f}s; see .run/worker.log")


def show_embeddings(client: InferenceClient, model: str) -> None:
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A monkey is playing drums.",
    ]
    t0 = time.perf_counter()
    result = client.embed(model, sentences)
    ms = (time.perf_counter() - t0) * 1000
    vectors = result["embeddings"]
    print(f"\nembed via queue {model!r}: {len(vectors)} vectors of {result['dimensions']} dims in {ms:.1f} ms")
    for sentence, vector in zip(sentences, vectors):
        head = ", ".join(f"{x:+.4f}" for x in vector[:4])
        print(f"  [{head}, ...] |v|={math.sqrt(sum(x * x for x in vector)):.4f}  {sentence}")
    print("cosine similarity to the first sentence:")
    for sentence, vector in zip(sentences[1:], vectors[1:]):
        print(f"  {sum(a * b for a, b in zip(vectors[0], vector)):.4f}  {sentence}")


def show_generation(client: InferenceClient, model: str) -> None:
    prompt = "A message queue lets a web app hand slow work to background workers. For example,"
    print(f"\ngenerate via queue {model!r}, streaming:\n\n{prompt}", end="", flush=True)
    t0 = time.perf_counter()
    first = None
    stream = client.stream_generate(model, prompt=prompt, max_tokens=80, temperature=0.7, top_p=0.9, seed=42)
    for message in stream:
        if message["type"] == "token":
            first = first or time.perf_counter()
            sys.stdout.write(message["text"])
            sys.stdout.flush()
        elif message["type"] == "reset":  # its worker died; another starts it over
            print(f"\n[delivered again (attempt {message['attempt']}): starting over]\n{prompt}", end="", flush=True)
        elif message["type"] == "end":
            usage = message["usage"]
            took = time.perf_counter() - t0
            ttft = (first - t0) * 1000 if first else float("nan")
            print(
                f"\n\n[{message['finish_reason']}: {usage['completion_tokens']} tokens in {took:.2f}s, "
                f"first token after {ttft:.0f} ms]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--wait-ready", type=float, default=300.0, help="seconds to wait for a worker")
    parser.add_argument("--embed-model", default="minilm")
    parser.add_argument("--generate-model", default="gemma")
    args = parser.parse_args()
    client = InferenceClient(args.redis_url)
    print(f"waiting for a worker on {args.redis_url} ...", flush=True)
    workers = wait_for_worker(client, args.wait_ready)
    print(f"worker(s) ready: {', '.join(workers)}")
    show_embeddings(client, args.embed_model)
    if args.generate_model:
        show_generation(client, args.generate_model)
    client.close()


if __name__ == "__main__":
    main()
