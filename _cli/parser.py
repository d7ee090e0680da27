"""The ``scalpel`` argument parser, built from the command registry; it never exits the process.

Example::

    args = build_parser().parse_args(["info", "--json"])
    args.command, args.json          # ('info', True)
    build_parser().parse_args(["info", "--frob"])   # UsageError: unrecognized arguments: --frob; ...
"""

from __future__ import annotations

import argparse
import shlex
import sys

from _cli import commands
from _cli.inputs import CLIError
from _core.errors import MISSING, Spelling

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


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` in ``parser`` (as built by ``build_parser``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


# Library parameters whose flag is spelled otherwise (every other flag's ``dest`` is the parameter's name);
# a command module adds its own in ``PARAMS`` (``edit``: the plan file load_plan calls ``path``).
ALIASES = {"do_sample": "sample", "out_dir": "out"}


def flag_spelling(parser: argparse.ArgumentParser, aliases: dict[str, str] | None = None) -> Spelling:
    """How the command line writes a library argument, for ``_core.errors.spelled``: ``overwrite`` →
    ``--overwrite``, (``max_new_tokens``, 40) → ``--max-new-tokens 40``, (``do_sample``, False) → ``no
    --sample``. Built from ``parser``'s own actions (a flag's ``dest`` is the library's parameter name;
    ``ALIASES`` and ``aliases`` where it is not); a parameter with no flag keeps the Python spelling."""
    actions = {a.dest: a for a in parser._actions if a.dest not in (None, argparse.SUPPRESS, "help")}
    names = {**ALIASES, **(aliases or {})}

    def spell(name: str, value: object) -> str:
        action = actions.get(names.get(name, name))
        if action is None:
            return name if value is MISSING else f"{name}={value!r}"
        if not action.option_strings:  # a positional argument: its metavar
            shown = str(action.metavar or action.dest.upper())
            return shown if value is MISSING else shlex.quote(str(value))
        flag = max(action.option_strings, key=len)
        if value is MISSING:
            return flag
        if action.nargs == 0:  # --overwrite, --sample: on or off
            return flag if value else f"no {flag}"
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return " ".join([flag] + [shlex.quote(str(v)) for v in values])

    return spell


def command_spelling(parser: argparse.ArgumentParser, command: str) -> Spelling:
    """``flag_spelling`` of ``command``'s sub-parser, with the command module's ``PARAMS`` aliases."""
    return flag_spelling(subparser(parser, command), getattr(commands.load(command), "PARAMS", None))


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
