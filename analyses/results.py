"""The common surface of every analysis result: tensors, rows, a JSON dict, a plotly figure.

Every analysis returns an object derived from ``AnalysisResult``::

    res = activation_patching(model, clean, corrupted, answers=(" Mary", " John"))
    res.values            # the tensors, as attributes
    res.rows()            # list of dicts, one per cell (always available)
    res.to_frame()        # a pandas DataFrame when pandas is importable, else the rows
    res.to_dict()         # JSON-serialisable (tensors become nested lists)
    res.figure()          # a plotly.graph_objects.Figure
    res                   # in a notebook: the figure plus the top rows
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors turned into (nested) lists and non-finite floats into ``None``.

    Example: ``jsonable({"x": torch.tensor([1.0, float("nan")])}) == {"x": [1.0, None]}``.
    """
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        if obj.is_floating_point():
            obj = obj.double()
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return jsonable(obj.item())
    return str(obj)


def rows_to_html(rows: list[dict], max_rows: int = 10) -> str:
    """A plain HTML table of the first ``max_rows`` rows (the columns are the first row's keys)."""
    if not rows:
        return "<p>(no rows)</p>"
    cols = list(rows[0])
    head = "".join(f"<th style='text-align:left'>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows[:max_rows]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class AnalysisResult:
    """Base class of analysis results (see the module docstring for the shared methods).

    Subclasses implement ``rows()``, ``to_dict()`` and ``figure()``; ``top_rows()`` picks the rows a
    notebook shows first (default: the first ten rows).
    """

    title: str = "analysis"

    def rows(self) -> list[dict]:
        """One dict per cell of the result, with plain Python values."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the whole result."""
        raise NotImplementedError

    def figure(self, *args: Any, **kwargs: Any) -> Any:  # subclasses name their own options
        """A ``plotly.graph_objects.Figure``."""
        raise NotImplementedError

    def top_rows(self, n: int = 10) -> list[dict]:
        """The ``n`` rows most worth looking at first."""
        return self.rows()[:n]

    def to_frame(self):
        """A pandas DataFrame of ``rows()`` when pandas is importable, else the list of row dicts."""
        rows = self.rows()
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame(rows)

    def _ipython_display_(self) -> None:
        """In Jupyter: the figure through plotly's own renderer (works offline), then the top rows."""
        from IPython.display import HTML, display

        from .plotting import tidy

        display(tidy(self.figure()))
        display(HTML(f"<p><b>{html.escape(self.title)}</b>: top rows</p>" + rows_to_html(self.top_rows())))

    def _repr_html_(self) -> str:
        """For HTML front ends other than Jupyter (plotly.js from its CDN, to keep the page small)."""
        from .plotting import tidy

        fig = tidy(self.figure())
        return (
            fig.to_html(full_html=False, include_plotlyjs="cdn")
            + f"<p><b>{html.escape(self.title)}</b>: top rows</p>"
            + rows_to_html(self.top_rows())
        )
