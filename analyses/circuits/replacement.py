"""The local replacement model of one prompt: per-layer transcoders in place of the MLPs, attention
patterns and norm scales frozen, and an error node at each (layer, position) for what the transcoder misses.

On the prompt it was built for, the replacement model gives the model's own logits (each MLP's output
is kept as transcoder features + skip connection + ``b_dec`` + error, which add up to it). With the
attention patterns (``attn.hook_pattern``) and RMSNorm scales (``ln1`` / ``ln2`` / ``ln_final``
``hook_scale``) frozen at their values on the prompt, and the MLPs cut (their outputs are constants:
the features' activations are nodes, not functions), every remaining path between two nodes is linear.
A transcoder's skip connection (``W_skip``) stays a linear path from its input to its output.

``ReplacementModel(model, transcoders).linear(prompt_state)`` gives those linear maps on the prompt
(``LinearReplacement``) as plain matrix products, for vector–Jacobian products without autograd: a
gradient with respect to the residual stream after a layer is carried back through its skip connection
(``skip_back``), to before it through the attention's value and output matrices with the frozen pattern
(``attn_back``), and read off where sources write (MLP outputs, embeddings). Only the positions up to the
last one a gradient touches are carried (attention is causal), so a row of a target at position ``q``
costs ``q + 1`` positions per layer. The same maps forwards (``values``, ``attn_forward``, ``skip_forward``)
carry a source's output up the first positions, which attend only among themselves.

Transcoders: ``analyses.saes.SAE`` objects with ``hook_name`` ``blocks.{L}.ln2.hook_normalized`` (what
``train_sae`` trains per-layer transcoders on) or ``blocks.{L}.hook_resid_mid``, ``hook_name_out``
``blocks.{L}.hook_mlp_out``, architecture standard, jumprelu or topk and no input normalisation. Layers
without one keep their whole MLP output as the error node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hooks import InputError, act_name

if TYPE_CHECKING:
    from hooks.model import HookedLlama

_IN = re.compile(r"^blocks\.(\d+)\.(ln2\.hook_normalized|hook_resid_mid)$")
_OUT = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")
LINEAR_ARCHITECTURES = ("standard", "jumprelu", "topk")


def check_transcoders(model: HookedLlama, transcoders) -> dict[int, object]:
    """{layer: transcoder}, checked (one line naming the fix) before any work."""
    if transcoders is None or isinstance(transcoders, (str, bytes)) or not hasattr(transcoders, "__iter__"):
        raise InputError("transcoders must be a list of per-layer transcoders (analyses.saes.SAE)", param="transcoders")
    out: dict[int, object] = {}
    for t in transcoders:
        cfg = getattr(t, "cfg", None)
        if cfg is None or not hasattr(t, "encode"):
            raise InputError(
                f"{type(t).__name__} is not a transcoder; pass analyses.saes.SAE objects", param="transcoders"
            )
        m_in, m_out = _IN.match(cfg.hook_name), _OUT.match(cfg.hook_name_out or "")
        if not cfg.is_transcoder:
            raise InputError(
                f"the SAE at {cfg.hook_name} is not a transcoder; pass per-layer MLP transcoders (reading "
                "blocks.L.ln2.hook_normalized, writing blocks.L.hook_mlp_out)",
                param="transcoders",
            )
        if not m_in or not m_out or m_in.group(1) != m_out.group(1):
            raise InputError(
                f"the transcoder at {cfg.hook_name} -> {cfg.hook_name_out} is not a per-layer MLP transcoder; "
                "it must read blocks.L.ln2.hook_normalized (or hook_resid_mid) and write blocks.L.hook_mlp_out",
                param="transcoders",
            )
        layer = int(m_in.group(1))
        if layer >= model.n_layers:
            raise InputError(
                f"a transcoder reads layer {layer}; the model has {model.n_layers} layers", param="transcoders"
            )
        if layer in out:
            raise InputError(f"two transcoders for layer {layer}; pass one per layer", param="transcoders")
        if cfg.architecture not in LINEAR_ARCHITECTURES or cfg.normalize_activations != "none":
            raise InputError(
                f"the transcoder of layer {layer} ({cfg.architecture}, normalize_activations="
                f"{cfg.normalize_activations!r}) has no linear encoder input; attribution graphs take standard, "
                "jumprelu or topk transcoders without input normalisation",
                param="transcoders",
            )
        if cfg.d_in != model.d_model or cfg.d_out != model.d_model:
            raise InputError(
                f"the transcoder of layer {layer} maps {cfg.d_in} -> {cfg.d_out}, the model's MLP {model.d_model} -> "
                f"{model.d_model}",
                param="transcoders",
            )
        out[layer] = t
    if not out:
        raise InputError(
            "no transcoders given; pass one per layer (analyses.saes.train_sae with hook_name_out)", param="transcoders"
        )
    return dict(sorted(out.items()))


def encoder_input(t, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's input as its encoder matrix reads it: ``x`` (× ``input_scale``) in its dtype."""
    x = x.to(t.W_enc.dtype)
    return x * t.input_scale if t.input_scale is not None else x


