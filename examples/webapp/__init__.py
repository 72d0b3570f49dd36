"""A FastAPI app that relays ``generate`` token streams to browsers as server-sent events."""
