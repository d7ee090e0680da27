"""SAE feature dashboards: for each feature, its top-activating contexts with per-token activations, its
activation histogram and its logit effects, as one self-contained HTML page or Neuronpedia's JSON.

``feature_dashboard(model, sae, features, corpus=None, k=10)`` reads the corpus once (the shipped one by
default; a list of strings or a text file, one document a line) and keeps, per feature:

- **top contexts**: the ``k`` tokens where the feature is most active (``top_feature_contexts``), each
  shown as a window of ``context`` tokens before and ``context_after`` after, with the feature's
  activation on every token of the window (a second forward pass over those documents only);
- **activation histogram**: the feature's non-zero activations over every counted token, and
  ``frac_nonzero`` (the fraction of counted tokens where it fires);
- **logit effects**: the decoder row through the final RMSNorm's weight and the unembedding,
  ``(W_dec[f] ⊙ w_norm) @ W_U`` — the direct effect on each token's logit of one unit of activation,
  the norm's scale held at 1 (SAEDashboard's convention with the norm folded); the top promoted and the
  most suppressed tokens, and a histogram over the whole vocabulary.

As in training and ``top_feature_contexts``, each document's first token is not counted
(``skip_first``): its residual is a massive activation the SAE was not trained on.

``dash.to_html()`` is one page (inline CSS and SVG, no script, no network); ``dash.to_neuronpedia()``
is a dict in Neuronpedia's dashboard batch layout (``model_id``, ``layer``, ``sae_set``, ``features``:
``feature_index``, ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``, ``frac_nonzero``,
``freq_hist_data_bar_values`` / ``_heights``, ``logits_hist_data_bar_values`` / ``_heights``,
``activations``: ``{bin_min: -1, bin_max: max, bin_contains: -1, tokens, values}``, ``n_prompts_total``,
``n_tokens_in_prompt``, ``dataset``); ``dash.save("dash.html")`` / ``dash.save("dash.json")`` write
either through the toolkit's one writer.

Example::

    dash = feature_dashboard(model, sae, [12, 348], k=8)
    dash                                   # in a notebook: the page
    dash.save("features.html"); dash.save("features.json", model_id="smollm2-135m", sae_set="res-6")
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError

from ..neurons import _batches, iter_corpus, stream_top_k
from ..results import AnalysisResult, jsonable
from .features import _features, _layer_of
from .sae import SAE

if TYPE_CHECKING:
    from hooks.model import HookedLlama

_BINS = 40


@dataclass
class FeatureCard:
    """One feature's dashboard data (see the module docstring)."""

    feature: int
    frac_nonzero: float
    max_act: float
    hist_values: list[float]  # bin centres of the non-zero activations
    hist_heights: list[int]
    pos_tokens: list[str]
    pos_values: list[float]
    neg_tokens: list[str]
    neg_values: list[float]
    logit_hist_values: list[float]
    logit_hist_heights: list[int]
    contexts: list[dict] = field(default_factory=list)  # {"tokens", "values", "max_index", "doc", "pos"}

    @property
    def label(self) -> str:
        return f"F{self.feature}"


@dataclass
class FeatureDashboard(AnalysisResult):
    """Dashboards of SAE features (``cards``, one ``FeatureCard`` per feature) at ``hook_name``."""

    hook_name: str
    cards: list[FeatureCard]
    n_docs: int
    n_tokens: int
    max_tokens: int
    dataset: str = ""

    @property
    def title(self) -> str:
        return f"SAE feature dashboards at {self.hook_name}"

    def card(self, feature: int) -> FeatureCard:
        for c in self.cards:
            if c.feature == feature:
                return c
        raise InputError(f"feature {feature} is not in this dashboard; it holds {[c.feature for c in self.cards]}")

    def rows(self) -> list[dict]:
        return [
            {
                "feature": c.feature,
                "frac_nonzero": c.frac_nonzero,
                "max_act": c.max_act,
                "top_token": c.contexts[0]["tokens"][c.contexts[0]["max_index"]] if c.contexts else "",
                "promotes": c.pos_tokens[:3],
                "suppresses": c.neg_tokens[:3],
            }
            for c in self.cards
        ]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "hook_name": self.hook_name,
                "n_docs": self.n_docs,
                "n_tokens": self.n_tokens,
                "features": [c.__dict__ for c in self.cards],
            }
        )

    def figure(self, feature: int | None = None):
        """One feature's activation histogram and its top promoted / suppressed tokens (plotly)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        c = self.cards[0] if feature is None else self.card(feature)
        fig = make_subplots(
            rows=1, cols=2, subplot_titles=["non-zero activations", "logit effect per unit of activation"]
        )
        fig.add_trace(go.Bar(x=c.hist_values, y=c.hist_heights, name="tokens", marker_color="darkorange"), 1, 1)
        toks = [repr(t) for t in c.neg_tokens[::-1] + c.pos_tokens[::-1]]
        vals = c.neg_values[::-1] + c.pos_values[::-1]
        fig.add_trace(
            go.Bar(
                x=vals,
                y=toks,
                orientation="h",
                name="logit effect",
                marker_color=["#d62728" if v < 0 else "#1f77b4" for v in vals],
            ),
            1,
            2,
        )
        fig.update_yaxes(type="category", row=1, col=2)
        fig.update_layout(
            title=dict(text=f"feature {c.feature} at {self.hook_name}: fires on {100 * c.frac_nonzero:.2g}% of tokens"),
            showlegend=False,
            height=max(380, 22 * len(toks)),
        )
        return fig

    # ------------------------------------------------------------------ Neuronpedia
    def to_neuronpedia(self, *, model_id: str = "", sae_set: str = "", layer: int | None = None) -> dict:
        """The dashboards in Neuronpedia's batch layout (``model_id``, ``layer``, ``sae_set``, ``features``)."""
        layer = _layer_of(self.hook_name) if layer is None else layer

        def r3(xs):
            return [round(float(x), 3) for x in xs]

        features = []
        for c in self.cards:
            features.append(
                {
                    "feature_index": c.feature,
                    "neuron_alignment_indices": [],
                    "neuron_alignment_values": [],
                    "neuron_alignment_l1": [],
                    "correlated_neurons_indices": [],
                    "correlated_neurons_l1": [],
                    "correlated_neurons_pearson": [],
                    "correlated_features_indices": [],
                    "correlated_features_l1": [],
                    "correlated_features_pearson": [],
                    "neg_str": list(c.neg_tokens),
                    "neg_values": r3(c.neg_values),
                    "pos_str": list(c.pos_tokens),
                    "pos_values": r3(c.pos_values),
                    "frac_nonzero": float(c.frac_nonzero),
                    "freq_hist_data_bar_values": r3(c.hist_values),
                    "freq_hist_data_bar_heights": [float(h) for h in c.hist_heights],
                    "logits_hist_data_bar_heights": [float(h) for h in c.logit_hist_heights],
                    "logits_hist_data_bar_values": r3(c.logit_hist_values),
                    "n_prompts_total": self.n_docs,
                    "n_tokens_in_prompt": self.max_tokens,
                    "dataset": self.dataset,
                    "decoder_weights_dist": [],
                    "activations": [
                        {
                            "bin_min": -1,
                            "bin_max": round(float(c.max_act), 3),
                            "bin_contains": -1,
                            "tokens": list(ctx["tokens"]),
                            "values": r3(ctx["values"]),
                        }
                        for ctx in c.contexts
                    ],
                }
            )
        return {"model_id": model_id, "layer": -1 if layer is None else layer, "sae_set": sae_set, "features": features}

    # ------------------------------------------------------------------ HTML
    def to_html(self, *, full_page: bool = True) -> str:
        """The dashboards as one self-contained HTML page (or a fragment with ``full_page=False``)."""
        body = "".join(_card_html(c, self.hook_name) for c in self.cards)
        frag = f"<div class='scalpel-dash'><style>{_CSS}</style>{body}</div>"
        if not full_page:
            return frag
        title = html.escape(self.title)
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{title}</title></head><body><h1 style='font-family:system-ui,sans-serif;font-size:1.4em'>"
            f"{title}</h1><p style='font-family:system-ui,sans-serif;color:#555'>{self.n_docs} documents, "
            f"{self.n_tokens} tokens counted (first tokens left out)</p>{frag}</body></html>\n"
        )

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(HTML(self.to_html(full_page=False)))

    def save(
        self, path, *, overwrite: bool = False, model_id: str = "", sae_set: str = "", layer: int | None = None
    ) -> Path:
        """Write the page (``.html``) or Neuronpedia's JSON (``.json``) through the toolkit's one writer."""
        import json

        from _core.writer import write_file

        suffix = Path(path).suffix.lower()
        if suffix in (".html", ".htm"):
            return Path(write_file(path, self.to_html(), kind="report", overwrite=overwrite))
        if suffix == ".json":
            doc = self.to_neuronpedia(model_id=model_id, sae_set=sae_set, layer=layer)
            return Path(write_file(path, json.dumps(doc, ensure_ascii=False), kind="json", overwrite=overwrite))
        raise InputError(f"save writes .html (the page) or .json (Neuronpedia's layout), not {path}", param="path")


