"""Progress on the terminal (rich): model loading, sweeps, patching, exports. Shown only while a
command runs with stdout and stderr on a terminal and without ``--json``; otherwise every call is a no-op.
The display is removed when the command ends, however it ends, and library tqdm bars are silenced
while a command runs, so an error line never shares a line with a bar.

Example::

    with session(enabled=True):
        with task("exporting") as advance: ...           # a spinner
        for x in track(items, "components"): ...          # a bar
        ablation_sweep(..., progress=counter("sweep heads"))   # analyses' progress callback
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator

_live = None  # the rich Progress of the running command, or None


@contextlib.contextmanager
def session(enabled: bool) -> Iterator[None]:
    """Show progress (on stderr, removed when done) for the duration of one command if ``enabled`` and
    stderr is a terminal. Library tqdm bars are silenced either way: on a terminal this display shows the
    steps, elsewhere (a pipe, ``--json``) nothing is drawn."""
    global _live
    with _quiet_library_bars():
        if not enabled or not _is_terminal(sys.stderr):
            yield
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True, force_terminal=True),
            transient=True,
        ) as live:
            _live = live
            try:
                yield
            finally:
                _live = None


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream: no terminal
        return False


@contextlib.contextmanager
def _quiet_library_bars() -> Iterator[None]:
    """Library functions draw tqdm bars (imported when called, from ``tqdm.auto``) when asked for
    progress; while a command runs they are created disabled, so none shares a line with this display or
    an error. Restored on exit."""
    import tqdm as tqdm_package
    import tqdm.auto as tqdm_auto

    saved = tqdm_auto.tqdm, tqdm_package.tqdm

    class QuietTqdm(saved[0]):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    tqdm_auto.tqdm = tqdm_package.tqdm = QuietTqdm
    try:
        yield
    finally:
        tqdm_auto.tqdm, tqdm_package.tqdm = saved


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A progress line (a spinner when ``total`` is None); yields ``advance(n=1, status=None)`` (``status``:
    text shown after the description, e.g. the best result so far)."""
    if _live is None:
        yield lambda n=1, status=None: None
        return
    live = _live
    tid = live.add_task(description, total=total)

    def advance(n: int = 1, status: str | None = None) -> None:
        if status is not None:
            live.update(tid, description=f"{description} · {status}" if status else description)
        live.advance(tid, n)

    try:
        yield advance
    finally:
        live.remove_task(tid)


def track(iterable: Iterable, description: str, total: int | None = None) -> Iterator:
    """Iterate with a progress bar."""
    items = list(iterable) if total is None else iterable
    with task(description, len(items) if total is None else total) as advance:
        for item in items:
            yield item
            advance(1)


class counter:
    """An analyses ``progress`` callback: ``counter("sweep")(total)`` returns ``advance(n)``; the bar
    closes with ``close()`` (or at the end of the command)."""

    def __init__(self, description: str) -> None:
        self.description, self._stack = description, contextlib.ExitStack()

    def __call__(self, total: int) -> Callable[[int], None]:
        return self._stack.enter_context(task(self.description, total))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "counter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
