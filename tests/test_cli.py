"""``inference-worker`` (cli/) against real workers: a JSONL file embedded and reranked
through the queues, an interrupted run resumed, and the fleet's status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import ROOT, queue_name


def cli(*args: str, redis_url: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args, "--redis-url", redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _texts(n: int) -> list[str]:
    return [f"line {i}: a sentence about rivers, stones and lanterns number {i * 7 % 13}" for i in range(n)]


def test_embed_a_file_to_npy_and_jsonl(embed_worker: Any, redis_url: str, oracle: Any, tmp_path: Path) -> None:
    texts = _texts(150)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    expected = oracle.encode(texts, normalize_embeddings=True)
    out = tmp_path / "out.npy"
    done = cli(
        "embed", str(source), "-o", str(out), "--queue", queue_name("minilm"), "--chunk", "16", redis_url=redis_url
    )
    assert done.returncode == 0, done.stderr
    vectors = np.load(out)
    assert vectors.shape == expected.shape and (vectors * expected).sum(axis=1).min() >= 0.9999
    assert not (tmp_path / "out.npy.parts").exists()
    lines = tmp_path / "out.jsonl"
    done = cli("embed", str(source), "-o", str(lines), "--queue", queue_name("minilm"), redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    assert float(np.dot(rows[42]["embedding"], expected[42])) >= 0.9999


def test_an_interrupted_embed_resumes_where_it_stopped(
    embed_worker: Any, redis_url: str, oracle: Any, tmp_path: Path
) -> None:
    texts = _texts(600)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(t) + "\n" for t in texts))
    out = tmp_path / "out.npy"
    parts = tmp_path / "out.npy.parts"
    args = ["embed", str(source), "-o", str(out), "--queue", queue_name("minilm"), "--chunk", "4", "--concurrency", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args, "--redis-url", redis_url],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it: a suite started in the background (`cmd &` in a
        # script) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.npy"))) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(60)
    assert proc.returncode != 0 and not out.exists()
    kept = len(list(parts.glob("*.npy")))
    assert 10 <= kept < 150, kept
    done = cli(*args, redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert f"resumed: {kept} of 150 chunks" in done.stderr
    expected = oracle.encode(texts, normalize_embeddings=True)
    assert (np.load(out) * expected).sum(axis=1).min() >= 0.9999


def test_rerank_a_file(encoder_worker: Any, redis_url: str, tmp_path: Path, test_models: dict[str, str]) -> None:
    from sentence_transformers import CrossEncoder

    cross = CrossEncoder(test_models["reranker"], device="cpu")
    lines = [{"query": f"question {q} about stones", "documents": _texts(5)[q:]} for q in range(4)]
    source = tmp_path / "rr.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "rr-out.jsonl"
    done = cli(
        "rerank", str(source), "-o", str(out), "--model", "reranker", "--queue", queue_name("enc-reranker"),
        "--top-n", "2", redis_url=redis_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = [json.loads(row) for row in out.read_text().splitlines()]
    for line, row in zip(lines, got):
        scores = cross.predict([(line["query"], d) for d in line["documents"]])
        best = list(np.argsort(-scores, kind="stable"))[:2]
        assert [r["index"] for r in row["results"]] == best
        assert all(abs(r["relevance_score"] - float(scores[r["index"]])) < 1e-4 for r in row["results"])


def test_status_names_the_workers_their_models_and_queues(
    embed_worker: Any, encoder_worker: Any, redis_url: str
) -> None:
    done = cli("status", "--json", redis_url=redis_url, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    workers = {w["name"]: w for w in report["workers"]}
    assert workers[embed_worker.name]["models"] == ["minilm"] and workers[embed_worker.name]["alive"]
    assert queue_name("minilm") in workers[embed_worker.name]["queues"]
    assert "reranker" in workers[encoder_worker.name]["models"]
    queues = {q["queue"]: q for q in report["queues"]}
    assert queues[queue_name("minilm")]["consumers"] >= 1
    minilm = queues[queue_name("minilm")]
    assert minilm["depth"] == minilm["ready"] + minilm["in_flight"]
    table = cli("status", redis_url=redis_url, timeout=60)
    assert table.returncode == 0 and embed_worker.name in table.stdout and "depth" in table.stdout
