"""What producers and workers share on the wire: Redis key names, and the Celery task
message as it lies in a queue. Imports neither torch nor Celery's worker."""
