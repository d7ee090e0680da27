"""ActivationCache: the activations of one run, by hook name, with the helpers people use daily."""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import HookError, InputError
from .hook_points import act_name


class ActivationCache:
    """A read-only mapping hook name → tensor, plus residual-stream and per-head helpers.

    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["pattern", 3]`` and ``cache["resid_post", -1]``
    all work. Helpers follow TransformerLens's names and semantics, but nothing is folded: the final
    RMSNorm is applied with the scale cached at ``ln_final.hook_scale`` and the norm's own weight.
    """

    def __init__(self, store: dict[str, torch.Tensor], model, has_batch_dim: bool = True) -> None:
        self.store = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    @property
    def cache_dict(self) -> dict[str, torch.Tensor]:
        """The underlying name → tensor dict (TransformerLens's attribute name)."""
        return self.store

    # ----------------------------------------------------------------- mapping
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            name, layer, *rest = key
            if layer is not None and layer < 0:
                layer += self.model.n_layers
            return act_name(name, layer, *rest)
        if key in self.store:
            return key
        name = act_name(key) if key in _SHORT_GLOBAL or "." not in key else key
        return self.model.hook_registry.canonical(name)

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name in self.store:
            return self.store[name]
        if name in self.model.hook_registry.points:
            hint = (
                (
                    "hook_result is computed only when asked: run_with_cache(..., names_filter=...) naming it, "
                    "or use cache.stack_head_results()"
                )
                if name.endswith("hook_result")
                else "run_with_cache with a names_filter that includes it"
            )
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
        return ActivationCache(
            {k: v.to(device=device, dtype=dtype) for k, v in self.store.items()}, self.model, self.has_batch_dim
        )

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop a batch dimension of size 1 from every activation (a new cache)."""
        for name, t in self.store.items():
            if t.shape[0] != 1:
                raise HookError(f"remove_batch_dim needs batch size 1, {name} has {t.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.store.items()}, self.model, has_batch_dim=False)

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

    # ----------------------------------------------------------------- layer arguments
    def _boundary(self, layer, what: str = "layer") -> int:
        """A residual-stream boundary 0..n_layers (n_layers = the unembed); None and -1 mean n_layers,
        other negatives count back from it (-2 = the last layer's input), as TransformerLens's -1 does."""
        n = self.model.n_layers
        if layer is None:
            return n
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
            raise InputError(
                f"{what}={layer!r} is out of range; pass 0..{n} ({n} = the final residual stream) "
                f"or -{n + 1}..-1 (-1 = {n})"
            )
        return layer + n + 1 if layer < 0 else layer

    # ----------------------------------------------------------------- stacking
    def stack_activation(
        self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None
    ) -> torch.Tensor:
        """[layer, ...] of a per-layer activation for every layer before ``layer`` (default: all),
        e.g. ``stack_activation("pattern")``."""
        stop = self._boundary(layer)
        if stop == 0:  # nothing before layer 0: an empty stack of the right shape
            first = self[activation_name, 0, sublayer_type]
            return first.new_zeros((0,) + tuple(first.shape))
        return torch.stack([self[activation_name, i, sublayer_type] for i in range(stop)])

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice=None,
        mlp_input: bool = False,
        return_labels: bool = False,
        recompute_ln: bool | None = None,
    ):
        """The residual stream at each layer boundary up to and including ``layer`` (TransformerLens's
        semantics): ``0_pre … {layer}_pre``, with ``final_post`` when ``layer`` is n_layers (the default,
        also -1). ``incl_mid`` adds ``{l}_mid`` for the layers before ``layer``; ``mlp_input`` adds
        ``{layer}_mid``. [component, B, P, M].

        ``apply_ln``: normalise as the input of ``layer`` would be. At the unembed each component is
        normalised by its own RMS (``recompute_ln``, the default there, as TransformerLens 4.3 does: a
        logit lens); ``recompute_ln=False`` divides every component by the one cached final scale instead.
        """
        n = self.model.n_layers
        stop = self._boundary(layer)
        parts, labels = [], []
        for i in range(stop + 1):
            if i == n:
                parts.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < stop) or (mlp_input and i == stop):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([_slice(p, pos_slice) for p in parts])
        if apply_ln:
            recompute = (stop == n) if recompute_ln is None else recompute_ln
            stack = self.apply_ln_to_stack(
                stack, stop, mlp_input=mlp_input, pos_slice=pos_slice, recompute_ln=recompute
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice=None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """Everything written to the residual stream before ``layer`` (default and -1: the unembed):
        embed, then ``{l}_attn_out`` / ``{l}_mlp_out`` for each earlier layer, plus ``{layer}_attn_out``
        with ``mlp_input``. ``mode`` "attn" / "mlp" keeps one kind. The components sum to the residual
        stream entering ``layer`` (or its MLP). [component, B, P, M]."""
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        stop = self._boundary(layer)
        if mlp_input and stop == self.model.n_layers:
            raise InputError("mlp_input=True needs a layer below n_layers (the unembed has no MLP)")
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
        for i in range(stop):
            if mode != "mlp":
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if mode != "attn":
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp":
            parts.append(self["attn_out", stop])
            labels.append(f"{stop}_attn_out")
        stack = self._stack(parts, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, stop, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice=None,
        apply_ln: bool = False,
    ):
        """Per-head contributions to the residual stream of every layer before ``layer`` (default: all),
        [layer*head (+1), B, P, M]; o_proj bias excluded. ``incl_remainder`` appends the rest of the
        residual stream entering ``layer`` (so the stack sums to it).

        Uses cached ``hook_result`` where present, otherwise computes it from ``hook_z`` and o_proj.
        """
        stop = self._boundary(layer)
        parts, labels = [], []
        for i in range(stop):
            parts.append(_slice(self.head_results(i), pos_slice, dim=-3).movedim(-2, 0))  # [H, B, P, M]
            labels += [f"L{i}H{h}" for h in range(self.model.n_heads)]
        return self._finish_stack(parts, labels, stop, pos_slice, incl_remainder, apply_ln, return_labels)

    def _finish_stack(self, parts, labels, stop, pos_slice, incl_remainder, apply_ln, return_labels):
        """Concatenate per-component parts [C, B, P, D]; add the remainder of the residual stream into
        layer ``stop`` and apply the final norm when asked; labels with them."""
        stack = torch.cat(parts) if parts else self._empty(pos_slice)
        if incl_remainder:
            stack = torch.cat([stack, (self._resid_into(stop, False, pos_slice) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, stop, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """[B, P, H, M] per-head output of ``layer`` (from hook_result, or z × o_proj)."""
        layer = self._block(layer)
        name = act_name("result", layer)
        if name in self.store:
            return self.store[name]
        z = self["z", layer]
        w = self.model.model.layers[layer].self_attn.o_proj.weight.view(-1, self.model.n_heads, self.model.d_head)
        return torch.einsum("...hd,mhd->...hm", z, w.to(z.device, z.dtype))

    def neuron_results(self, layer: int, neurons=None, pos_slice=None) -> torch.Tensor:
        """[neuron, B, P, M] contribution of each MLP neuron of one ``layer`` (down_proj bias excluded)."""
        layer = self._block(layer)
        post = _slice(self["post", layer], pos_slice)  # [B, P, F]
        w = self.model.model.layers[layer].mlp.down_proj.weight  # [M, F]
        if neurons is not None:
            idx = torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
            post, w = post[..., idx], w[:, idx]
        return post.movedim(-1, 0)[..., None] * w.T.to(post.device, post.dtype).reshape(
            (w.shape[1],) + (1,) * (post.dim() - 1) + (w.shape[0],)
        )

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice=None,
        neuron_slice=None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
    ):
        """Every MLP neuron's contribution of every layer before ``layer`` (TransformerLens's semantics;
        -1 = all layers), [layer*neuron (+1), B, P, M], labels ``L{l}N{n}``. ``neuron_slice`` picks
        neurons (an int, a list or a slice); ``incl_remainder`` appends the rest of the residual stream."""
        stop = self._boundary(layer)
        idx = _slice(torch.arange(self.model.d_mlp), neuron_slice, dim=0).reshape(-1)
        parts = [self.neuron_results(i, idx, pos_slice) for i in range(stop)]
        labels = [f"L{i}N{j}" for i in range(stop) for j in idx.tolist()]
        return self._finish_stack(parts, labels, stop, pos_slice, incl_remainder, apply_ln, return_labels)

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice=None,
        return_labels: bool = False,
    ):
        """Every head, every neuron (or MLP layer with ``expand_neurons=False``), the embedding and the
        summed biases that make the residual stream entering ``layer`` (its MLP with ``mlp_input``):
        [component, B, P, M] in TransformerLens's order (heads, neurons, ``embed``, ``bias``)."""
        stop = self._boundary(layer)
        heads, labels = self.stack_head_results(stop + (1 if mlp_input else 0), return_labels=True, pos_slice=pos_slice)
        parts = [heads]
        if stop > 0:
            if expand_neurons:
                neurons, more = self.stack_neuron_results(stop, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, more = self.decompose_resid(
                    stop, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
                )
            parts.append(neurons)
            labels = labels + more
        embed = _slice(self["hook_embed"], pos_slice)[None]
        bias = self._bias_into(stop, mlp_input, expand_neurons).to(embed.device, embed.dtype).expand_as(embed)
        parts += [embed, bias]
        labels = labels + ["embed", "bias"]
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, stop, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _bias_into(self, stop: int, mlp_input: bool, include_mlp: bool) -> torch.Tensor:
        """Sum of the o_proj (and down_proj) biases written before ``stop`` ([M]; zeros for plain Llama)."""
        layers = self.model.model.layers
        total = torch.zeros(self.model.d_model, device=self.model.device, dtype=self.model.dtype)
        for i in range(min(stop + (1 if mlp_input else 0), len(layers))):
            o_bias = layers[i].self_attn.o_proj.bias
            if o_bias is not None:
                total = total + o_bias
            if include_mlp and i < stop and layers[i].mlp.down_proj.bias is not None:
                total = total + layers[i].mlp.down_proj.bias
        return total.detach()

    def _resid_into(self, stop: int, mlp_input: bool, pos_slice) -> torch.Tensor:
        n = self.model.n_layers
        t = self["resid_post", n - 1] if stop == n else self["resid_mid" if mlp_input else "resid_pre", stop]
        return _slice(t, pos_slice)

    def _empty(self, pos_slice) -> torch.Tensor:
        src = _slice(self["hook_embed"], pos_slice)
        return src.new_zeros((0,) + tuple(src.shape))

    def _stack(self, parts: list[torch.Tensor], pos_slice) -> torch.Tensor:
        return torch.stack([_slice(p, pos_slice) for p in parts]) if parts else self._empty(pos_slice)

    def _block(self, layer: int) -> int:
        n = self.model.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise InputError(f"layer={layer!r} is out of range; the model has {n} layers (0..{n - 1}, or -{n}..-1)")
        return layer % n

    # ----------------------------------------------------------------- final norm and logits
    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice=None,
        batch_slice=None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """Treat each component of ``residual_stack`` as input of the RMSNorm before ``layer`` (default
        and -1: the final norm; ``mlp_input``: ln2) and normalise it linearly: divide by the scale cached
        at that norm's ``hook_scale`` and multiply by the norm's weight, so components sum to the
        normalised residual stream (TransformerLens leaves the weight out because it folds it into the
        next matrices; nothing is folded here). ``recompute_ln=True`` at the unembed normalises each
        component by its own RMS instead (a logit lens). ``pos_slice`` / ``batch_slice`` say what the
        stack was sliced with, so the scale is sliced the same way."""
        n = self.model.n_layers
        stop = self._boundary(layer)
        if stop == n:
            if mlp_input:
                raise InputError("mlp_input=True needs a layer below n_layers (the final norm has no MLP)")
            norm, scale_name = self.model.model.norm, "ln_final.hook_scale"
        else:
            block = self.model.model.layers[stop]
            norm = block.post_attention_layernorm if mlp_input else block.input_layernorm
            scale_name = act_name("ln2_scale" if mlp_input else "ln1_scale", stop)
        stack = residual_stack
        if has_batch_dim and batch_slice is not None:
            stack = _slice(stack, batch_slice, dim=1)
        weight = norm.weight.detach().to(stack.device, stack.dtype)
        if recompute_ln and stop == n:
            x = stack.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return x.to(stack.dtype) * weight
        if scale_name not in self.store:
            raise HookError(f"apply_ln needs {scale_name} in the cache; cache it (names_filter) or cache everything")
        scale = _slice(self.store[scale_name], pos_slice)
        if has_batch_dim and batch_slice is not None:
            scale = _slice(scale, batch_slice, dim=0)
        return stack / scale.to(stack.device, stack.dtype) * weight

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens,
        incorrect_tokens=None,
        pos_slice=None,
        batch_slice=None,
        has_batch_dim: bool = True,
        has_ln: bool = False,
    ) -> torch.Tensor:
        """Direct logit attribution of each component of ``residual_stack`` [component, B, (P,) M] to
        ``tokens`` (minus ``incorrect_tokens``): components go through the final norm (cached scale and
        weight, see ``apply_ln_to_stack``) unless ``has_ln``, then onto the unembedding directions.
        ``tokens``: one id or single-token string, or one per prompt [B]. ``pos_slice`` is what the stack
        was sliced with (e.g. -1)."""
        stack = residual_stack
        if not has_ln:
            stack = self.apply_ln_to_stack(
                stack, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
            )
        directions = self._unembed_dirs(tokens, stack)
        if incorrect_tokens is not None:
            directions = directions - self._unembed_dirs(incorrect_tokens, stack)
        if has_batch_dim and stack.dim() == 4 and directions.dim() == 2:  # [C, B, P, M], [B, M]: per position
            directions = directions[:, None, :]
        return (stack * directions).sum(-1)

    def _unembed_dirs(self, tokens, stack: torch.Tensor) -> torch.Tensor:
        W_U = self.model.lm_head.weight  # [V, M]
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=W_U.device)
        return W_U[ids].to(stack.device, stack.dtype)  # [..., M]

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.store)} activations, {self.nbytes / 2**20:.1f} MiB)"

    def _repr_html_(self) -> str:
        from .display import cache_html

        return cache_html(self)


_SHORT_GLOBAL = {"embed", "logits", "ln_final_scale", "ln_final_normalized"}


def _slice(t: torch.Tensor, spec, dim: int = -2) -> torch.Tensor:
    """Apply a TransformerLens-style slice on ``dim`` (default: positions, the dim before d_model).

    ``None`` keeps everything; an int selects one index and drops the dim; a tuple is
    ``slice(*tuple)``; a ``slice`` as is; a list or tensor of indices picks those.
    """
    if spec is None:
        return t
    if isinstance(spec, bool):
        raise InputError(f"cannot slice with {spec!r}; pass an int, a tuple, a slice or a list of indices")
    if isinstance(spec, int):
        return t.select(dim, spec)
    if isinstance(spec, tuple):
        spec = slice(*spec)
    if isinstance(spec, slice):
        index = [slice(None)] * t.dim()
        index[dim] = spec
        return t[tuple(index)]
    idx = torch.as_tensor(spec, dtype=torch.long, device=t.device).reshape(-1)
    return t.index_select(dim, idx % t.shape[dim])
