"""ActivationCache: the activations of one run, by hook name, with the helpers people use daily."""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import HookError
from .hook_points import act_name


class ActivationCache:
    """A read-only mapping hook name → tensor, plus residual-stream and per-head helpers.

    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["pattern", 3]`` and ``cache["resid_post", -1]``
    all work. Helpers follow TransformerLens's names and semantics, but nothing is folded: the final
    RMSNorm is applied with the scale cached at ``ln_final.hook_scale`` and the norm's own weight.
    """

    def __init__(self, store: dict[str, torch.Tensor], model) -> None:
        self.store = store
        self.model = model

    # ----------------------------------------------------------------- mapping
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            name, layer = key
            if layer is not None and layer < 0:
                layer += self.model.n_layers
            return act_name(name, layer)
        return act_name(key) if key in _SHORT_GLOBAL else key

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name in self.store:
            return self.store[name]
        if name in self.model.hook_registry.points:
            hint = ("hook_result is computed only when asked: run_with_cache(..., names_filter=...) naming it, "
                    "or use cache.stack_head_results()") if name.endswith("hook_result") else \
                "run_with_cache with a names_filter that includes it"
            raise HookError(f"{name!r} was not cached; {hint}")
        self.model.hook_registry.get(name)  # raises with the closest valid names
        raise HookError(f"{name!r} was not cached")

    def __contains__(self, key) -> bool:
        return self._key(key) in self.store

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return self.store.keys()

    def values(self):
        return self.store.values()

    def items(self):
        return self.store.items()

    def to(self, device=None, dtype=None) -> "ActivationCache":
        return ActivationCache({k: v.to(device=device, dtype=dtype) for k, v in self.store.items()}, self.model)

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop a batch dimension of size 1 from every activation."""
        for name, t in self.store.items():
            if t.shape[0] != 1:
                raise HookError(f"remove_batch_dim needs batch size 1, {name} has {t.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.store.items()}, self.model)

    @property
    def nbytes(self) -> int:
        """Bytes the cache keeps alive, each storage counted once: activations that are one tensor
        (``blocks.{i}.hook_resid_post`` and ``blocks.{i+1}.hook_resid_pre``, ``hook_q`` and the q_proj
        output) are stored once, and cached logits are the returned logits."""
        storages = {}
        for t in self.store.values():
            s = t.untyped_storage()
            storages[(t.device, s.data_ptr())] = s.nbytes()
        return sum(storages.values())

    # ----------------------------------------------------------------- stacking
    def stack_activation(self, name: str) -> torch.Tensor:
        """[layer, ...] of a per-layer activation, e.g. ``stack_activation("pattern")``."""
        return torch.stack([self[name, i] for i in range(self.model.n_layers)])

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, return_labels: bool = False):
        """Residual stream entering each layer up to ``layer`` (default: all, plus the final one).

        [component, B, P, M]; labels like ``0_pre``, ``0_mid``, ``final_post``.
        """
        n = self.model.n_layers
        layer = n if layer is None else layer
        parts, labels = [], []
        for i in range(layer):
            parts.append(self["resid_pre", i]); labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self["resid_mid", i]); labels.append(f"{i}_mid")
        if layer == n:
            parts.append(self["resid_post", n - 1]); labels.append("final_post")
        stack = torch.stack(parts)
        stack = _slice_pos(stack, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, apply_ln: bool = False,
                        pos_slice=None, return_labels: bool = False):
        """Everything written to the residual stream before ``layer``: embed, then attn_out / mlp_out per
        layer. Sums to ``resid_pre`` of ``layer`` (or the final resid_post). [component, B, P, M]."""
        n = self.model.n_layers
        layer = n if layer is None else layer
        parts, labels = [self["hook_embed"]], ["embed"]
        for i in range(layer):
            parts.append(self["attn_out", i]); labels.append(f"{i}_attn_out")
            if i < layer - 1 or not mlp_input:
                parts.append(self["mlp_out", i]); labels.append(f"{i}_mlp_out")
        stack = _slice_pos(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = None, pos_slice=None, apply_ln: bool = False,
                           return_labels: bool = False):
        """Per-head contributions to the residual stream (o_proj bias excluded), [layer*head, B, P, M].

        Uses cached ``hook_result`` where present, otherwise computes it from ``hook_z`` and o_proj.
        """
        layer = self.model.n_layers if layer is None else layer
        parts, labels = [], []
        for i in range(layer):
            parts.append(self.head_results(i).movedim(2, 0))  # [H, B, P, M]
            labels += [f"L{i}H{h}" for h in range(self.model.n_heads)]
        stack = _slice_pos(torch.cat(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """[B, P, H, M] per-head output of ``layer`` (from hook_result, or z × o_proj)."""
        name = act_name("result", layer)
        if name in self.store:
            return self.store[name]
        z = self["z", layer]
        w = self.model.model.layers[layer].self_attn.o_proj.weight.view(-1, self.model.n_heads, self.model.d_head)
        return torch.einsum("bphd,mhd->bphm", z, w.to(z.device, z.dtype))

    def stack_neuron_results(self, layer: int, neurons=None, pos_slice=None) -> torch.Tensor:
        """[neuron, B, P, M] contribution of each MLP neuron of ``layer`` (down_proj bias excluded)."""
        post = self["post", layer]  # [B, P, F]
        w = self.model.model.layers[layer].mlp.down_proj.weight  # [M, F]
        if neurons is not None:
            idx = torch.as_tensor(neurons, dtype=torch.long)
            post, w = post[..., idx], w[:, idx]
        out = post.movedim(-1, 0)[..., None] * w.T.to(post.device, post.dtype)[:, None, None, :]
        return _slice_pos(out, pos_slice)

    # ----------------------------------------------------------------- final norm and logits
    def apply_ln_to_stack(self, stack: torch.Tensor, layer: int | None = None, pos_slice=None) -> torch.Tensor:
        """Apply the final RMSNorm to a stack of residual components, linearly: divide by the scale
        cached at ``ln_final.hook_scale`` (or ``blocks.{layer}.ln1.hook_scale``) and multiply by the norm
        weight, so components sum to the normalised residual stream."""
        if layer is None or layer == self.model.n_layers:
            scale_name, weight = "ln_final.hook_scale", self.model.model.norm.weight
        else:
            scale_name, weight = act_name("ln1_scale", layer), self.model.model.layers[layer].input_layernorm.weight
        if scale_name not in self.store:
            raise HookError(f"apply_ln needs {scale_name} in the cache; cache it (names_filter) or cache everything")
        scale = _slice_pos(self.store[scale_name], pos_slice)
        return stack / scale.to(stack.device, stack.dtype) * weight.to(stack.device, stack.dtype)

    def logit_attrs(self, stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=-1,
                    has_ln: bool = False) -> torch.Tensor:
        """Direct logit attribution of each component in ``stack`` [component, B, (P,) M] to ``tokens``
        (minus ``incorrect_tokens``): components are normalised with the final norm unless ``has_ln``."""
        if not has_ln:
            stack = self.apply_ln_to_stack(stack, pos_slice=pos_slice)
        directions = self._unembed_dirs(tokens, stack)
        if incorrect_tokens is not None:
            directions = directions - self._unembed_dirs(incorrect_tokens, stack)
        if stack.dim() == 4:  # [C, B, P, M] with directions [B, M] -> per position
            return torch.einsum("cbpm,bm->cbp", stack, directions)
        return torch.einsum("cbm,bm->cb", stack, directions)

    def _unembed_dirs(self, tokens, stack: torch.Tensor) -> torch.Tensor:
        W_U = self.model.lm_head.weight  # [V, M]
        ids = torch.as_tensor(tokens, dtype=torch.long, device=W_U.device).reshape(-1)
        dirs = W_U[ids].to(stack.device, stack.dtype)  # [B or 1, M]
        B = stack.shape[1]
        return dirs.expand(B, -1) if dirs.shape[0] == 1 else dirs

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.store)} activations, {self.nbytes / 2**20:.1f} MiB)"

    def _repr_html_(self) -> str:
        from .display import cache_html

        return cache_html(self)


_SHORT_GLOBAL = {"embed", "logits", "ln_final_scale", "ln_final_normalized"}


def _slice_pos(t: torch.Tensor, pos_slice) -> torch.Tensor:
    """Select positions on the dim before the last ([..., B, P, M] -> position dim is -2)."""
    return t if pos_slice is None else t[..., pos_slice, :]
