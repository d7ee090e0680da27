"""The ``scalpel`` argument parser, built from the command registry; it never exits the process.

Example::

    args = build_parser().parse_args(["info", "--json"])
    args.command, args.json          # ('info', True)
    build_parser().parse_args(["info", "--frob"])   # UsageError: unrecognized arguments: --frob; ...
"""

from __future__ import annotations

import argparse
import sys

from _cli import commands
from _cli.inputs import CLIError

PROG = "scalpel"


class UsageError(CLIError):
    """A command-line usage error (unknown command or flag, bad value): exit code 2."""


class HelpShown(Exception):
    """``--help`` was printed: exit code 0."""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        """Raise ``UsageError`` naming the sub-command, e.g. ``ablate: unrecognized arguments: --x``."""
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        raise UsageError(f"{f'{command}: ' if command else ''}{message}; see '{self.prog} --help'")

    def exit(self, status: int = 0, message: str | None = None):
        """After ``--help`` / ``--version``: raise ``HelpShown`` instead of ``sys.exit``."""
        if message:
            sys.stderr.write(message)
        raise HelpShown(status)


def _formatter():
    from rich_argparse import RawDescriptionRichHelpFormatter

    return RawDescriptionRichHelpFormatter


def build_parser() -> Parser:
    """The ``scalpel`` argument parser (one sub-parser per command of ``commands.NAMES``); help is
    formatted by rich-argparse and ends with a worked example on the default model."""
    import shtab

    fmt = _formatter()
    parser = Parser(
        prog=PROG,
        formatter_class=fmt,
        description="Open up and modify Llama models: hooks, analyses, weight surgery, verified export.",
        epilog="examples (the default model, SmolLM2-135M-Instruct):\n"
        + "\n".join(f"  {commands.load(n).EXAMPLE}" for n in ("info", "ablate"))
        + f'\n\nshell completion: eval "$({PROG} --print-completion bash)" (zsh, tcsh, fish, powershell: likewise)',
    )
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(),
        help="print the llama-scalpel, torch and transformers versions",
    )
    shtab.add_argument_to(parser, "--print-completion", help="print a shell completion script for that shell")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in commands.NAMES:
        module = commands.load(name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=fmt,
            epilog=f"example (the default model):\n  {module.EXAMPLE}",
        )
        module.add_arguments(p)
    return parser


def version_line() -> str:
    """``scalpel 0.1.0 (torch 2.13.0, transformers 5.24.0)`` (read from the installed metadata)."""
    import importlib.metadata as md

    def of(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return f"{PROG} {version()} (torch {of('torch')}, transformers {of('transformers')})"


def version() -> str:
    """The installed llama-scalpel version ("dev" when run from a checkout that is not installed)."""
    import importlib.metadata as md

    try:
        return md.version("llama-scalpel")
    except md.PackageNotFoundError:
        return "dev"
