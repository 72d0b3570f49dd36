"""The example web app (examples/webapp) end to end: uvicorn on a free port, a real worker,
server-sent events read over real HTTP.

httpx's ASGITransport buffers a whole response before returning it, so it could neither
see tokens arrive nor drop a connection mid-stream; a real server can.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis
import uvicorn

from examples.webapp.app import create_app
from producer import InferenceClient
from tests.conftest import queue_name

pytestmark = pytest.mark.anyio

QUEUE = queue_name("gen-gemma")
PROMPT = "The history of the city of Rome begins"
SHORT = {"model": "gemma", "queue": QUEUE, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
LONG = {**SHORT, "max_tokens": 900, "temperature": 0.8, "seed": 1}  # runs until cancelled
WAIT = 60.0  # the most any one test may take


@pytest.fixture(scope="module")
def base_url(redis_url: str) -> Iterator[str]:
    """The app served by uvicorn in a thread, lifespan included."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(redis_url), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture
async def web(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        yield http


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[InferenceClient]:
    c = InferenceClient(redis_url)
    yield c
    await c.aclose()
    c.close()


async def events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """SSE parsed: ``{"event", "id"?, "data": <parsed JSON>}`` per event."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif fields:
            yield {**fields, "data": json.loads(fields["data"])}
            fields = {}


async def collect(web: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> list[dict[str, Any]]:
    async with web.stream(method, url, **kwargs) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [event async for event in events(response)]


def check(received: list[dict[str, Any]], first: int = 0) -> str:
    """Ids are the seqs, from ``first`` with no gap; tokens, then one end. Returns the text."""
    seqs = list(range(first, first + len(received)))
    assert [int(e["id"]) for e in received] == [e["data"]["seq"] for e in received] == seqs
    assert [e["event"] for e in received] == ["token"] * (len(received) - 1) + ["end"]
    assert all(e["event"] == e["data"]["type"] for e in received)
    return "".join(e["data"]["text"] for e in received[:-1])


async def test_generate_relays_the_stream_and_replays_it(
    gen_worker: Any, web: httpx.AsyncClient, client: InferenceClient
) -> None:
    with anyio.fail_after(WAIT):
        async with web.stream("POST", "/generate", json=SHORT) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            task_id = response.headers["x-task-id"]
            received = [event async for event in events(response)]
        text = check(received)
        assert {e["data"]["task_id"] for e in received} == {task_id}
        result = await client.await_result(task_id, timeout=30)
        assert text == result["text"] and received[-1]["data"]["usage"] == result["usage"]
        assert received[-1]["data"]["finish_reason"] == result["finish_reason"] == "length"

        assert len(received) > 10
        url = f"/streams/{task_id}"
        assert await collect(web, "GET", url, headers={"Last-Event-ID": "9"}) == received[10:]
        assert await collect(web, "GET", url, params={"after": 9}) == received[10:]
        assert await collect(web, "GET", url) == received
        after_end = await web.get(url, headers={"Last-Event-ID": received[-1]["id"]})
        assert after_end.status_code == 204  # nothing left, and EventSource stops reconnecting


async def test_a_dropped_client_is_let_go_and_resumes_with_last_event_id(
    gen_worker: Any, web: httpx.AsyncClient, client: InferenceClient, redis_client: redis.Redis
) -> None:
    with anyio.fail_after(WAIT):
        first: list[dict[str, Any]] = []
        async with web.stream("POST", "/generate", json=LONG) as response:
            task_id = response.headers["x-task-id"]
            async for event in events(response):
                first.append(event)
                if len(first) == 3:
                    break  # the connection drops
        while redis_client.pubsub_numsub("stream:" + task_id)[0][1]:
            await anyio.sleep(0.05)  # the app stops reading the stream
        rest: list[dict[str, Any]] = []
        async with web.stream("GET", f"/streams/{task_id}", headers={"Last-Event-ID": first[-1]["id"]}) as response:
            async for event in events(response):
                rest.append(event)
                if len(rest) == 3:
                    await web.post(f"/generate/{task_id}/cancel")
        text = check(first + rest)
        result = await client.await_result(task_id, timeout=30)
        assert result["finish_reason"] == "cancelled" and result["text"] == text  # it ran on without the client


async def test_a_client_that_leaves_cancels_when_it_asked_to(
    gen_worker: Any, web: httpx.AsyncClient, client: InferenceClient
) -> None:
    with anyio.fail_after(WAIT):
        async with web.stream("POST", "/generate", json={**LONG, "cancel_on_disconnect": True}) as response:
            task_id = response.headers["x-task-id"]
            async for event in events(response):
                if event["id"] == "2":
                    break
        result = await client.await_result(task_id, timeout=30)
        assert result["finish_reason"] == "cancelled" and result["usage"]["completion_tokens"] < 900


async def test_cancel_endpoint_ends_the_stream_cancelled(
    gen_worker: Any, web: httpx.AsyncClient, client: InferenceClient
) -> None:
    with anyio.fail_after(WAIT):
        received: list[dict[str, Any]] = []
        async with web.stream("POST", "/generate", json=LONG) as response:
            task_id = response.headers["x-task-id"]
            async for event in events(response):
                received.append(event)
                if len(received) == 3:
                    cancelled = await web.post(f"/generate/{task_id}/cancel")
                    assert cancelled.status_code == 202
        text = check(received)
        assert received[-1]["data"]["finish_reason"] == "cancelled"
        result = await client.await_result(task_id, timeout=30)
        assert result["finish_reason"] == "cancelled" and result["text"] == text


BAD = [
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "temperature": 5}, "temperature"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of prompt and messages"),
    ({"messages": [{"role": "wizard", "content": "b"}]}, "role"),
    ({"prompt": "a", "stream": False}, "stream"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[b[1] for b in BAD])
async def test_a_malformed_request_is_a_422_and_never_queued(
    body: dict[str, Any], field: str, web: httpx.AsyncClient, redis_client: redis.Redis
) -> None:
    queue = queue_name("webapp-unserved")
    response = await web.post("/generate", json={"model": "gemma", "queue": queue, **body})
    assert response.status_code == 422 and field in json.dumps(response.json()["detail"])
    assert redis_client.llen(queue) == 0


async def test_a_request_the_worker_refuses_ends_its_stream_with_an_error_event(
    gen_worker: Any, web: httpx.AsyncClient
) -> None:
    with anyio.fail_after(WAIT):
        received = await collect(web, "POST", "/generate", json={**SHORT, "model": "minilm"})
    assert [(e["event"], e["id"]) for e in received] == [("error", "0")]
    error = received[0]["data"]["error"]
    assert error["type"] == "InvalidRequest" and "model" in error["message"]


async def test_embed_returns_the_worker_result(
    embed_worker: Any, web: httpx.AsyncClient, client: InferenceClient
) -> None:
    body = {
        "model": "minilm",
        "queue": queue_name("minilm"),
        "input": ["A man is eating food.", "A monkey is playing drums."],
    }
    with anyio.fail_after(WAIT):
        response = await web.post("/embed", json=body)
        direct = await client.aembed("minilm", body["input"], queue=body["queue"])
    assert response.status_code == 200 and response.json() == direct
    assert len(direct["embeddings"]) == 2 and all(
        math.isclose(math.hypot(*v), 1.0, rel_tol=1e-4) for v in direct["embeddings"]
    )


async def test_embed_refused_by_the_worker_is_a_400(gen_worker: Any, web: httpx.AsyncClient) -> None:
    with anyio.fail_after(WAIT):
        response = await web.post("/embed", json={"model": "gemma", "queue": QUEUE, "input": "text"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "InvalidRequest"


async def test_index_page(web: httpx.AsyncClient) -> None:
    response = await web.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "<textarea" in response.text and "/generate" in response.text
