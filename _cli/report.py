"""What the ``scalpel`` command prints and writes: aligned text tables, one JSON document, and a
self-contained HTML report (plotly.js inlined once, so the page works offline).

Every command returns an ``Output``: a JSON-ready ``data`` dict, text ``blocks`` (tables and
lines) and plotly ``figures``. ``render_text`` turns it into what stdout shows, ``write_report``
into an HTML page. ``run`` experiments concatenate several outputs into one page.

Example::

    out = Output("demo", {"x": 1})
    out.table("numbers", ["name", "value"], [["a", 1.5], ["b", -2.0]])
    print(render_text(out))
    write_report("demo.html", [out], title="demo")
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from _core.writer import write_file


# --------------------------------------------------------------------------- the output of a command
@dataclass
class Block:
    """A titled table (``headers`` + ``rows``) or, with ``headers=None``, lines of text in ``rows``."""

    title: str
    headers: list[str] | None
    rows: list[list[Any]]
    note: str = ""
    max_width: int = 48  # text cells are cut to this many characters on stdout (0: never)


@dataclass
class Output:
    """What one command produced. ``data`` is the command's JSON document.

    ``blocks`` are shown on stdout and in the report; ``figures`` (title, plotly Figure) only in the
    report. ``files`` lists the paths the command wrote (checkpoints, CSV tables); ``sections``, when
    set, are the outputs the report shows instead (one per step of an experiment).
    """

    command: str
    data: dict[str, Any]
    blocks: list[Block] = field(default_factory=list)
    figures: list[tuple[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    title: str = ""  # report title (default "scalpel COMMAND")
    sections: list["Output"] = field(default_factory=list)  # a report of several outputs (``run``)

    def table(
        self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "", max_width: int = 48
    ) -> "Output":
        """Add a table block. Example: ``out.table("effects", ["unit", "effect"], [["L5H3", -1.2]])``."""
        self.blocks.append(Block(title, list(headers), [list(r) for r in rows], note, max_width))
        return self

    def text(self, title: str, lines: Sequence[str] | str) -> "Output":
        """Add lines of text. Example: ``out.text("completion", "Paris is the capital of France.")``."""
        lines = [lines] if isinstance(lines, str) else list(lines)
        self.blocks.append(Block(title, None, [[line] for line in lines]))
        return self

    def figure(self, title: str, fig) -> "Output":
        """Add a plotly figure (report only)."""
        if fig is not None:
            self.figures.append((title, fig))
        return self


# --------------------------------------------------------------------------- text
def fmt(value: Any, digits: int = 4) -> str:
    """A cell as text: floats with ``digits`` significant digits, ``None``/NaN as ``-``.

    Example: ``fmt(3.14159) == "3.142"``; ``fmt(float("nan")) == "-"``.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 10**digits or abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits - 1}f}".rstrip("0").rstrip(".")
    if isinstance(value, str):
        return value.replace("\n", "\\n").replace("\t", "\\t")
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 48, color: bool = False
) -> str:
    """Aligned table (rich): numbers right-aligned, text left-aligned, cells cut at ``max_width``;
    ``color`` adds terminal styles (bold header).

    Example::

        >>> print(format_table(["unit", "effect"], [["L5H3", -1.25], ["L9H1", 0.5]]))
        unit  effect
        ────────────
        L5H3   -1.25
        L9H1     0.5
    """
    from rich import box
    from rich.table import Table

    cells = [[fmt(c) for c in r] for r in rows]
    if max_width:
        cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in r] for r in cells]
    numeric = [bool(rows) and all(_numeric(r[i]) or r[i] is None for r in rows) for i in range(len(headers))]
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        header_style="bold" if color else "",
        highlight=False,
    )
    for header, right in zip(headers, numeric):
        table.add_column(header, justify="right" if right else "left", no_wrap=True)
    for r in cells:
        table.add_row(*r)
    return _render(table, color)


def _render(renderable, color: bool) -> str:
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(
        file=buf,
        width=10_000,
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
        markup=False,
        legacy_windows=False,
    )
    console.print(renderable, crop=False, soft_wrap=False)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())


def render_text(output: Output, color: bool = False) -> str:
    """What a command prints on stdout (without ``--json``); ``color``: with terminal styles."""
    parts = []
    for block in output.blocks:
        body = (
            "\n".join(str(r[0]) for r in block.rows)
            if block.headers is None
            else format_table(block.headers, block.rows, block.max_width, color)
        )
        title = (f"\x1b[1m{block.title}\x1b[0m" if color else block.title) if block.title else ""
        head = f"{title}\n" if title else ""
        parts.append(head + body + (f"\n{block.note}" if block.note else ""))
    if output.files:
        parts.append("wrote:\n" + "\n".join(f"  {f}" for f in output.files))
    return "\n\n".join(parts)


