"""``generate`` (CONTRACT §3), streaming (§4) and cancellation (§5)."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from models.base import GENERATE
from models.errors import WorkerError
from models.generation import GenerationControl, GenerationParams
from models.registry import registry
from tasks.base import InferenceTask, serve
from tasks.schemas import GenerateRequest
from worker.streams import CancelWatch, StreamPublisher, worker_redis


@shared_task(name="generate", base=InferenceTask, bind=True)
def generate(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    started = time.monotonic()
    settings = self.app.settings
    # a producer asking for a stream is waiting on it: it gets an error message even when
    # the request is refused before it is fully parsed
    publisher = (
        StreamPublisher(worker_redis(), self.request.id, settings.stream_ttl) if kwargs.get("stream") is True else None
    )

    def run(req: GenerateRequest) -> dict[str, Any]:
        runtime = registry.get(req.model, GENERATE)
        control = GenerationControl(
            on_text=publisher.token if publisher else None,
            should_stop=CancelWatch(worker_redis(), self.request.id),
            deadline=started + settings.time_limits["generate"],
        )
        params = GenerationParams(**req.model_dump(include=set(GenerationParams.__dataclass_fields__)))
        out = runtime.generate(params, control)
        usage = {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        }
        if publisher:
            publisher.end(out.finish_reason, usage)
        return {"model": req.model, "text": out.text, "finish_reason": out.finish_reason, "usage": usage}

    try:
        return serve(self, "generate", GenerateRequest, args, kwargs, run)
    except WorkerError as exc:
        if publisher:
            publisher.error(type(exc).__name__, str(exc))
        raise