def encoder_vectors(t, features: torch.Tensor) -> torch.Tensor:
    """Columns [n, d_in] with ``pre[f] = encoder_input(x) · col + b_enc[f]`` (decoder-norm rescaling included)."""
    cols = t.W_enc[:, features].T
    if t.cfg.architecture == "topk" and t.cfg.rescale_acts_by_decoder_norm:
        cols = cols * t.W_dec.norm(dim=-1)[features, None]
    return cols


def decoder_vectors(t, features: torch.Tensor) -> torch.Tensor:
    """Rows [n, d_out]: a feature's output is ``activation × row``."""
    rows = t.W_dec[features]
    if t.cfg.architecture == "topk" and t.cfg.rescale_acts_by_decoder_norm:
        rows = rows / t.W_dec.norm(dim=-1)[features, None]
    return rows


def skip_output(t, x: torch.Tensor) -> torch.Tensor:
    return encoder_input(t, x) @ t.W_skip.T


@dataclass
class PromptState:
    """What the clean forward on the prompt gives: logits, transcoder inputs, MLP outputs, activations, and
    the values the replacement model freezes (attention patterns, RMSNorm divisors)."""

    tokens: torch.Tensor  # [P]
    logits: torch.Tensor  # [P, V]
    embed: torch.Tensor  # [P, M]
    mlp_out: torch.Tensor  # [L, P, M]
    tc_in: dict[int, torch.Tensor]  # layer -> [P, d_in] transcoder input
    acts: dict[int, torch.Tensor]  # layer -> [P, d_sae] feature activations
    errors: torch.Tensor  # [L, P, M]
    patterns: torch.Tensor  # [L, H, P, P] attention patterns
    scale1: torch.Tensor  # [L, P] ln1's divisor
    scale2: torch.Tensor  # [L, P] ln2's divisor
    scale_final: torch.Tensor  # [P] the final norm's divisor


