"""An example web app over the worker fleet: ``generate`` as server-sent events, ``embed`` as JSON.

It shows the producer side of CONTRACT.md inside a web server: one ``InferenceClient``
per process, a token stream relayed to the browser as it arrives, resumable with the
standard ``Last-Event-ID`` header, and cancellation.

Run it from the repository root (``pip install -e '.[web]'``) next to a worker that hosts
the bundled models (``gemma`` and ``minilm``), both pointed at the same Redis::

    ./dev worker                                    # or ./dev run (a worker and the demo)
    WORKER_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.webapp.app:app
    # then open http://127.0.0.1:8000/

Endpoints:

- ``POST /generate``: a JSON body (``model``, ``prompt`` or ``messages``, ``max_tokens``, ...)
  answered with ``text/event-stream``: one event per stream message, ``event: token|reset|end|error``,
  ``id: <seq>``, ``data: <the message's JSON>``; the ``X-Task-Id`` header names the task. A
  ``reset`` event means the generation was delivered again (its worker died) and starts
  over: the page drops the text it has shown.
- ``GET /streams/{task_id}``: replays and follows the stream after ``Last-Event-ID`` (or ``?after=``).
- ``POST /generate/{task_id}/cancel``: stops the generation; its stream ends ``cancelled``.
- ``POST /embed``: the ``embed`` result, awaited.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from examples.webapp.schemas import EmbedBody, GenerateBody
from producer import InferenceClient, InvalidRequest, WorkerError
from producer.streams import STREAM_PREFIX

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
FINAL = ("end", "error")
INDEX = Path(__file__).with_name("index.html")
log = logging.getLogger(__name__)
router = APIRouter()


async def get_client(request: Request) -> InferenceClient:
    return request.app.state.client


Client = Annotated[InferenceClient, Depends(get_client)]


def sse(message: dict[str, Any]) -> str:
    """One stream message as one event; its ``id`` (the seq) is what ``Last-Event-ID`` sends back."""
    head = f"id: {message['seq']}\n" if "seq" in message else ""
    return f"{head}event: {message['type']}\ndata: {json.dumps(message)}\n\n"


async def relay(
    messages: AsyncIterator[dict[str, Any]], on_abandon: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[str]:
    """SSE text for each message, up to the end or error.

    When the client disconnects, Starlette cancels this generator (uvicorn's ASGI 2.3), which
    closes the Redis reader; ``on_abandon`` then runs shielded, or the same cancellation
    would cut it short.
    """
    finished = False
    try:
        async with aclosing(messages):
            async for message in messages:
                finished = message["type"] in FINAL
                yield sse(message)
    except Exception as exc:  # the response has started: an event is the only way left to report
        log.exception("stream relay failed")
        finished = True
        yield sse({"type": "error", "error": {"type": type(exc).__name__, "message": str(exc)}})
    finally:
        if not finished and on_abandon is not None:
            with anyio.CancelScope(shield=True):
                await on_abandon()


def event_stream(events: AsyncIterator[str], task_id: str) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Task-Id": task_id}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def ended_by(redis: aioredis.Redis, task_id: str, seq: int) -> bool:
    """Whether the stream's final message is at or before ``seq``: a reader would wait in vain."""
    last = await redis.xrevrange(STREAM_PREFIX + task_id, count=1)
    if not last:
        return False
    message = json.loads(last[0][1][b"data"])
    return message["type"] in FINAL and message["seq"] <= seq


@router.get("/", response_class=HTMLResponse)
async def index() -> str:
    return INDEX.read_text()


@router.post("/generate", response_class=StreamingResponse)
async def generate(body: GenerateBody, client: Client) -> StreamingResponse:
    """Send ``generate(stream=True)`` and relay its messages; the task id is chosen here for the header."""
    task_id = str(uuid.uuid4())
    messages = client.astream_generate(body.model, queue=body.queue, task_id=task_id, **body.task_kwargs())
    on_abandon = partial(client.acancel, task_id) if body.cancel_on_disconnect else None
    return event_stream(relay(messages, on_abandon), task_id)


@router.get("/streams/{task_id}", response_class=StreamingResponse)
async def resume(
    task_id: str,
    request: Request,
    client: Client,
    last_event_id: Annotated[int | None, Header(ge=-1)] = None,
    after: Annotated[int | None, Query(ge=-1)] = None,
) -> Response:
    """The stream after the last seq the client saw (an ``EventSource`` reconnecting sends it)."""
    after_seq = next((s for s in (last_event_id, after) if s is not None), -1)
    if await ended_by(request.app.state.redis, task_id, after_seq):
        return Response(status_code=204)  # nothing left; 204 also stops EventSource reconnecting
    return event_stream(relay(client.aread_stream(task_id, after_seq=after_seq)), task_id)


@router.post("/generate/{task_id}/cancel", status_code=202)
async def cancel(task_id: str, client: Client) -> dict[str, str]:
    """CONTRACT §5: a running generation stops within 250 ms; a queued one never starts."""
    await client.acancel(task_id)
    return {"task_id": task_id, "status": "cancelling"}


@router.post("/embed")
async def embed(body: EmbedBody, client: Client) -> dict[str, Any]:
    return await client.aembed(body.model, body.input, normalize=body.normalize, queue=body.queue)


async def worker_error(request: Request, exc: Exception) -> JSONResponse:
    """A refused request is the caller's fault (400); a failed or late task is the fleet's (502/504)."""
    status = 400 if isinstance(exc, InvalidRequest) else 504 if isinstance(exc, TimeoutError) else 502
    return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}}, status_code=status)


def create_app(redis_url: str | None = None) -> FastAPI:
    """The app, talking to the fleet at ``redis_url`` (default: ``$WORKER_REDIS_URL``)."""
    url = redis_url or os.environ.get("WORKER_REDIS_URL", DEFAULT_REDIS_URL)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = InferenceClient(url)
        app.state.redis = aioredis.Redis.from_url(url)
        try:
            yield
        finally:
            await app.state.redis.aclose()
            await app.state.client.aclose()

    app = FastAPI(title="inference-worker example", lifespan=lifespan)
    app.include_router(router)
    app.add_exception_handler(WorkerError, worker_error)
    app.add_exception_handler(TimeoutError, worker_error)
    return app


app = create_app()
