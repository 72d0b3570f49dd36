"""The Celery side of the worker fleet: ``celery -A worker worker`` starts one."""

from worker import control as _control  # noqa: F401  (registers remote-control commands)
from worker import lifecycle as _lifecycle  # noqa: F401  (connects the signals)
from worker.celery_app import app

celery = app

__all__ = ["app", "celery"]
