"""HTML reports as a person sees them, in headless Chromium: every figure is drawn and its title, subplot
titles, axis titles and legend stay inside it (a long title wraps) and no title covers tick labels; plotly.js is in the page once (or
loaded from the plotly package's own copy); the attention-pattern widget colours the tokens by the
pattern when one is hovered. A screenshot of every figure is saved ($SCALPEL_SCREENSHOTS, else the test's
temporary directory) for a person to look at."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from _cli.report import Output, report_html
from analyses import activation_patching, attention_patterns, detect_heads, logit_lens
from analyses.refusal import DirectionSelection, RefusalDirections
from hooks import HookedLlama
from tests.helpers import CLEAN, CORRUPT, browse, build_tiny

LONG = (
    "a deliberately long figure title that says what was measured, on which prompts, at which layer and with "
    "which metric, so that it cannot fit on one line of a figure about a thousand pixels wide"
)
# runs in the page once plotly has drawn: which text sticks out of its figure, and the widget's colours
CHECK = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var out = {figures: [], widget: null};
  function inside(r, b) { return r.left >= b.left - 1 && r.right <= b.right + 1 && r.top >= b.top - 1 && r.bottom <= b.bottom + 1; }
  document.querySelectorAll('.plotly-graph-div').forEach(function (div) {
    var svg = div.querySelector('svg.main-svg');
    var fig = {id: div.id, drawn: !!svg, outside: [], clipped: [], overlaps: []};
    if (svg) {
      var box = svg.getBoundingClientRect();
      div.querySelectorAll('.gtitle, .annotation-text, .xtitle, .ytitle, .legendtext').forEach(function (el) {
        var r = el.getBoundingClientRect();
        if (r.width > 0 && !inside(r, box)) fig.outside.push(el.textContent);
      });
      var ticks = Array.prototype.map.call(div.querySelectorAll('.xtick text, .ytick text'), function (t) {
        return t.getBoundingClientRect(); });
      div.querySelectorAll('.annotation-text, .gtitle').forEach(function (el) {
        var r = el.getBoundingClientRect();
        ticks.forEach(function (t) {
          if (t.width > 0 && r.left < t.right && t.left < r.right && r.top < t.bottom && t.top < r.bottom)
            fig.overlaps.push(el.textContent);
        });
      });
      div.querySelectorAll('.legend').forEach(function (lg) {
        var bg = lg.querySelector('.bg').getBoundingClientRect();
        lg.querySelectorAll('.legendtext').forEach(function (t) {
          if (t.getBoundingClientRect().right > bg.right + 1) fig.clipped.push(t.textContent);
        });
      });
    }
    out.figures.push(fig);
  });
  var w = document.querySelector('.scalpel-attn');
  if (w) {
    var toks = w.querySelectorAll('.tok');
    toks[5].dispatchEvent(new MouseEvent('mouseenter'));
    out.widget = Array.prototype.map.call(toks, function (t) {
      var m = /rgba\\([^,]+,[^,]+,[^,]+,\\s*([0-9.]+)\\)/.exec(t.style.background); return m ? parseFloat(m[1]) : 0;
    });
  }
  var pre = document.createElement('pre'); pre.id = 'scalpel-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500); });
</script>"""


