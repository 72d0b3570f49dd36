"""Thin Celery tasks: validate the request, find the runtime, shape the response."""
