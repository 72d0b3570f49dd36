"""``inference-worker``: the jobs people run by hand against the fleet (cli/main.py)."""
