"""The ``scalpel`` commands: one module per command, registered by name in ``NAMES``.

A command module defines ``HELP`` (one line), ``EXAMPLE`` (a worked example on the default model),
``add_arguments(parser)`` and ``run(args, ctx) -> Output``; it prints nothing and calls one library
function for its work. Optional hooks, used by ``scalpel`` and ``scalpel run`` before any work:

- ``check(args, ctx)``: every input checked against the loaded model, without doing the work (``scalpel
  run`` checks every step this way before step 1 writes anything; ``run`` calls it first too);
- ``outputs(args) -> list[_core.writer.Output]``: what the command writes, when it writes more than its
  ``--out``/``--report``/``--csv`` (``default_outputs``), e.g. a plan file beside ``--out``;
- ``inputs(args) -> list[path]``: the files it reads, when more than ``default_inputs`` finds.

Modules are imported when the parser is built; heavy imports (torch models, analyses, surgery) stay inside
``run``. Adding a command ``foo``: write ``_cli/commands/foo.py`` and add ``"foo"`` to ``NAMES``.

Example::

    from _cli.commands import execute, load
    load("info").HELP
    out = execute(build_parser().parse_args(["info"]), Context("default"))
"""

from __future__ import annotations

import argparse
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from _core.errors import arg

if TYPE_CHECKING:
    from _cli.context import Context
    from _cli.report import Output as CommandOutput
    from _core.writer import Output

# the order of `scalpel --help`; adding a command is adding its module's name here
NAMES = (
    "info",
    "generate",
    "lens",
    "heads",
    "patch",
    "circuit",
    "ablate",
    "sweep",
    "abliterate",
    "edit",
    "verify",
    "run",
)


def load(name: str) -> ModuleType:
    """The module of command ``name``."""
    return importlib.import_module(f"{__name__}.{name}")


def execute(args: argparse.Namespace, ctx: Context) -> CommandOutput:
    """Run one parsed command with a shared ``Context``; returns its ``Output`` (nothing printed)."""
    return load(args.command).run(args, ctx)


def check(args: argparse.Namespace, ctx: Context) -> None:
    """The command's own input checks against the loaded model (nothing when it has none)."""
    module = load(args.command)
    if hasattr(module, "check"):
        module.check(args, ctx)


def help_texts() -> dict[str, str]:
    """``{command: one-line help}`` in ``NAMES`` order."""
    return {name: load(name).HELP for name in NAMES}


# --------------------------------------------------------------------------- what a command reads and writes
def default_outputs(args: argparse.Namespace) -> list[Output]:
    """``--out`` (an export, or a GGUF file with ``--format gguf``), ``--report`` and ``--csv``, as the writer's
    ``Output`` records (``overwrite`` from ``--overwrite``); messages name them by flag."""
    from _core.writer import Output

    overwrite = bool(getattr(args, "overwrite", False))
    found = []
    for dest, param, kind in (("report", "report", "report"), ("out", "out_dir", "export"), ("csv", "csv", "csv")):
        path = getattr(args, dest, None)
        if path is None:
            continue
        if dest == "out" and getattr(args, "format", None) == "gguf":
            kind = "gguf"
        found.append(Output(path, kind=kind, overwrite=overwrite, param=param, shown=arg(param, path)))
    return found


def outputs(args: argparse.Namespace) -> list[Output]:
    """Everything the command line ``args`` will write (the module's ``outputs`` when it has one)."""
    module = load(args.command)
    return module.outputs(args) if hasattr(module, "outputs") else default_outputs(args)


INPUT_FLAGS = ("prompts", "plan", "edits", "dir", "harmful", "harmless", "eval_harmful", "eval_harmless")


def default_inputs(args: argparse.Namespace) -> list[Any]:
    """The files the command line names for reading (prompt files, plans, a checkpoint directory, a local
    ``--model``), so that no output is written over or into one of them."""
    found: list[Any] = []
    for dest in INPUT_FLAGS:
        value = getattr(args, dest, None)
        found += value if isinstance(value, list) else [value]
    model = getattr(args, "model", None)
    if isinstance(model, str) and model != "default" and os.path.exists(os.path.expanduser(model)):
        found.append(model)
    return [f for f in found if isinstance(f, (str, os.PathLike))]


def inputs(args: argparse.Namespace) -> list[Any]:
    """Every file the command line ``args`` reads (the module's ``inputs`` when it has one)."""
    module = load(args.command)
    return module.inputs(args) if hasattr(module, "inputs") else default_inputs(args)
