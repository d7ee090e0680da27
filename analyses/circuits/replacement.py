"""The local replacement model of one prompt: per-layer transcoders in place of the MLPs, attention
patterns and norm scales frozen, and an error node at each (layer, position) for what the transcoder misses.

On the prompt it was built for, the replacement model gives the model's own logits (each MLP's output
is kept as transcoder features + skip connection + ``b_dec`` + error, which add up to it). With the
attention patterns (``attn.hook_pattern``) and RMSNorm scales (``ln1`` / ``ln2`` / ``ln_final``
``hook_scale``) frozen at their values on the prompt, and the MLPs cut (their outputs are constants:
the features' activations are nodes, not functions), every remaining path between two nodes is linear.
A transcoder's skip connection (``W_skip``) stays a linear path from its input to its output.

``ReplacementModel(model, transcoders).forward(tokens, copies)`` runs that linearised forward with
``copies`` identical rows (one per attribution target of a batch) and keeps what attribution needs:
the embeddings and each layer's MLP output as leaves (gradients there are the direct effects on a
source's output), each transcoder's input (where a feature's encoder reads), and the last position's
logits.

Transcoders: ``analyses.saes.SAE`` objects with ``hook_name`` ``blocks.{L}.ln2.hook_normalized`` (what
``train_sae`` trains per-layer transcoders on) or ``blocks.{L}.hook_resid_mid``, ``hook_name_out``
``blocks.{L}.hook_mlp_out``, architecture standard, jumprelu or topk and no input normalisation. Layers
without one keep their whole MLP output as the error node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    """What the clean forward on the prompt gives: logits, transcoder inputs, MLP outputs, activations."""

    tokens: torch.Tensor  # [P]
    logits: torch.Tensor  # [P, V]
    embed: torch.Tensor  # [P, M]
    mlp_out: torch.Tensor  # [L, P, M]
    tc_in: dict[int, torch.Tensor]  # layer -> [P, d_in] transcoder input
    acts: dict[int, torch.Tensor]  # layer -> [P, d_sae] feature activations
    errors: torch.Tensor  # [L, P, M]


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
        names = (
            ["hook_embed"] + [act_name("mlp_out", i) for i in range(L)] + [self.input_hook(i) for i in self.transcoders]
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
        return PromptState(tokens, logits[0], cache["hook_embed"][0], mlp_out, tc_in, acts, errors)

    def forward(self, state: PromptState, copies: int):
        """The linearised forward with ``copies`` rows: (embed leaf, {layer: MLP-output leaf},
        {layer: transcoder input}, last-position logits [copies, V])."""
        model = self.model
        tokens = state.tokens[None].repeat(copies, 1)
        leaves: dict[int, torch.Tensor] = {}
        inputs: dict[int, torch.Tensor] = {}
        embed: list[torch.Tensor] = []

        def freeze(t, hook):
            return t.detach()

        def leaf_embed(t, hook):
            e = t.detach().requires_grad_(True)
            embed.append(e)
            return e

        def keep_input(t, hook):
            inputs[hook.layer] = t
            return t

        def cut_mlp(t, hook):
            layer = hook.layer
            leaf = state.mlp_out[layer].to(t.dtype).expand_as(t).clone().requires_grad_(True)
            leaves[layer] = leaf
            tr = self.transcoders.get(layer)
            if tr is not None and tr.cfg.skip_connection:
                skip = skip_output(tr, inputs[layer]).to(t.dtype)
                return leaf + (skip - skip.detach())
            return leaf

        n = model.n_layers
        fwd = [("hook_embed", leaf_embed)]
        for i in range(n):
            fwd += [
                (f"blocks.{i}.ln1.hook_scale", freeze),
                (f"blocks.{i}.ln2.hook_scale", freeze),
                (act_name("pattern", i), freeze),
                (act_name("mlp_out", i), cut_mlp),
            ]
        fwd += [(self.input_hook(i), keep_input) for i in self.transcoders]
        fwd += [("ln_final.hook_scale", freeze)]
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
            logits = model(tokens)[:, -1]
        return embed[0], leaves, inputs, logits
