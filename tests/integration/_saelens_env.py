"""The sae-lens environment (``_comparator_env``, name "saelens"): SAELens's reference outputs."""

from __future__ import annotations

from pathlib import Path

from _comparator_env import env_python, run_script


def saelens_python() -> Path:
    return env_python("saelens")


def run_reference(out_dir: Path, our_dirs=()) -> None:
    run_script("saelens", out_dir, *our_dirs)
