"""The ``scalpel`` commands: one module per command, registered by name in ``NAMES``.

A command module defines ``HELP`` (one line), ``EXAMPLE`` (a worked example on the default model),
``add_arguments(parser)`` and ``run(args, ctx) -> Output``; it prints nothing. Modules are imported
when the parser is built; heavy imports (torch models, analyses, surgery) stay inside ``run``.

Example::

    from _cli.commands import execute, load
    load("info").HELP
    out = execute(build_parser().parse_args(["info"]), Context("default"))
"""

from __future__ import annotations

import importlib
from types import ModuleType

# the order of `scalpel --help`; adding a command is adding its module's name here
NAMES = ("info", "generate", "lens", "heads", "patch", "ablate", "sweep", "abliterate", "edit", "verify", "run")


def load(name: str) -> ModuleType:
    """The module of command ``name``."""
    return importlib.import_module(f"{__name__}.{name}")


def execute(args, ctx):
    """Run one parsed command with a shared ``Context``; returns its ``Output`` (nothing printed)."""
    return load(args.command).run(args, ctx)


def help_texts() -> dict[str, str]:
    """``{command: one-line help}`` in ``NAMES`` order."""
    return {name: load(name).HELP for name in NAMES}
