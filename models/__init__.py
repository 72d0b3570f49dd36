"""Model runtimes. Knows nothing about Celery; importing this package loads no torch."""
