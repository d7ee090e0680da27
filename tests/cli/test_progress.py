"""Progress (``_cli.progress``) only on a terminal, never with ``--json``, and an error never shares a line
with a bar: what a terminal shows is replayed from the bytes written (a small VT100 screen)."""

from __future__ import annotations

import io
import re
import sys

import pytest

from _cli import progress
from tests.helpers import build_tiny, run


class Terminal(io.StringIO):
    """stderr as a terminal sees it."""

    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """The lines a terminal shows after ``text``: printable characters, ``\\r``, ``\\n``, erase-line,
    cursor up/down; colours and cursor visibility ignored."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token.startswith("\x1b["):
            code, n = token[-1], re.sub(r"[^0-9]", "", token[2:-1])
            if code == "K":
                rows[row] = "" if n == "2" else rows[row][:col]
            elif code == "A":
                row = max(0, row - int(n or 1))
            elif code == "B":
                row += int(n or 1)
                rows += [""] * (row + 1 - len(rows))
        else:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + token + line[col + 1 :]
            col += 1
    return rows


def test_an_error_after_a_bar_starts_on_a_clean_line(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with pytest.raises(ValueError):
        with progress.session(True):
            with progress.task("sweeping heads", 10) as advance:
                advance(3)
                raise ValueError("boom")
    term.write("scalpel: error: boom\n")
    shown = [line for line in screen(term.getvalue()) if line.strip()]
    assert shown == ["scalpel: error: boom"]


def test_a_library_bar_draws_nothing_while_a_command_runs(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with pytest.raises(KeyError):
        with progress.session(True):
            from tqdm.auto import tqdm  # as library functions import it: when called

            for i in tqdm(range(100), desc="cache_to_disk", leave=False, file=sys.stderr, mininterval=0):
                if i == 5:
                    raise KeyError("x")  # the loop's bar is never closed by its owner
    term.write("scalpel: error: x\n")
    assert [line for line in screen(term.getvalue()) if line.strip()] == ["scalpel: error: x"]
    from tqdm.auto import tqdm

    assert tqdm.__name__ != "QuietTqdm"  # restored after the command


def test_no_progress_off_a_terminal(monkeypatch):
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with progress.session(True):  # asked for, but stderr is a file: nothing drawn
        with progress.task("loading", 3) as advance:
            advance(1)
    assert plain.getvalue() == ""


def test_json_and_pipes_get_no_bar(tmp_path, capsys):
    """In-process, stdout and stderr are not terminals: the command's stderr is empty, its stdout one JSON."""
    tiny = build_tiny(tmp_path / "tiny")
    capsys.readouterr()  # building the checkpoint draws transformers' own bar
    code, out, err = run(["heads", "--model", str(tiny), "--json"], capsys)
    assert code == 0 and err == "" and out.lstrip().startswith("{")
