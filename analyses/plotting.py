"""Plotly helpers shared by the analyses: imshow-like heatmaps with labelled axes.

Figures are ``plotly.graph_objects`` only (no plotly express), so ``fig.to_html(include_plotlyjs=True)``
gives a self-contained page.
"""

from __future__ import annotations

from typing import Sequence

import torch


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Make category labels unique (plotly merges equal labels on a categorical axis).

    Example: ``unique_labels([" the", " the"]) == [" the", " the​"]`` (a zero-width space is appended).
    """
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        label = str(label)
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label + "\u200b" * n)
    return out


def position_labels(str_tokens: Sequence[str] | None, n: int, positions: Sequence[int] | None = None) -> list[str]:
    """``"3: ' John'"``-style labels for positions (just the index when there are no token strings)."""
    positions = list(range(n)) if positions is None else list(positions)
    if str_tokens is None:
        return [str(p) for p in positions]
    return [f"{p}: {str_tokens[p]!r}" if p < len(str_tokens) else str(p) for p in positions]


def heatmap(
    z,
    x_labels: Sequence,
    y_labels: Sequence,
    *,
    title: str = "",
    x_title: str = "",
    y_title: str = "",
    zmid: float | None = 0.0,
    colorscale: str = "RdBu",
    text=None,
    hover: Sequence[Sequence[str]] | None = None,
    colorbar_title: str = "",
    reverse_y: bool = True,
):
    """An imshow-like heatmap: ``z`` [rows, cols] with row labels ``y_labels`` and column labels ``x_labels``.

    ``zmid=0`` centres a diverging colour scale on zero (pass ``None`` for a sequential scale).
    ``text`` [rows, cols] is written in the cells; ``hover`` [rows, cols] adds hover lines.

    Example::

        fig = heatmap(torch.randn(3, 4), ["a", "b", "c", "d"], ["L0", "L1", "L2"], title="demo")
        fig.to_html(include_plotlyjs=True)
    """
    import plotly.graph_objects as go

    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().double().tolist()
    kwargs = dict(
        z=z,
        x=unique_labels(x_labels),
        y=unique_labels(y_labels),
        colorscale=colorscale,
        colorbar=dict(title=dict(text=colorbar_title)),
    )
    if zmid is not None:
        kwargs["zmid"] = zmid
    if text is not None:
        kwargs["text"] = text
        kwargs["texttemplate"] = "%{text}"
        kwargs["textfont"] = dict(size=9)
    if hover is not None:
        kwargs["customdata"] = hover
        kwargs["hovertemplate"] = "%{y}<br>%{x}<br>value %{z:.4g}<br>%{customdata}<extra></extra>"
    else:
        kwargs["hovertemplate"] = "%{y}<br>%{x}<br>value %{z:.4g}<extra></extra>"
    fig = go.Figure(go.Heatmap(**kwargs))
    fig.update_layout(
        title=dict(text=title),
        xaxis=dict(title=dict(text=x_title), type="category"),
        yaxis=dict(title=dict(text=y_title), type="category", autorange="reversed" if reverse_y else True),
        margin=dict(l=60, r=20, t=60, b=60),
    )
    return fig


def wrap_text(text: str, width: int) -> str:
    """``text`` with ``<br>`` line breaks so that no line is longer than ``width`` characters (words kept
    whole; existing ``<br>`` respected).

    Example: ``wrap_text("a b c", 3) == "a b<br>c"``.
    """
    import textwrap

    lines = []
    for part in str(text).split("<br>"):
        lines += textwrap.wrap(part, width, break_long_words=False, break_on_hyphens=False) or [""]
    return "<br>".join(lines)


def tidy(fig, *, width: int = 1000, title_chars: int | None = None):
    """A figure fit for a page ``width`` pixels wide: a long title wraps onto more lines (about 8.5 px a
    character at plotly's 17 px title font) and the top margin grows to hold them; axis titles get room
    from their tick labels (``automargin``). Returns ``fig`` (changed in place).

    Example: ``tidy(res.figure()).to_html(include_plotlyjs=True)``.
    """
    title = fig.layout.title.text
    chars = title_chars or max(30, int((width - 120) / 8.5))
    if title and len(title.replace("<br>", "")) > chars:
        wrapped = wrap_text(title, chars)
        lines = wrapped.count("<br>") + 1
        top = fig.layout.margin.t
        fig.update_layout(
            title=dict(text=wrapped, y=1.0, yref="container", yanchor="top", pad=dict(t=22)),
            margin=dict(t=max(top or 0, 44 + 22 * lines)),
        )
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig
