"""Attention-pattern viewers: what a head attends to, in a notebook, in an HTML report, or as rows.

``attention_patterns(model, prompt, layer=…, heads=…)`` caches only the patterns asked for and returns
an ``AttentionPatterns`` view: in a notebook it is an interactive, self-contained widget (no JavaScript
from the network: a thumbnail per head, click one to select it; hover a token to colour the tokens it
attends **to**, or switch to "from" to colour the tokens that attend to it); ``figure()`` is a plotly
grid of the heads' patterns (what ``scalpel`` reports embed); ``to_html()`` the widget as one HTML
snippet; ``circuitsvis()`` the same patterns in CircuitsVis's ``attention_heads`` when it is installed
(the ``[viz]`` extra). Heads are labelled ``L18H6``.

``attends(model, prompt, head, from_pos=P)`` answers "where does head H attend from position P" (the
top keys of row P of its pattern); ``to_pos=P`` answers "which positions attend to P" (the top queries of
column P). Positions count from the prompt's first token; negative ones from its end.

Example::

    view = attention_patterns(model, "When Mary and John went to the store, John gave a drink to", layer=18)
    view                                    # the widget
    view.attends("L18H6", from_pos=-1)      # [{"pos": 3, "token": " John", "weight": 0.61}, ...]
    attends(model, prompt, "L18H6", to_pos=3, k=3)
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError, act_name
from hooks.indices import check_index
from hooks.tokens import token_labels

from .heads import HeadRef, head_ref, parse_heads
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama

_MAX_FIGURE_HEADS = 16


def _one_prompt(model: HookedLlama, prompt) -> tuple[torch.Tensor, list[str]]:
    """(tokens [1, P], token strings) of one prompt (a string, chat messages or token ids)."""
    if isinstance(prompt, torch.Tensor):
        tokens = prompt[None] if prompt.dim() == 1 else prompt
        if tokens.shape[0] != 1:
            raise InputError(f"pass one prompt, got a batch of {tokens.shape[0]}", param="prompt")
    elif isinstance(prompt, (str, list)):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            raise InputError("pass one prompt (a string or chat messages), not a list of prompts", param="prompt")
        tokens, _ = model.tokenize(prompt)
    else:
        raise InputError(f"prompt must be a string, chat messages or token ids, got {type(prompt).__name__}")
    ids = tokens[0].tolist()
    if model.tokenizer is not None:
        strs = token_labels(model.tokenizer, ids)
    else:
        strs = [str(i) for i in ids]
    return tokens.to(model.device), strs


def _heads(model: HookedLlama, layer, heads) -> list[HeadRef]:
    if layer is not None:
        layer = check_index(model, "layer", layer, param="layer", negative=True)
        idx = range(model.n_heads) if heads is None else heads
        pairs = [h if isinstance(h, (str, tuple, HeadRef)) else (layer, h) for h in idx]
    elif heads is None:
        raise InputError("pass layer= (every head of a layer) or heads= (e.g. ['L18H6', (17, 4)])", param="heads")
    else:
        pairs = [heads] if isinstance(heads, (str, tuple, HeadRef)) else list(heads)
    return [head_ref(model, lay, h) for lay, h in parse_heads(model, pairs)]


@dataclass
class HeadAttention(AnalysisResult):
    """Where one head attends ``from`` a query position (``direction="from"``: the top keys) or which
    queries attend ``to`` a key position (``direction="to"``); ``rows()``: position, token, weight."""

    head: str
    direction: str
    pos: int
    token: str
    positions: list[int]
    tokens: list[str]
    weights: list[float]

    @property
    def title(self) -> str:
        verb = "attends to, from" if self.direction == "from" else "is attended from, at"
        return f"where {self.head} {verb} position {self.pos} ({self.token!r})"

    def rows(self) -> list[dict]:
        return [{"pos": p, "token": t, "weight": w} for p, t, w in zip(self.positions, self.tokens, self.weights)]

    def to_dict(self) -> dict:
        return jsonable({"head": self.head, "direction": self.direction, "pos": self.pos, "rows": self.rows()})

    def figure(self):
        import plotly.graph_objects as go

        labels = [f"{p}: {t!r}" for p, t in zip(self.positions, self.tokens)]
        fig = go.Figure(go.Bar(x=self.weights, y=labels, orientation="h"))
        fig.update_layout(
            title=dict(text=self.title),
            xaxis=dict(title=dict(text="attention weight"), range=[0, 1]),
            yaxis=dict(autorange="reversed", type="category"),
            margin=dict(l=160),
        )
        return fig


@dataclass
class AttentionPatterns(AnalysisResult):
    """Attention patterns of some heads on one prompt: ``patterns`` [heads, query, key] (rows sum to 1),
    ``heads`` (``HeadRef``s), ``labels`` (``L18H6``), ``tokens`` (the prompt's token strings)."""

    tokens: list[str]
    patterns: torch.Tensor
    heads: list[HeadRef]
    labels: list[str] = field(default_factory=list)

    title = "attention patterns"

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = [h.label for h in self.heads]

    def _index(self, head) -> int:
        if isinstance(head, int) and not isinstance(head, bool):
            if not -len(self.heads) <= head < len(self.heads):
                raise InputError(f"head index {head} is out of range: the view holds {len(self.heads)} heads")
            return head % len(self.heads)
        label = (
            head.label if isinstance(head, HeadRef) else (f"L{head[0]}H{head[1]}" if isinstance(head, tuple) else head)
        )
        if label not in self.labels:
            raise InputError(f"head {head!r} is not in this view; it holds {', '.join(self.labels)}", param="head")
        return self.labels.index(label)

    def _pos(self, pos: int, name: str) -> int:
        n = len(self.tokens)
        if isinstance(pos, bool) or not isinstance(pos, int) or not -n <= pos < n:
            raise InputError(f"{name}={pos!r} is out of range for a prompt of {n} tokens", param=name)
        return pos % n

    def attends(self, head, *, from_pos: int | None = None, to_pos: int | None = None, k: int = 5) -> HeadAttention:
        """The ``k`` keys ``head`` attends to from query ``from_pos``, or the ``k`` queries attending to
        key ``to_pos`` (exactly one of the two), strongest first."""
        if (from_pos is None) == (to_pos is None):
            raise InputError("pass exactly one of from_pos= (a query position) or to_pos= (a key position)")
        i = self._index(head)
        if from_pos is not None:
            p, direction = self._pos(from_pos, "from_pos"), "from"
            weights = self.patterns[i, p, : p + 1]
            offset = 0
        else:
            p, direction = self._pos(to_pos, "to_pos"), "to"
            weights = self.patterns[i, p:, p]
            offset = p
        top = weights.double().topk(min(int(k), weights.numel()))
        positions = [offset + int(j) for j in top.indices]
        return HeadAttention(
            self.labels[i],
            direction,
            p,
            self.tokens[p],
            positions,
            [self.tokens[j] for j in positions],
            [float(w) for w in top.values],
        )

    def rows(self) -> list[dict]:
        """Per head and query position: the key it attends to most, and the weight."""
        best = self.patterns.max(-1)
        return [
            {
                "head": label,
                "query_pos": q,
                "query_token": self.tokens[q],
                "key_pos": int(best.indices[i, q]),
                "key_token": self.tokens[int(best.indices[i, q])],
                "weight": float(best.values[i, q]),
            }
            for i, label in enumerate(self.labels)
            for q in range(len(self.tokens))
        ]

    def top_rows(self, n: int = 10) -> list[dict]:
        """The strongest attention away from the first token and from the query itself."""
        rows = [r for r in self.rows() if r["key_pos"] not in (0, r["query_pos"])]
        return sorted(rows, key=lambda r: -r["weight"])[:n]

    def to_dict(self) -> dict:
        return jsonable({"tokens": self.tokens, "heads": self.labels, "patterns": self.patterns})

    def figure(self, max_heads: int = _MAX_FIGURE_HEADS):
        """A grid of query × key heatmaps, one per head (the first ``max_heads``), tokens on the axes."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from .plotting import unique_labels

        n = min(len(self.heads), max_heads)
        cols = min(n, 3)
        rows = -(-n // cols)
        ticks = len(self.tokens) <= 24
        height = max(420, (380 if ticks else 300) * rows)
        fig = make_subplots(
            rows=rows,
            cols=cols,
            subplot_titles=self.labels[:n],
            horizontal_spacing=0.08 if ticks else 0.04,
            vertical_spacing=min(0.4, (150 if ticks else 60) / height) if rows > 1 else 0.1,
        )
        axis = unique_labels([f"{i}: {t}" for i, t in enumerate(self.tokens)])
        for i in range(n):
            z = self.patterns[i].double()
            z = torch.where(torch.ones_like(z).tril().bool(), z, torch.full_like(z, float("nan")))
            fig.add_trace(
                go.Heatmap(
                    z=z.tolist(),
                    x=axis,
                    y=axis,
                    zmin=0,
                    zmax=1,
                    colorscale="Blues",
                    showscale=i == 0,
                    colorbar=dict(title=dict(text="weight")),
                    hovertemplate=f"{self.labels[i]}<br>from %{{y}}<br>to %{{x}}<br>%{{z:.3f}}<extra></extra>",
                ),
                row=i // cols + 1,
                col=i % cols + 1,
            )
        fig.update_xaxes(type="category", showticklabels=ticks, tickangle=-60)
        fig.update_yaxes(type="category", autorange="reversed", showticklabels=ticks)
        fig.update_layout(
            title=dict(
                text=f"attention patterns: query (row) → key (column){'' if n == len(self.heads) else f', first {n} of {len(self.heads)} heads'}"
            ),
            height=height,
        )
        return fig

    def to_html(self) -> str:
        """The interactive view as one self-contained HTML snippet (inline CSS and JavaScript, no network)."""
        uid = "scalpel-attn-" + secrets.token_hex(4)
        data = {
            "tokens": self.tokens,
            "labels": self.labels,
            "patterns": [[[round(float(x), 4) for x in row] for row in head] for head in self.patterns.tolist()],
        }
        return _WIDGET.replace("__ID__", uid).replace("__DATA__", json.dumps(data).replace("</", "<\\/"))

    def _repr_html_(self) -> str:
        return self.to_html()

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(HTML(self.to_html()))

    def circuitsvis(self):
        """The patterns in CircuitsVis's ``attention_heads`` (``pip install 'llama-scalpel[viz]'``)."""
        try:
            from circuitsvis.attention import attention_heads
        except ImportError:
            raise InputError(
                "CircuitsVis is not installed; pip install 'llama-scalpel[viz]' (or use the built-in view: "
                "display the result, or .to_html())"
            ) from None
        return attention_heads(attention=self.patterns.float(), tokens=self.tokens, attention_head_names=self.labels)


def attention_patterns(
    model: HookedLlama, prompt, layer: int | None = None, heads: Sequence | None = None, *, cache=None
) -> AttentionPatterns:
    """The attention patterns of ``heads`` (query heads of ``layer``, or ``"L18H6"`` / ``(18, 6)`` refs
    across layers; default every head of ``layer``) on one ``prompt``.

    Only the needed layers' ``hook_pattern`` are cached and the forward stops after the last; pass
    ``cache=`` (a cache of this prompt holding those patterns) to reuse a run.

    Example: ``attention_patterns(model, "The cat sat on the mat. The cat", heads=["L18H6", "L17H4"])``.
    """
    refs = _heads(model, layer, heads)
    tokens, strs = _one_prompt(model, prompt)
    names = sorted({act_name("pattern", r.layer) for r in refs})
    if cache is None:
        stop = max(r.layer for r in refs) + 1
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, names_filter=names, stop_at_layer=stop if stop < model.n_layers else None
            )
    missing = [n for n in names if n not in cache]
    if missing:
        raise InputError(f"the cache holds no {missing[0]}; cache it (names_filter) or leave cache= out", param="cache")
    patterns = torch.stack([cache[act_name("pattern", r.layer)][0, r.head] for r in refs]).float().cpu()
    if patterns.shape[-1] != len(strs):
        raise InputError(
            f"the cache holds patterns over {patterns.shape[-1]} tokens, the prompt has {len(strs)}; pass the "
            "cache of this prompt",
            param="cache",
        )
    return AttentionPatterns(strs, patterns, refs)


