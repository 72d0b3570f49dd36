"""``inference-worker``: embed or rerank a JSONL file through the fleet's queues, and the
fleet's status. Needs only the Redis URL (``--redis-url`` or ``WORKER_REDIS_URL``) and
the producer client: no torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli import batch
from cli.status import fleet_status, render_status

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

RedisUrl = Annotated[
    str,
    typer.Option(envvar="WORKER_REDIS_URL", help="The fleet's Redis (broker and result backend)."),
]
MasterName = Annotated[
    str | None,
    typer.Option(envvar="WORKER_REDIS_MASTER_NAME", help="With a sentinel:// URL: the master's name."),
]
DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[progress.percentage]{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal and os.environ.get("INFERENCE_WORKER_PROGRESS") != "1",
    )


def _finish(parts: batch.Parts, all_chunks: list[batch.Chunk], failed: list[Any], output: Path, resumed: int) -> None:
    if resumed:
        console.print(f"resumed: {resumed} of {len(all_chunks)} chunks were already done")
    if failed:
        for chunk, exc in failed[:5]:
            console.print(f"[red]chunk {chunk.index} (lines {chunk.start + 1}-{chunk.start + len(chunk.items)}): {exc}")
        console.print(f"[red]{len(failed)} chunk(s) failed; run the same command again to retry them")
        raise typer.Exit(1)
    parts.assemble(all_chunks, output)
    console.print(f"wrote {output}")


@app.command()
def embed(
    input: Annotated[Path, typer.Argument(help="JSONL: one text per line (a string, or an object with --field).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the vectors go: .npy (float32) or .jsonl.")],
    model: Annotated[str, typer.Option(help="The model's alias.")] = "minilm",
    queue: Annotated[str | None, typer.Option(help="Its queue (default: the alias).")] = None,
    field: Annotated[str, typer.Option(help="The text's key, for lines that are objects.")] = "text",
    chunk: Annotated[int, typer.Option(min=1, help="Texts per task.")] = 64,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks in flight.")] = 8,
    normalize: Annotated[bool, typer.Option(help="L2-normalise the vectors.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each task.")] = 300.0,
    redis_url: RedisUrl = DEFAULT_URL,
    master_name: MasterName = None,
) -> None:
    """Embed every text of INPUT. Interrupted, it resumes from the chunks already done."""
    from producer import InferenceClient

    kind = "npy" if output.suffix == ".npy" else "jsonl"
    texts = batch.read_jsonl(input, field)
    all_chunks = batch.chunks(texts, chunk)
    parts = batch.Parts(output, kind)
    client = InferenceClient(redis_url, timeouts={"embed": timeout}, master_name=master_name)

    def work(c: batch.Chunk) -> Any:
        vectors = client.embed(model, c.items, normalize=normalize, queue=queue)["embeddings"]
        if kind == "npy":
            return vectors
        return [{"index": c.start + i, "embedding": v} for i, v in enumerate(vectors)]

    try:
        _run_with_progress(f"embed {input.name}", len(texts), all_chunks, parts, work, concurrency, output)
    finally:
        client.close()


@app.command()
def rerank(
    input: Annotated[Path, typer.Argument(help='JSONL: {"query": ..., "documents": [...]} per line.')],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL: each line's results, in order.")],
    model: Annotated[str, typer.Option(help="The reranker's alias.")],
    queue: Annotated[str | None, typer.Option(help="Its queue (default: the alias).")] = None,
    top_n: Annotated[int | None, typer.Option(min=1, help="Keep the best N of each line.")] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Lines per resumable part.")] = 16,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks in flight.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each task.")] = 300.0,
    redis_url: RedisUrl = DEFAULT_URL,
    master_name: MasterName = None,
) -> None:
    """Rerank each line's documents against its query. Interrupted, it resumes."""
    from producer import InferenceClient

    lines = batch.read_jsonl(input, None)
    for number, line in enumerate(lines, 1):
        if not isinstance(line, dict) or "query" not in line or "documents" not in line:
            console.print(f"[red]{input}:{number}: each line needs a query and documents")
            raise typer.Exit(2)
    all_chunks = batch.chunks(lines, chunk)
    parts = batch.Parts(output, "jsonl")
    client = InferenceClient(redis_url, timeouts={"rerank": timeout}, master_name=master_name)

    def work(c: batch.Chunk) -> Any:
        out = []
        for i, line in enumerate(c.items):
            options = {"top_n": top_n} if top_n else {}
            result = client.rerank(model, line["query"], line["documents"], queue=queue, **options)
            out.append({"index": c.start + i, "results": result["results"]})
        return out

    try:
        _run_with_progress(f"rerank {input.name}", len(lines), all_chunks, parts, work, concurrency, output)
    finally:
        client.close()


def _run_with_progress(
    label: str,
    total: int,
    all_chunks: list[batch.Chunk],
    parts: batch.Parts,
    work: Any,
    concurrency: int,
    output: Path,
) -> None:
    """Run the chunks not done yet with a progress bar (resumed ones count at once), then
    gather the parts into ``output``."""
    resumed = 0
    with _progress() as progress:
        bar = progress.add_task(label, total=total)

        def on_done(c: batch.Chunk, was_done: bool) -> None:
            nonlocal resumed
            resumed += was_done
            progress.advance(bar, len(c.items))

        failed = batch.run(all_chunks, parts, work, concurrency=concurrency, on_done=on_done)
    _finish(parts, all_chunks, failed, output, resumed)


@app.command()
def status(
    redis_url: RedisUrl = DEFAULT_URL,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the workers' replies.")] = 2.0,
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
    master_name: MasterName = None,
) -> None:
    """The fleet now: workers and the models each serves, queue depths, work in flight."""
    report = fleet_status(redis_url, timeout, master_name)
    if json_output:
        import json

        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_status(report, Console(width=None if sys.stdout.isatty() else 200))  # no wrapping into a pipe
