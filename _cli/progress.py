"""Progress on the terminal (rich): model loading, sweeps, patching, exports. Shown only while a
command runs with stdout on a terminal and without ``--json``; otherwise every call is a no-op.

Example::

    with session(enabled=True):
        with task("exporting") as advance: ...           # a spinner
        for x in track(items, "components"): ...          # a bar
        ablation_sweep(..., progress=counter("sweep heads"))   # analyses' progress callback
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

_live = None  # the rich Progress of the running command, or None


@contextlib.contextmanager
def session(enabled: bool) -> Iterator[None]:
    """Show progress (on stderr, removed when done) for the duration of one command if ``enabled``."""
    global _live
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A progress line (a spinner when ``total`` is None); yields ``advance(n=1)``."""
    if _live is None:
        yield lambda n=1: None
        return
    live = _live
    tid = live.add_task(description, total=total)
    try:
        yield lambda n=1: live.advance(tid, n)
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
