"""The leaf layer of llama-scalpel: what every other package shares and that imports nothing of ours.

- ``_core.errors``: the error classes (one line each, naming the fix).
- ``_core.writer``: the one staged writer (``check_outputs``, ``write_file``, ``write_dir``, ``writable``,
  ``cache_key``/``cached``): validate the whole call, stage, verify, move into place exclusively.
- ``_core.readers``: one reader per kind of input (bytes, UTF-8 text, YAML/JSON data, JSON configs,
  prompt files) and ``LOADERS``, the registry of every public loader.

Layer order (each imports only from the ones before it, never upwards, not even inside a function):
``_core`` ← ``hooks`` ← ``analyses`` ← ``surgery`` ← ``_cli`` ← ``cli.py``.
"""