class ReplacementModel:
    """The local replacement model of ``model`` with ``transcoders`` (see the module docstring)."""

    def __init__(self, model: HookedLlama, transcoders) -> None:
        self.model = model
        self.transcoders = check_transcoders(model, transcoders)
        self.n_layers = model.n_layers

    def input_hook(self, layer: int) -> str:
        return self.transcoders[layer].cfg.hook_name

    @torch.no_grad()
    def prompt_state(self, tokens: torch.Tensor) -> PromptState:
        """The model's forward on the prompt, with the transcoders' activations and error nodes."""
        model, L = self.model, self.n_layers
        frozen = [act_name("pattern", i) for i in range(L)]
        frozen += [f"blocks.{i}.{ln}.hook_scale" for i in range(L) for ln in ("ln1", "ln2")] + ["ln_final.hook_scale"]
        names = (
            ["hook_embed"]
            + [act_name("mlp_out", i) for i in range(L)]
            + [self.input_hook(i) for i in self.transcoders]
            + frozen
        )
        logits, cache = model.run_with_cache(tokens[None], names_filter=sorted(set(names)))
        mlp_out = torch.stack([cache[act_name("mlp_out", i)][0] for i in range(L)])
        errors = mlp_out.clone()
        tc_in, acts = {}, {}
        for layer, t in self.transcoders.items():
            x = cache[self.input_hook(layer)][0]
            a = t.encode(x)
            recon = a @ decoder_vectors(t, torch.arange(t.cfg.d_sae, device=a.device)) + t.b_dec
            if t.cfg.skip_connection:
                recon = recon + skip_output(t, x)
            tc_in[layer], acts[layer] = x, a
            errors[layer] = mlp_out[layer] - recon.to(mlp_out.dtype)

        def scales(ln: str) -> torch.Tensor:
            return torch.stack([cache[f"blocks.{i}.{ln}.hook_scale"][0, :, 0] for i in range(L)])

        return PromptState(
            tokens,
            logits[0],
            cache["hook_embed"][0],
            mlp_out,
            tc_in,
            acts,
            errors,
            torch.stack([cache[act_name("pattern", i)][0] for i in range(L)]),
            scales("ln1"),
            scales("ln2"),
            cache["ln_final.hook_scale"][0, :, 0],
        )

    def linear(self, state: PromptState, dtype: torch.dtype | None = None) -> LinearReplacement:
        """The replacement model's linear maps on the prompt of ``state`` (computed in ``dtype``: by default
        fp32, or fp64 for a float64 model)."""
        return LinearReplacement(self, state, dtype or torch.promote_types(self.model.dtype, torch.float32))


