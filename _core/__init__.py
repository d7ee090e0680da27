"""The leaf layer of llama-scalpel: what every other package shares and that imports nothing of ours.

- ``_core.errors``: the error classes (one line each, naming the fix).

Layer order (each imports only from the ones before it, never upwards, not even inside a function):
``_core`` ← ``hooks`` ← ``analyses`` ← ``surgery`` ← ``_cli`` ← ``cli.py``.
"""
