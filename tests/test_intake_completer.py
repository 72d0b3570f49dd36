"""The bulk intake's completer (worker/intake/completer.py) on its own."""

from __future__ import annotations

import threading
import time


def test_bulk_completer_answers_each_job_once_in_the_order_they_finish(redis_url: str) -> None:
    """The completer takes jobs from their group and from their batcher's report, in either
    order, and answers each exactly once; a job with no result at its deadline is answered
    with a time-limit error; it returns once stopped with nothing outstanding."""
    from celery import Celery

    from tasks.schemas import Limits
    from worker.intake import BulkIntake, Job
    from worker.intake.job import JobState

    app = Celery("t", broker=redis_url, backend=redis_url, set_as_current=False)
    intake = BulkIntake(
        app, ["q"], redis_url=redis_url, prefetch=8, time_limits={"embed": 60}, limits=Limits(), hostname="h"
    )
    completer = intake.completer
    flushed: list[list[tuple[str, str | None]]] = []
    completer._flush = lambda jobs: flushed.append([(j.task_id, j.state) for j in jobs])  # type: ignore[method-assign]

    def finish(job: Job) -> None:
        job.settle(JobState.SUCCESS, "success")

    completer._finish = finish  # type: ignore[method-assign]
    far = time.monotonic() + 60
    early, late, slow, stuck = (Job(raw=b"", key="q", task_id=t, name="embed", deadline=far) for t in "ELSX")
    stuck.deadline = time.monotonic() + 0.2
    completer.inbox.put((early, object()))  # done before its group came
    completer.inbox.put([early, late, slow, stuck])
    completer.inbox.put((late, object()))
    completer.inbox.put((late, object()))  # a second report changes nothing
    thread = threading.Thread(target=completer.run)
    thread.start()
    time.sleep(0.05)
    completer.inbox.put((slow, object()))
    completer.inbox.put(None)
    thread.join(5)
    assert not thread.is_alive()
    answered = [entry for batch in flushed for entry in batch]
    assert sorted(answered) == [("E", "SUCCESS"), ("L", "SUCCESS"), ("S", "SUCCESS"), ("X", "FAILURE")]
    assert answered[-1] == ("X", "FAILURE") and "time limit" in str(stuck.error)
    intake.dispatcher.shutdown()
    intake.source.close()
