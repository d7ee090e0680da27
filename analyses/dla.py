"""Direct logit attribution: how much each layer, head and neuron writes, directly, into a logit
(difference) at one position.

The logits are ``lm_head(norm.weight * resid / scale)``, linear in the final residual stream once the
final RMSNorm's ``scale`` (cached at ``ln_final.hook_scale``) is fixed. The residual stream is a sum:
embeddings + every attention output + every MLP output; an attention output is the sum of its heads'
``z @ W_O`` plus the o_proj bias, an MLP output the sum of its neurons' ``post * W_down[:, f]`` plus the
down_proj bias. So the direct contributions add up exactly to the logit difference (tested).

Example::

    res = direct_logit_attribution(model, "When Mary and John went to the store, John gave a drink to",
                                   " Mary", " John")
    res.heads.shape            # [30, 9]
    res.total, res.direct_sum  # equal
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hooks import act_name
from hooks.model import takes_model

from .engine import _tokens
from .heads import group_size
from .metrics import token_ids
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@dataclass
class DLAResult(AnalysisResult):
    """Direct contributions (mean over prompts) to ``logit[answer] - logit[wrong]`` at ``pos``.

    ``embed`` (float); per layer ``attn`` [L], ``mlp`` [L], ``attn_bias`` [L], ``mlp_bias`` [L];
    ``heads`` [L, H] (query heads; ``attn = heads.sum(1) + attn_bias``); ``neurons`` [L, F] or None
    (``mlp = neurons.sum(1) + mlp_bias``); ``total``: the logit difference of the model's own logits;
    ``direct_sum = embed + attn.sum() + mlp.sum()`` equals ``total``.
    """

    embed: float
    attn: torch.Tensor
    mlp: torch.Tensor
    attn_bias: torch.Tensor
    mlp_bias: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor | None
    total: float
    answer: str
    group_size: int = 1

    title = "direct logit attribution"

    @property
    def direct_sum(self) -> float:
        """Sum of every direct contribution: embed + Σ attention outputs + Σ MLP outputs."""
        return float(self.embed + self.attn.double().sum() + self.mlp.double().sum())

    def rows(self) -> list[dict]:
        rows = [{"component": "embed", "kind": "embed", "layer": None, "index": None, "value": float(self.embed)}]
        for layer in range(self.attn.shape[0]):
            rows.append(
                {
                    "component": f"L{layer} attn",
                    "kind": "attn",
                    "layer": layer,
                    "index": None,
                    "value": float(self.attn[layer]),
                }
            )
            for h in range(self.heads.shape[1]):
                rows.append(
                    {
                        "component": f"L{layer}H{h}",
                        "kind": "head",
                        "layer": layer,
                        "index": h,
                        "kv_group": h // self.group_size,
                        "value": float(self.heads[layer, h]),
                    }
                )
            rows.append(
                {
                    "component": f"L{layer} mlp",
                    "kind": "mlp",
                    "layer": layer,
                    "index": None,
                    "value": float(self.mlp[layer]),
                }
            )
            if self.neurons is not None:
                for f in range(self.neurons.shape[1]):
                    rows.append(
                        {
                            "component": f"L{layer}N{f}",
                            "kind": "neuron",
                            "layer": layer,
                            "index": f,
                            "value": float(self.neurons[layer, f]),
                        }
                    )
        return rows

    def top_rows(self, n: int = 10) -> list[dict]:
        """The heads and neurons with the largest absolute direct effect."""
        rows = [r for r in self.rows() if r["kind"] in ("head", "neuron")]
        return sorted(rows, key=lambda r: -abs(r["value"]))[:n]

    def top_neurons(self, k: int = 10) -> list[tuple[int, int, float]]:
        """(layer, neuron, value) of the ``k`` neurons with the largest absolute direct effect."""
        if self.neurons is None:
            return []
        flat = self.neurons.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices
        F = self.neurons.shape[1]
        return [(int(i) // F, int(i) % F, float(flat[i])) for i in idx]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "answer": self.answer,
                "embed": self.embed,
                "attn": self.attn,
                "mlp": self.mlp,
                "attn_bias": self.attn_bias,
                "mlp_bias": self.mlp_bias,
                "heads": self.heads,
                "neurons": self.neurons,
                "total": self.total,
                "direct_sum": self.direct_sum,
                "top_neurons": self.top_neurons(20),
            }
        )

    def figure(self):
        """Left: per-head heatmap (layer × head); right: per-layer attention and MLP bars."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        L, H = self.heads.shape
        fig = make_subplots(
            rows=1, cols=2, column_widths=[0.55, 0.45], subplot_titles=("heads (layer × head)", "layers")
        )
        fig.add_trace(
            go.Heatmap(
                z=self.heads.double().tolist(),
                x=[f"H{h}" for h in range(H)],
                y=[f"L{l}" for l in range(L)],
                colorscale="RdBu",
                zmid=0,
                colorbar=dict(x=0.5, title=dict(text="logit diff")),
                hovertemplate="%{y}%{x}: %{z:.4g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        layers = [f"L{l}" for l in range(L)]
        fig.add_trace(go.Bar(x=layers, y=self.attn.double().tolist(), name="attention"), row=1, col=2)
        fig.add_trace(go.Bar(x=layers, y=self.mlp.double().tolist(), name="MLP"), row=1, col=2)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
        fig.update_layout(
            title=dict(
                text=f"direct logit attribution to {self.answer} (total {self.total:.3f}, embed {self.embed:.3f})"
            ),
            barmode="group",
        )
        return fig


@takes_model
def direct_logit_attribution(
    model: HookedLlama, prompt, answer, wrong=None, *, pos: int = -1, neurons: bool = True, attention_mask=None
) -> DLAResult:
    """Direct contributions of embeddings, heads, attention / MLP layers and neurons to a logit difference.

    Args:
        model: a ``HookedLlama``.
        prompt: text, list of texts, chat messages or token ids [B, P].
        answer: single-token string or id (or one per prompt); wrong: the same, or None for the plain logit.
        pos: position read (-1: each prompt's last token).
        neurons: also attribute each MLP neuron ([L, d_mlp]).

    Returns:
        ``DLAResult`` (see its docstring); ``direct_sum`` equals ``total``.

    Example::

        res = direct_logit_attribution(model, prompt, " Mary", " John")
        res.top_rows(5)
    """
    tokens, mask = _tokens(model, prompt, attention_mask)
    n = model.n_layers
    kinds = ["z", "attn_out", "mlp_out"] + (["post"] if neurons else [])
    names = ["hook_embed", "ln_final.hook_scale"] + [act_name(k, i) for i in range(n) for k in kinds]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        W_U = model.lm_head.weight  # [V, M]
        B = tokens.shape[0]
        ans = token_ids(model, answer).to(W_U.device).expand(B)
        bad = token_ids(model, wrong).to(W_U.device).expand(B) if wrong is not None else None
        label = repr(answer) if wrong is None else f"{answer!r} − {wrong!r}"
        direction = W_U[ans].float() - (W_U[bad].float() if bad is not None else 0.0)  # [B, M]
        scale = cache["ln_final.hook_scale"][:, pos].float()  # [B, 1]
        d = direction * model.model.norm.weight.float() / scale  # [B, M]: logit diff = d · resid
        last = logits[:, pos].float()
        diff = last.gather(-1, ans[:, None])[:, 0] - (last.gather(-1, bad[:, None])[:, 0] if bad is not None else 0.0)
        total = float(diff.mean())

        def proj(t: torch.Tensor) -> torch.Tensor:  # [B, M] -> mean over prompts
            return (t.float() * d).sum(-1).mean()

        embed = float(proj(cache["hook_embed"][:, pos]))
        attn, mlp, attn_bias, mlp_bias, heads, neuron_vals = [], [], [], [], [], []
        H, D = model.n_heads, model.d_head
        for i in range(n):
            layer = model.model.layers[i]
            W_O = layer.self_attn.o_proj.weight.float().view(-1, H, D)  # [M, H, D]
            z = cache["z", i][:, pos].float()  # [B, H, D]
            heads.append(torch.einsum("bhd,mhd,bm->bh", z, W_O, d).mean(0))
            ob = layer.self_attn.o_proj.bias
            attn_bias.append(proj(ob[None].expand(B, -1)) if ob is not None else torch.tensor(0.0))
            attn.append(proj(cache["attn_out", i][:, pos]))
            mlp.append(proj(cache["mlp_out", i][:, pos]))
            db = layer.mlp.down_proj.bias
            mlp_bias.append(proj(db[None].expand(B, -1)) if db is not None else torch.tensor(0.0))
            if neurons:
                w_down = layer.mlp.down_proj.weight.float()  # [M, F]
                neuron_vals.append((cache["post", i][:, pos].float() * (d @ w_down)).mean(0))
    return DLAResult(
        embed=embed,
        attn=torch.stack(attn).cpu(),
        mlp=torch.stack(mlp).cpu(),
        attn_bias=torch.stack(attn_bias).cpu(),
        mlp_bias=torch.stack(mlp_bias).cpu(),
        heads=torch.stack(heads).cpu(),
        neurons=torch.stack(neuron_vals).cpu() if neurons else None,
        total=total,
        answer=label,
        group_size=group_size(model),
    )