def attends(
    model: HookedLlama, prompt, head, *, from_pos: int | None = None, to_pos: int | None = None, k: int = 5
) -> HeadAttention:
    """Where ``head`` (``"L18H6"``, ``(18, 6)`` or a ``HeadRef``) attends from query ``from_pos``, or which
    queries attend to key ``to_pos``, on one ``prompt``: the ``k`` strongest, as rows.

    Example: ``attends(model, prompt, "L18H6", from_pos=-1).rows()``.
    """
    view = attention_patterns(model, prompt, heads=[head])
    return view.attends(0, from_pos=from_pos, to_pos=to_pos, k=k)


_WIDGET = """<div id="__ID__" class="scalpel-attn">
<style>
#__ID__{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:13px;color:#222;max-width:100%}
#__ID__ .heads{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 8px}
#__ID__ .head{display:flex;flex-direction:column;align-items:center;cursor:pointer;border:2px solid transparent;border-radius:4px;padding:2px}
#__ID__ .head.sel{border-color:#d62728}
#__ID__ .head canvas{image-rendering:pixelated;width:64px;height:64px;border:1px solid #ccc}
#__ID__ .toks{line-height:2.1em;margin:6px 0}
#__ID__ .tok{padding:2px 1px;margin:0 1px;border-radius:3px;white-space:pre;cursor:default;border-bottom:2px solid transparent}
#__ID__ .tok.cur{border-bottom-color:#d62728}
#__ID__ .bar{display:flex;gap:12px;align-items:center}
#__ID__ .info{color:#555;min-height:1.4em}
</style>
<div class="bar"><b class="title"></b>
<label><input type="radio" name="__ID__-mode" value="to" checked> hovered token attends to</label>
<label><input type="radio" name="__ID__-mode" value="from"> attends to hovered token</label></div>
<div class="heads"></div><div class="toks"></div><div class="info">hover a token</div>
<script>
(function(){
const D=__DATA__, root=document.getElementById("__ID__");
let sel=0, mode="to", cur=null;
const T=D.tokens.length, heads=root.querySelector(".heads"), toks=root.querySelector(".toks"), info=root.querySelector(".info");
function show(t){return t.replace(/\\n/g,"\\u21b5").replace(/ /g,"\\u00b7")||"\\u2205"}
D.labels.forEach(function(lab,h){
  const box=document.createElement("div"); box.className="head"+(h===0?" sel":"");
  const c=document.createElement("canvas"); c.width=T; c.height=T; const g=c.getContext("2d"), im=g.createImageData(T,T);
  for(let q=0;q<T;q++)for(let k=0;k<T;k++){const v=k<=q?D.patterns[h][q][k]:0, i=4*(q*T+k);
    im.data[i]=255-Math.round(v*222); im.data[i+1]=255-Math.round(v*160); im.data[i+2]=255-Math.round(v*75); im.data[i+3]=255;}
  g.putImageData(im,0,0); box.appendChild(c);
  const s=document.createElement("span"); s.textContent=lab; box.appendChild(s);
  box.onclick=function(){sel=h; heads.querySelectorAll(".head").forEach(function(b,j){b.classList.toggle("sel",j===h)}); paint();};
  heads.appendChild(box);
});
D.tokens.forEach(function(t,p){
  const s=document.createElement("span"); s.className="tok"; s.textContent=show(t); s.title=p+": "+JSON.stringify(t);
  s.onmouseenter=function(){cur=p; paint();}; toks.appendChild(s);
});
root.querySelectorAll("input[type=radio]").forEach(function(r){r.onchange=function(){mode=r.value; paint();}});
function paint(){
  root.querySelector(".title").textContent=D.labels[sel];
  const spans=toks.children;
  for(let p=0;p<T;p++){
    let v=0; if(cur!==null){v=mode==="to"?(p<=cur?D.patterns[sel][cur][p]:0):(p>=cur?D.patterns[sel][p][cur]:0);}
    spans[p].style.background="rgba(31,119,180,"+v.toFixed(3)+")"; spans[p].style.color=v>0.6?"#fff":"#222";
    spans[p].classList.toggle("cur",p===cur);
  }
  if(cur!==null){
    const row=[]; for(let p=0;p<T;p++){const v=mode==="to"?(p<=cur?D.patterns[sel][cur][p]:0):(p>=cur?D.patterns[sel][p][cur]:0); row.push([v,p]);}
    row.sort(function(a,b){return b[0]-a[0]});
    info.textContent=D.labels[sel]+(mode==="to"?" from ":" to ")+cur+" "+JSON.stringify(D.tokens[cur])+": "+
      row.slice(0,3).map(function(x){return x[1]+" "+JSON.stringify(D.tokens[x[1]])+" "+x[0].toFixed(2)}).join(", ");
  }
}
paint();
})();
</script></div>"""
