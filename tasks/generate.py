"""``generate`` (CONTRACT §3), streaming (§4) and cancellation (§5).

A generation delivered again, because the worker that ran it died (§4 and §6, v1.1), is
not run twice for one producer: if its result is already stored it is dropped; if its
stream already ended, the result is rebuilt from the stream; otherwise it starts over,
its stream going on after a ``reset`` message.

A model with ``parallel`` > 1 whose slots and admission queue are full refuses the
request (``Overloaded``): the task goes back to its queue and is tried again shortly, on
whichever worker takes it, and fails with ``Overloaded`` only after OVERLOAD_RETRIES tries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import structlog
from celery import shared_task

from models.generation import GenerationControl, GenerationParams
from models.registry import registry
from tasks.base import InferenceTask, drop_if_answered, serve
from tasks.ports import Services
from tasks.schemas import GenerateRequest
from wire.errors import InferenceError, InvalidRequest, Overloaded, TransientError, WorkerError

log = structlog.get_logger("tasks")

OVERLOAD_RETRIES = 60  # a request refused by a full model is sent again this many times,
OVERLOAD_RETRY_S = (0.5, 2.0)  # each after a pause in this range: about a minute and a quarter in all


@shared_task(name="generate", base=InferenceTask, bind=True)
def generate(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    started = time.monotonic()
    settings = self.app.settings
    task_id = self.request.id
    services: Services = self.app.services
    drop_if_answered(self)
    attempt = delivery_attempt(self.request, services)
    # a producer asking for a stream is waiting on it: it gets an error message even when
    # the request is refused before it is fully parsed
    publisher = services.publisher(task_id) if kwargs.get("stream") is True else None
    if publisher is not None:
        last = publisher.resume(attempt)
        if last is not None and last.get("type") in ("end", "error"):
            return finished_stream(services, task_id, kwargs.get("model"), last)

    def run(req: GenerateRequest) -> dict[str, Any]:
        runtime = registry.generator(req.model)
        timer = services.generation_timer(req.model, str((self.request.delivery_info or {}).get("routing_key")))
        control = GenerationControl(
            on_text=_both(publisher.token if publisher else None, timer.text if timer else None),
            should_stop=services.cancel_watch(task_id),
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
        if timer:
            timer.done(out.prompt_tokens, out.completion_tokens)
        return {"model": req.model, "text": out.text, "finish_reason": out.finish_reason, "usage": usage}

    try:
        return serve(self, "generate", GenerateRequest, args, kwargs, run)
    except WorkerError as exc:
        # every slot and waiting place taken: back to the queue, for this worker or another
        # with room; the stream goes on when it runs
        if isinstance(exc, Overloaded) and self.request.retries < OVERLOAD_RETRIES:
            raise self.retry(
                exc=exc, countdown=random.uniform(*OVERLOAD_RETRY_S), max_retries=OVERLOAD_RETRIES
            ) from None
        retried = isinstance(exc, TransientError) and self.request.retries < self.max_retries
        if publisher and not retried:
            publisher.error(type(exc).__name__, str(exc))
        raise


def _both(first: Callable[[str], None] | None, second: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """One ``on_text`` callback calling each that is given."""
    if first is None or second is None:
        return first or second

    def both(text: str) -> None:
        first(text)
        second(text)

    return both


def delivery_attempt(request: Any, services: Services) -> int:
    """Which delivery of its task this is, from 1: one more than the times the task was
    handed back after its worker died."""
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    return max(services.times_lost(request.id) + 1, 2 if redelivered else 1)


def finished_stream(services: Services, task_id: str, model: Any, last: dict[str, Any]) -> dict[str, Any]:
    """The result of a generation whose stream an earlier delivery finished, from the stream."""
    log.info("task.rebuilt_from_stream", task_id=task_id, task="generate")
    if last["type"] == "error":
        error = last.get("error") or {}
        cls = InvalidRequest if error.get("type") == "InvalidRequest" else InferenceError
        raise cls(str(error.get("message", "")))
    text = "".join(m["text"] for m in services.stream_since_reset(task_id) if m["type"] == "token")
    return {"model": model, "text": text, "finish_reason": last["finish_reason"], "usage": last["usage"]}
