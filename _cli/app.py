"""``scalpel``'s main loop: parse, check outputs, run one command, print, write the report; every
error becomes one line on stderr and an exit code (0 success, 1 runtime failure, 2 bad usage or
input, 130 Ctrl-C, 143 SIGTERM).

Example::

    main(["info", "--json"])      # prints the JSON document, returns 0
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import traceback
from typing import Sequence

from _cli import commands, progress
from _cli.context import Context, check_ignored
from _cli.parser import PROG, HelpShown, build_parser, command_spelling
from _cli.report import Output, render_text, to_json, write_report
from _core.errors import LoadError, ScalpelError, spelled
from _core.writer import check_outputs


def _print(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup code runs (an export removes its temp directory)."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While ``main`` runs, SIGTERM raises ``Terminated`` instead of ending the process on the spot."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    fired = []

    def handler(signum, frame):
        if fired:  # a second SIGTERM while the first unwinds: the cleanup under way must finish
            return
        fired.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``scalpel`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (0, 1 or 2;
    130 after Ctrl-C, 143 after SIGTERM)."""
    with _sigterm_unwinds():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except HelpShown as shown:
            return int(shown.args[0] or 0)
        with spelled(command_spelling(parser, args.command)):  # library messages name our flags
            out = _run(args, argv)
        _print(to_json(out.data) if args.json else render_text(out, color=sys.stdout.isatty()))
        return 0
    except Terminated:
        _error("terminated (SIGTERM)", debug)
        return 143
    except KeyboardInterrupt:
        _error("interrupted", debug)
        return 130
    except Exception as exc:  # one line, exit 2 for bad input, 1 for anything else
        code = 2 if _is_usage(exc) else 1
        _error(_message(exc), debug)
        return code


def _run(args: argparse.Namespace, argv: list[str]) -> Output:
    """Check the command line (ignored flags, every output against the others and the inputs), run the
    command, write its report; returns its ``Output``."""
    check_ignored(args)
    check_outputs(commands.outputs(args), inputs=commands.inputs(args))
    ctx = Context(getattr(args, "model", None), getattr(args, "dtype", None), getattr(args, "device", None))
    on_terminal = sys.stdout.isatty() and sys.stderr.isatty() and not args.json
    with _quiet_transformers_bars(), progress.session(on_terminal):
        out = commands.execute(args, ctx)
    if getattr(args, "report", None):
        meta = {"command": f"{PROG} " + " ".join(shlex.quote(a) for a in argv)}
        if ctx.loaded:
            meta["model"] = ctx.model().source or "in memory"
        title = out.title or f"{PROG} {args.command}"
        write_report(args.report, out.sections or [out], title=title, meta=meta, overwrite=args.overwrite)
        out.files.append(str(args.report))
        out.data.setdefault("files", []).append(str(args.report))
    return out


@contextlib.contextmanager
def _quiet_transformers_bars():
    """Silence transformers' own tqdm bars (shard writing, GGUF de-quantising): our progress display
    (``_cli.progress``) shows those steps on a terminal. Everything is restored on exit."""
    from functools import partial

    from tqdm.auto import tqdm
    from transformers.utils import logging as tlog

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - gguf is a dependency
        gguf_utils = None
    was_enabled = tlog.is_progress_bar_enabled()
    saved = getattr(gguf_utils, "tqdm", None)
    tlog.disable_progress_bar()
    if saved is not None:
        gguf_utils.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was_enabled:
            tlog.enable_progress_bar()


def _is_usage(exc: BaseException) -> bool:
    if isinstance(exc, ScalpelError) and isinstance(exc, OSError) and not isinstance(exc, LoadError):
        import errno  # an export or report that could not be written: a read-only place is bad input (2),

        return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)  # a full disk a runtime failure (1)
    if isinstance(exc, (ScalpelError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    try:
        import yaml

        return isinstance(exc, yaml.YAMLError)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return False


def _message(exc: BaseException) -> str:
    """The first line of the error; a ``ScalpelError`` as it is (it names our flags already, through
    ``_core.errors.arg``), anything else prefixed with its type."""
    text = str(exc).strip()
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"no such file or directory: {exc.filename}"
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, ScalpelError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _error(message: str, debug: bool) -> None:
    """One line on stderr, ``scalpel: error: MESSAGE`` (in red on a terminal, never wrapped)."""
    if debug:
        traceback.print_exc()
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True, soft_wrap=True, highlight=False).print(
            Text.assemble((f"{PROG}: error:", "bold red"), " " + message)
        )
        return
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