def _svg_bars(values: list[float], heights: list[int], width: int = 300, height: int = 90, color: str = "#f28e2b"):
    if not heights or max(heights) == 0:
        return "<svg width='300' height='20'><text x='0' y='14' font-size='11'>never fires</text></svg>"
    n, top = len(heights), max(heights)
    w = width / n
    bars = "".join(
        f"<rect x='{i * w:.1f}' y='{height - h / top * height:.1f}' width='{max(w - 1, 0.5):.1f}' "
        f"height='{h / top * height:.1f}' fill='{color}'><title>{v:.3g}: {h}</title></rect>"
        for i, (v, h) in enumerate(zip(values, heights))
    )
    lo, hi = (values[0], values[-1]) if values else (0, 0)
    return (
        f"<svg width='{width}' height='{height + 14}' role='img'>{bars}"
        f"<text x='0' y='{height + 12}' font-size='10'>{lo:.3g}</text>"
        f"<text x='{width}' y='{height + 12}' font-size='10' text-anchor='end'>{hi:.3g}</text></svg>"
    )


def _tok(t: str) -> str:
    return html.escape(t.replace("\n", "↵")) or "∅"


def _card_html(c: FeatureCard, hook_name: str) -> str:
    ctx_rows = []
    for ctx in c.contexts:
        peak = max(ctx["values"]) if ctx["values"] else 0.0
        spans = "".join(
            f"<span class='t{' mx' if i == ctx['max_index'] else ''}' style='background:rgba(242,142,43,"
            f"{(max(v, 0) / c.max_act if c.max_act > 0 else 0):.3f})' title='{v:.3g}'>{_tok(t)}</span>"
            for i, (t, v) in enumerate(zip(ctx["tokens"], ctx["values"]))
        )
        ctx_rows.append(f"<div class='ctx'><span class='v'>{peak:.3g}</span>{spans}</div>")
    pos = "".join(
        f"<tr><td class='tk'>{_tok(t)}</td><td class='n pos'>{v:+.3f}</td></tr>"
        for t, v in zip(c.pos_tokens, c.pos_values)
    )
    neg = "".join(
        f"<tr><td class='tk'>{_tok(t)}</td><td class='n neg'>{v:+.3f}</td></tr>"
        for t, v in zip(c.neg_tokens, c.neg_values)
    )
    return (
        f"<section class='card' id='feature-{c.feature}'><h2>feature {c.feature} <small>{html.escape(hook_name)}"
        f"</small></h2><p class='stats'>fires on {100 * c.frac_nonzero:.3g}% of tokens · max activation "
        f"{c.max_act:.3g}</p><div class='grid'><div><h3>activations when non-zero</h3>"
        f"{_svg_bars(c.hist_values, c.hist_heights)}<h3>logit effects (all tokens)</h3>"
        f"{_svg_bars(c.logit_hist_values, c.logit_hist_heights, color='#4e79a7')}</div>"
        f"<div><h3>promoted tokens</h3><table>{pos}</table></div>"
        f"<div><h3>suppressed tokens</h3><table>{neg}</table></div></div>"
        f"<h3>top activating contexts</h3>{''.join(ctx_rows) or '<p>never fires on this corpus</p>'}</section>"
    )