def to_json(data: Any) -> str:
    """One JSON document; NaN/inf become ``null`` (strict JSON)."""
    return json.dumps(_finite(data), indent=1, ensure_ascii=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- HTML
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em}th{background:#f4f4f4;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;white-space:pre-wrap}
.meta td{border:none;padding:.1em .8em .1em 0}.figure{margin:1em 0}
"""


def _html_block(block: Block) -> str:
    title = f"<h3>{html.escape(block.title)}</h3>" if block.title else ""
    if block.headers is None:
        return title + "<pre>" + html.escape("\n".join(str(r[0]) for r in block.rows)) + "</pre>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='n'>{html.escape(fmt(c))}</td>" if _numeric(c) else f"<td>{html.escape(fmt(c))}</td>" for c in r
        )
        + "</tr>"
        for r in block.rows
    )
    note = f"<p>{html.escape(block.note)}</p>" if block.note else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _figure_html(fig, div_id: str) -> str:
    """One figure's HTML: a plotly figure (tidied: wrapped title, axis titles clear of tick labels) as a
    div drawn by the page's one plotly.js, or a self-contained view (an attention-pattern widget, a feature
    dashboard: anything with ``_repr_html_``) as it renders itself."""
    from plotly.basedatatypes import BaseFigure

    from analyses.plotting import tidy

    if not isinstance(fig, BaseFigure) and hasattr(fig, "_repr_html_"):
        return f"<div id='{div_id}' class='view'>{fig._repr_html_()}</div>"
    return tidy(fig).to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
    )


def _plotly_script(plotlyjs: str) -> str:
    """plotly.js once per page: inline (``"inline"``, the default: the page works offline anywhere), or
    the installed plotly package's own copy by its file URI (``"package"``: a small page that works offline
    on this machine, as long as that plotly stays installed)."""
    if plotlyjs == "package":
        import plotly

        src = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").resolve().as_uri()
        return f"<script type='text/javascript' src='{html.escape(src)}'></script>"
    if plotlyjs != "inline":
        raise ValueError(f"plotlyjs must be 'inline' or 'package', got {plotlyjs!r}")
    from plotly.offline import get_plotlyjs

    return f"<script type='text/javascript'>{get_plotlyjs()}</script>"


def report_html(
    outputs: Sequence[Output], *, title: str, meta: dict[str, Any] | None = None, plotlyjs: str = "inline"
) -> str:
    """A complete HTML page: metadata, then per output its tables and figures (plotly.js once per page,
    ``_plotly_script``).

    Example: ``report_html([out], title="ablation", meta={"model": "SmolLM2-135M-Instruct"})``.
    """

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if meta:
        rows = "".join(
            f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(fmt(v))}</td></tr>" for k, v in meta.items()
        )
        parts.append(f"<table class='meta'>{rows}</table>")
    n_fig = 0
    for output in outputs:
        if len(outputs) > 1:
            parts.append(f"<h2>{html.escape(output.command)}</h2>")
        for block in output.blocks:
            parts.append(_html_block(block))
        for fig_title, fig in output.figures:
            n_fig += 1
            div = _figure_html(fig, f"figure-{n_fig}")
            parts.append(f"<div class='figure'><h3>{html.escape(fig_title)}</h3>{div}</div>")
        if output.files:
            items = "".join(f"<li><code>{html.escape(f)}</code></li>" for f in output.files)
            parts.append(f"<p>Files written:</p><ul>{items}</ul>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"{_plotly_script(plotlyjs)}</head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


_KINDS = {".html": "report", ".htm": "report", ".csv": "csv", ".json": "json"}


def write_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` through the staged writer (``_core.writer.write_file``): never
    half-written; an existing file is replaced only with ``overwrite`` and only when llama-scalpel wrote
    it and it is unchanged since. A filesystem failure is a one-line ``ExportWriteError`` naming the
    place (a full disk: exit 1 from ``scalpel``; a read-only place: exit 2)."""
    kind = _KINDS.get(Path(path).suffix.lower(), "file")
    return write_file(path, text, kind=kind, overwrite=overwrite, param=kind if kind in ("report", "csv") else "path")


def write_report(
    path: str | os.PathLike,
    outputs: Sequence[Output],
    *,
    title: str,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    plotlyjs: str = "inline",
) -> Path:
    """Write the HTML report of ``outputs`` to ``path`` (staged, see ``write_atomic``; ``plotlyjs`` as
    ``report_html``). Returns the path."""
    meta = dict(meta or {})
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return write_atomic(path, report_html(outputs, title=title, meta=meta, plotlyjs=plotlyjs), overwrite=overwrite)