class LinearReplacement:
    """Vector–Jacobian products of the replacement model on one prompt, as plain matrix products.

    Gradients are ``[n, k, M]``: ``n`` rows over the first ``k`` positions of the residual stream. Weights
    are read from the model (cast to ``dtype`` a layer at a time, so a model in fp32 is never copied)."""

    def __init__(self, rm: ReplacementModel, state: PromptState, dtype: torch.dtype) -> None:
        model = rm.model
        self.rm, self.state, self.dtype = rm, state, dtype
        self.layers: Any = model.model.layers  # the decoder layers (their weights are read, never copied)
        self.n_heads, self.n_kv_heads, self.d_head = model.n_heads, model.n_kv_heads, model.d_head
        self.patterns = state.patterns.to(dtype)
        self.scale1 = state.scale1.to(dtype)
        # d(transcoder input)/d(resid_mid) per position: 1/ln2 divisor for ln2.hook_normalized, 1 for hook_resid_mid
        self.read_scale = {
            layer: (1 / state.scale2[layer].to(dtype)) if rm.input_hook(layer).endswith("hook_normalized") else None
            for layer in rm.transcoders
        }
        w_final = model.model.norm.weight.to(dtype)
        self.final_scale = w_final / state.scale_final[-1].to(dtype)

    def _w(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.dtype)

    def input_vectors(self, layer: int, pos: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Gradients [n, M] at ``hook_resid_mid`` of ``layer`` (positions ``pos``) of the transcoder-input
        directions ``vectors`` [n, d_in] (encoder columns: ``input_scale`` applied here)."""
        t = self.rm.transcoders[layer]
        v = vectors.to(self.dtype)
        if t.input_scale is not None:
            v = v * t.input_scale.to(self.dtype)
        r = self.read_scale[layer]
        return v if r is None else v * r[pos, None]

    def logit_vectors(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Gradients [n, M] at the last position of the final residual stream of ``logit − mean logit``."""
        W = self.rm.model.lm_head.weight
        rows = self._w(W[token_ids]) - W.detach().to(self.dtype).mean(0)
        return rows * self.final_scale

    def skip_back(self, layer: int, grad: torch.Tensor, first: int = 0) -> None:
        """``grad`` (after ``layer``, positions ``first …``) becomes the gradient before its MLP (at
        ``hook_resid_mid``), in place: the skip connection is the only path through a cut MLP."""
        t = self.rm.transcoders.get(layer)
        if t is None or not t.cfg.skip_connection:
            return
        n, k, M = grad.shape
        g = (grad.reshape(n * k, M) @ self._w(t.W_skip)).view(n, k, -1)
        r = self.read_scale[layer]
        scale = torch.ones(k, 1, dtype=self.dtype, device=grad.device) if r is None else r[first : first + k, None]
        if t.input_scale is not None:
            scale = scale * t.input_scale.to(self.dtype)
        grad.addcmul_(g, scale)

    def attn_back(self, layer: int, grad: torch.Tensor, first: int = 0) -> torch.Tensor:
        """``grad`` (at ``hook_resid_mid`` of ``layer``, positions ``first …``) becomes the gradient at its
        ``hook_resid_pre``, in place: the residual path plus the value path of attention with the frozen
        pattern and ln1 divisor. Returns the gradients [n, first, n_kv_heads × d_head] of the values at the
        positions before ``first``: with ``values`` of a source there, ``dv · values`` is its direct effect."""
        n, k, M = grad.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.d_head
        keys = first + k
        attn = self.layers[layer].self_attn
        dz = grad.reshape(n * k, M) @ self._w(attn.o_proj.weight)  # [n k, H D]
        pattern = self.patterns[layer, :, first:keys, :keys]  # [H, query i, key j]
        # dv[key j, value head g] = Σ_query i Σ_(h in g) pattern[h, i, j] dz[i, h]; query head h reads g = h // (H / G)
        if keys * G <= M // 4:  # short prompts: one product with [(j, g), (i, h)] (mixing and group sum)
            group = torch.arange(H, device=grad.device) // (H // G) == torch.arange(G, device=grad.device)[:, None]
            mix = (pattern.permute(2, 1, 0)[:, None] * group[None, :, None].to(self.dtype)).reshape(keys * G, k * H)
            dv = torch.matmul(mix, dz.view(n, k * H, D)).view(n, keys, G * D)
        else:  # long prompts: one product per head over the positions
            dv = torch.einsum("nihd,hij->njhd", dz.view(n, k, H, D), pattern)
            dv = (dv.reshape(n, keys, G, H // G, D).sum(3) if G != H else dv).reshape(n, keys, G * D)
        dx = (dv[:, first:].reshape(n * k, G * D) @ self._w(attn.v_proj.weight)).view(n, k, M)
        grad.addcmul_(dx, self._w(self.layers[layer].input_layernorm.weight) / self.scale1[layer, first:keys, None])
        return dv[:, :first]

    # forward maps, for the sources of the first positions (``start`` = the first position ``u`` [n, k, M] holds)
    def values(self, layer: int, u: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The values [n, k, n_kv_heads × d_head] that residual-stream vectors ``u`` make at ``layer``."""
        n, k, M = u.shape
        x = u * (self._w(self.layers[layer].input_layernorm.weight) / self.scale1[layer, start : start + k, None])
        return (x.reshape(n * k, M) @ self._w(self.layers[layer].self_attn.v_proj.weight).T).view(n, k, -1)

    def attn_forward(self, layer: int, u: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """``u`` (at ``hook_resid_pre``) becomes the stream at ``hook_resid_mid``, in place, from its ``values``:
        the positions ``start …`` attend among themselves with the frozen pattern (what they read before
        ``start`` does not change with ``u``)."""
        n, k, M = u.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.d_head
        pattern = self.patterns[layer, :, start : start + k, start : start + k]  # [H, query i, key j]
        v = values.view(n, k, G, D).repeat_interleave(H // G, dim=2)  # query head h reads value head h // (H / G)
        z = torch.einsum("hij,njhd->nihd", pattern, v)
        u += (z.reshape(n * k, H * D) @ self._w(self.layers[layer].self_attn.o_proj.weight).T).view(n, k, M)

    def skip_forward(self, layer: int, u: torch.Tensor, start: int = 0) -> None:
        """``u`` (at ``hook_resid_mid``) becomes the stream after ``layer``, in place: the skip connection."""
        t = self.rm.transcoders.get(layer)
        if t is None or not t.cfg.skip_connection:
            return
        n, k, M = u.shape
        r = self.read_scale[layer]
        x = u if r is None else u * r[start : start + k, None]
        if t.input_scale is not None:
            x = x * t.input_scale.to(self.dtype)
        u += (x.reshape(n * k, -1) @ self._w(t.W_skip).T).view(n, k, M)