_CSS = """
.scalpel-dash{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;font-size:13px}
.scalpel-dash .card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0;max-width:1100px}
.scalpel-dash h2{font-size:1.2em;margin:.2em 0}.scalpel-dash h2 small{color:#777;font-weight:normal;font-size:.75em}
.scalpel-dash h3{font-size:.95em;margin:.8em 0 .3em;color:#444}
.scalpel-dash .stats{color:#555;margin:.2em 0}
.scalpel-dash .grid{display:flex;flex-wrap:wrap;gap:2em}
.scalpel-dash table{border-collapse:collapse}.scalpel-dash td{padding:1px 6px}
.scalpel-dash td.n{text-align:right;font-variant-numeric:tabular-nums}
.scalpel-dash td.pos{color:#1f77b4}.scalpel-dash td.neg{color:#d62728}
.scalpel-dash td.tk{font-family:ui-monospace,monospace;white-space:pre}
.scalpel-dash .ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9em;margin:2px 0;
  overflow-wrap:anywhere}
.scalpel-dash .ctx .v{display:inline-block;min-width:4.5em;color:#777;font-family:system-ui,sans-serif}
.scalpel-dash .t{border-radius:2px;padding:1px 0}.scalpel-dash .t.mx{outline:1px solid #c05a00}
"""