def checked(page: Path, tmp_path: Path) -> dict:
    """The CHECK script's findings on ``page`` (a copy of it with the script added)."""
    probe = page.with_name(page.stem + "-checked.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = browse(probe, tmp_path / "profile")
    found = re.search(r"<pre id=\"scalpel-check\">(.*?)</pre>", dom, re.S)
    assert found, "the check script did not run"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshots(page: Path, tmp_path: Path) -> list[Path]:
    """One PNG per figure of ``page`` (the rest of the page hidden), in $SCALPEL_SCREENSHOTS or tmp_path."""
    out = Path(os.environ.get("SCALPEL_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    text = page.read_text()
    shots = []
    for i in range(1, text.count("class='figure'") + 1):
        hide = (
            "<style>body>h1,body>h2,body>h3,body>table,body>p,body>ul{display:none!important}.figure{display:none}"
            f".figure:has(#figure-{i}){{display:block}}</style></head>"
        )
        one = tmp_path / f"{page.stem}-figure-{i}.html"
        one.write_text(text.replace("</head>", hide, 1))
        shot = out / f"{page.stem}-figure-{i}.png"
        browse(one, tmp_path / "profile", screenshot=shot, height=1000)
        shots.append(shot)
    return shots


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of the figure kinds the analyses draw, on a tiny model with a tokenizer."""
    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = HookedLlama.from_pretrained(build_tiny(tmp / "tiny"))
    L, M = model.n_layers, model.d_model
    g = torch.Generator().manual_seed(0)
    rd = RefusalDirections(torch.randn(L, M, generator=g), torch.rand(L), torch.rand(L) * 3, torch.zeros(L, M),
                           torch.zeros(L, M), [-1], True, None)  # fmt: skip
    selection = DirectionSelection(
        [0, 1, 2], [5, 2, 7], [0.02, 0.04, 0.3], [0.5, 1.0, 2.0], 8, 8, 8, 1, 0.1, 16, True, rd
    )
    long = detect_heads(model, seq_len=5, n_seqs=2).figure()
    long.update_layout(title=dict(text=LONG))
    view = attention_patterns(model, CLEAN, layer=1)
    out = Output("analyses", {})
    out.figure("logit lens", logit_lens(model, CLEAN, [" Mary"]).figure())
    out.figure("head detection, long title", long)
    out.figure("patching", activation_patching(model, CLEAN, CORRUPT, answers=(" Mary", " John")).figure())
    out.figure("attention grid", view.figure())
    out.figure("attention viewer", view)
    out.figure("refusal layer chosen by ablation", selection.figure())
    page = tmp / "report.html"
    page.write_text(report_html([out], title="figures", meta={"model": "tiny"}))
    return page, view


def test_every_figure_is_drawn_and_nothing_sticks_out(report, tmp_path):
    page, _ = report
    found = checked(page, tmp_path)
    assert len(found["figures"]) == 5 and all(f["drawn"] for f in found["figures"])
    assert [f for f in found["figures"] if f["outside"] or f["clipped"] or f["overlaps"]] == []
    text = page.read_text()
    assert text.count("* plotly.js v") == 1  # plotly.js once per page, however many figures
    shots = screenshots(page, tmp_path)
    assert len(shots) == 6 and all(s.stat().st_size > 5000 for s in shots)


def test_the_check_sees_an_overflowing_title(tmp_path):
    """The same long title through plotly alone (no wrapping) sticks out, and the check says so."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(y=[1, 2, 3]))
    fig.update_layout(title=dict(text=LONG))
    page = tmp_path / "raw.html"
    page.write_text(fig.to_html(include_plotlyjs=True, default_width=900))
    (figure,) = checked(page, tmp_path)["figures"]
    assert figure["drawn"] and figure["outside"] == [LONG]


def test_widget_colours_tokens_by_the_pattern(report, tmp_path):
    page, view = report
    colours = checked(page, tmp_path)["widget"]
    head0_from_5 = view.patterns[0, 5]  # the first head is selected; hovering token 5 shows where it attends
    assert colours == pytest.approx([round(float(w), 3) if i <= 5 else 0 for i, w in enumerate(head0_from_5)], abs=2e-3)


def test_plotly_from_the_package_copy(report, tmp_path):
    """``plotlyjs="package"``: a small page that loads the installed plotly's own copy and still draws."""
    from _cli.report import Output

    page = tmp_path / "small.html"
    out = Output("x", {})
    out.figure("lens", report[1].figure())
    page.write_text(report_html([out], title="small", plotlyjs="package"))
    assert page.stat().st_size < 200_000 and "package_data/plotly.min.js" in page.read_text()
    (figure,) = checked(page, tmp_path)["figures"]
    assert figure["drawn"]


def test_static_images_through_kaleido(report, tmp_path):
    """The [viz] extra: any figure as PNG or SVG (kaleido drives the installed Chromium)."""
    pytest.importorskip("kaleido")
    from tests.helpers import chromium

    chromium()
    fig = report[1].figure()
    fig.write_image(tmp_path / "grid.png")
    fig.write_image(tmp_path / "grid.svg")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "grid.svg").read_text()[:500] and "L1H0" in (tmp_path / "grid.svg").read_text()