def _histogram(values: torch.Tensor, bins: int) -> tuple[list[float], list[int]]:
    if values.numel() == 0:
        return [], []
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return [lo], [int(values.numel())]
    counts = torch.histc(values.float(), bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    return [lo + (i + 0.5) * width for i in range(bins)], [int(c) for c in counts]


def logit_effects(model: HookedLlama, sae: SAE, features: Sequence[int]) -> torch.Tensor:
    """[features, vocab]: ``(W_dec[f] ⊙ w_norm) @ W_U``, each feature's direct effect on every logit per unit
    of activation (the final RMSNorm's scale held at 1). Only for SAEs writing the residual stream's width."""
    w_dec = sae.W_dec[torch.as_tensor(list(features))].detach().float()
    if w_dec.shape[-1] != model.d_model:
        raise InputError(f"the SAE writes {w_dec.shape[-1]} dimensions, the residual stream has {model.d_model}")
    norm_w = model.model.norm.weight.detach().float().to(w_dec.device)
    return (w_dec * norm_w) @ model.W_U.detach().float().to(w_dec.device)


def feature_dashboard(
    model: HookedLlama,
    sae: SAE,
    features: Sequence[int] | int,
    corpus=None,
    k: int = 10,
    *,
    batch_size: int = 16,
    max_tokens: int = 64,
    context: int = 12,
    context_after: int = 4,
    n_logits: int = 10,
    bins: int = _BINS,
    skip_first: bool = True,
) -> FeatureDashboard:
    """Dashboards of ``features`` of ``sae`` over ``corpus`` (see the module docstring).

    Example: ``feature_dashboard(model, sae, [12, 348]).save("features.html")``.
    """
    feats = _features(features)
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad:
        raise InputError(f"feature index {bad[0]} is out of range; the SAE has {sae.d_sae} features", param="features")
    if len(set(feats)) != len(feats):
        raise InputError("features are listed twice; name each once", param="features")
    if model.tokenizer is None:
        raise InputError("a dashboard shows tokens; load the model with its tokenizer")
    dataset = "shipped corpus" if corpus is None else (str(corpus) if isinstance(corpus, (str, Path)) else "texts")
    docs = list(iter_corpus(corpus)) if corpus is None or isinstance(corpus, (str, Path)) else list(corpus)
    idx = torch.tensor(feats)
    layer = _layer_of(sae.hook_name)
    stop = layer + 1 if layer is not None and layer + 1 < model.n_layers else None

    def acts_of(tokens, mask):
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=[sae.hook_name], stop_at_layer=stop
            )
            return sae.encode(cache[sae.hook_name])[..., idx.to(tokens.device)].float()  # [b, P, F]

    nonzero: list[list[torch.Tensor]] = [[] for _ in feats]
    counted = 0

    def read(tokens, mask):  # one pass: the top-k (stream_top_k) and every counted activation
        nonlocal counted
        acts = acts_of(tokens, mask)
        keep = mask.bool().clone()
        if skip_first:
            first = mask.float().argmax(dim=1)
            keep[torch.arange(len(tokens)), first] = False
            acts[torch.arange(len(tokens)), first] = float("-inf")
        counted += int(keep.sum())
        a = acts[keep].cpu()  # [n, F]
        for j in range(len(feats)):
            col = a[:, j]
            nonzero[j].append(col[col > 0])
        return acts

    top = stream_top_k(model, docs, read, len(feats), k, batch_size, max_tokens, context)
    top = {"values": top["values"], "doc": top["doc"], "pos": top["pos"], "n_docs": top["n_docs"]}
    # the windows around each top activation, with the feature's value on every token
    wanted = sorted({int(d) for d in top["doc"].flatten().tolist() if d >= 0})
    windows: dict[int, torch.Tensor] = {}
    ids_of: dict[int, list[int]] = {}
    for start in range(0, len(wanted), batch_size):
        chunk = wanted[start : start + batch_size]
        for _, tokens, mask in _batches(model, [docs[d] for d in chunk], batch_size, max_tokens):
            acts = acts_of(tokens.to(model.device), mask.to(model.device)).cpu()
            pad = (~mask.bool()).sum(1)
            for i, d in enumerate(chunk):
                windows[d] = acts[i, int(pad[i]) :]
                ids_of[d] = tokens[i, int(pad[i]) :].tolist()
    effects = logit_effects(model, sae, feats).cpu()
    decode = model.tokenizer.decode
    cards = []
    for j, f in enumerate(feats):
        vals = torch.cat(nonzero[j]) if nonzero[j] else torch.zeros(0)
        hv, hh = _histogram(vals, bins)
        eff = effects[j]
        n = min(n_logits, eff.numel())
        pos_top, neg_top = eff.topk(n), (-eff).topk(n)
        lv, lh = _histogram(eff, bins)
        contexts = []
        for r in range(top["values"].shape[1]):
            d, p = int(top["doc"][j, r]), int(top["pos"][j, r])
            if d < 0 or not math.isfinite(float(top["values"][j, r])):
                continue
            lo, hi = max(0, p - context), min(len(ids_of[d]), p + context_after + 1)
            contexts.append(
                {
                    "doc": d,
                    "pos": p,
                    "tokens": [decode([t]) for t in ids_of[d][lo:hi]],
                    "values": [float(v) for v in windows[d][lo:hi, j]],
                    "max_index": p - lo,
                }
            )
        cards.append(
            FeatureCard(
                feature=f,
                frac_nonzero=vals.numel() / max(counted, 1),
                max_act=float(vals.max()) if vals.numel() else 0.0,
                hist_values=hv,
                hist_heights=hh,
                pos_tokens=[decode([int(t)]) for t in pos_top.indices],
                pos_values=[float(v) for v in pos_top.values],
                neg_tokens=[decode([int(t)]) for t in neg_top.indices],
                neg_values=[-float(v) for v in neg_top.values],
                logit_hist_values=lv,
                logit_hist_heights=lh,
                contexts=contexts,
            )
        )
    return FeatureDashboard(sae.hook_name, cards, top["n_docs"], counted, max_tokens, dataset)
