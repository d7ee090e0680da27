"""ActivationCache: the activations of one run, by hook name, with the helpers people use daily."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Iterator

import torch

from .errors import HookError, InputAssertionError, InputError
from .hook_points import act_name

if TYPE_CHECKING:
    from .model import HookedLlama


class ActivationCache:
    """A read-only mapping hook name → tensor, plus residual-stream and per-head helpers.

    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["pattern", 3]`` and ``cache["resid_post", -1]``
    all work. Helpers follow TransformerLens's names and semantics, but nothing is folded: the final
    RMSNorm is applied with the scale cached at ``ln_final.hook_scale`` and the norm's own weight.
    """

    def __init__(self, store: dict[str, torch.Tensor], model: HookedLlama, has_batch_dim: bool = True) -> None:
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
        if key.endswith("_grad"):  # a gradient cached by incl_bwd, under any spelling of its hook point
            return self._key(key[: -len("_grad")]) + "_grad"
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
        """Drop the batch dimension (size 1) of every activation, in place, and return this cache (as
        TransformerLens does). A second call does nothing but warn."""
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: this cache has no batch dimension any more", stacklevel=2)
            return self
        for name, t in self.store.items():
            if t.dim() == 0 or t.shape[0] != 1:
                raise InputAssertionError(
                    f"remove_batch_dim needs batch size 1, {name} has {t.shape[0] if t.dim() else 0}; "
                    "run one prompt, or pick one with apply_slice_to_batch_dim(i)"
                )
        for name in list(self.store):
            self.store[name] = self.store[name][0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache of the examples ``batch_slice`` picks (an int drops the batch dimension; a tuple,
        a ``slice``, a list, or TransformerLens's ``Slice``)."""
        if not self.has_batch_dim:
            raise HookError("this cache has no batch dimension to slice (remove_batch_dim was applied)")
        spec = _unwrap_slice(batch_slice)
        store = {k: _slice(v, spec, dim=0) for k, v in self.store.items()}
        return ActivationCache(store, self.model, has_batch_dim=self.has_batch_dim and not isinstance(spec, int))

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)`` for the whole process, as TransformerLens does (with a warning);
        ``torch.no_grad()`` / ``torch.inference_mode()`` blocks are the local way."""
        warnings.warn(f"toggle_autodiff changed torch's global autograd state to {bool(mode)}", stacklevel=2)
        torch.set_grad_enabled(mode)

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

    def _finish_stack(self, parts, labels, stop, pos_slice, incl_remainder, apply_ln, return_labels, mlp_input=False):
        """Concatenate per-component parts [C, B, P, D]; add the remainder of the residual stream into
        layer ``stop`` (its MLP with ``mlp_input``) and apply that norm when asked; labels with them."""
        stack = torch.cat(parts) if parts else self._empty(pos_slice)
        if incl_remainder:
            stack = torch.cat([stack, (self._remainder_target(stop, mlp_input, pos_slice) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, stop, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Add ``blocks.{l}.attn.hook_result`` [B, P, H, M] (each head's output, o_proj bias excluded) to the
        cache for every layer, from ``hook_z`` and o_proj, as TransformerLens does (a warning if all were
        cached already)."""
        names = [act_name("result", i) for i in range(self.model.n_layers)]
        if all(n in self.store for n in names):
            warnings.warn("compute_head_results: the head results are cached already", stacklevel=2)
            return
        for i, name in enumerate(names):
            if name not in self.store:
                self.store[name] = self.head_results(i)

    def head_results(self, layer: int) -> torch.Tensor:
        """[B, P, H, M] per-head output of ``layer`` (from hook_result, or z × o_proj)."""
        layer = self._block(layer)
        name = act_name("result", layer)
        if name in self.store:
            return self.store[name]
        z = self["z", layer]
        w = self.model.model.layers[layer].self_attn.o_proj.weight.view(-1, self.model.n_heads, self.model.d_head)
        return torch.einsum("...hd,mhd->...hm", z, w.to(z.device, z.dtype))

    def neuron_results(self, layer: int, neurons=None, pos_slice=None, project_output_onto=None) -> torch.Tensor:
        """[neuron, B, P, M] contribution of each MLP neuron of one ``layer`` (down_proj bias excluded);
        with ``project_output_onto`` ([M] or [M, k]) its projection, [neuron, B, P] or [neuron, B, P, k],
        computed without the [neuron, …, M] intermediate."""
        layer = self._block(layer)
        post = _slice(self["post", layer], pos_slice)  # [B, P, F]
        w = self.model.model.layers[layer].mlp.down_proj.weight.detach().T  # [F, M]
        if neurons is not None:
            idx = _unwrap_slice(neurons)
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1) if not isinstance(idx, slice) else idx
            post, w = post[..., idx], w[idx]
        w = w.to(post.device, post.dtype)
        proj, squeeze = _projection(project_output_onto, w)
        if proj is not None:
            w = w @ proj  # [F, k]
        out = post.movedim(-1, 0)[..., None] * w.reshape((w.shape[0],) + (1,) * (post.dim() - 1) + (w.shape[1],))
        return out[..., 0] if squeeze else out

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None, project_output_onto=None):
        """TransformerLens's layout of ``neuron_results``: [B, P, neuron, M] (or the projection's)."""
        out = self.neuron_results(layer, neuron_slice, pos_slice, project_output_onto)
        squeezed = project_output_onto is not None and torch.as_tensor(project_output_onto).dim() == 1
        return out.movedim(0, -1 if squeezed else -2)

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice=None,
        neuron_slice=None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto=None,
        mlp_input: bool = False,
    ):
        """Every MLP neuron's contribution of every layer before ``layer`` (TransformerLens's semantics;
        -1 = all layers), [layer*neuron (+1), B, P, M], labels ``L{l}N{n}``. ``neuron_slice`` picks
        neurons (an int, a list or a slice); ``incl_remainder`` appends the rest of the residual stream
        entering ``layer`` (its MLP with ``mlp_input``); ``apply_ln`` normalises as that norm's input.
        ``project_output_onto`` ([M] or [M, k]) returns each component's projection instead of its
        d_model vector (norm applied first), without the [neuron, …, M] intermediate."""
        stop = self._boundary(layer)
        idx = _slice(torch.arange(self.model.d_mlp), neuron_slice, dim=0).reshape(-1)
        labels = [f"L{i}N{j}" for i in range(stop) for j in idx.tolist()]
        if project_output_onto is None:
            parts = [self.neuron_results(i, idx, pos_slice) for i in range(stop)]
            return self._finish_stack(
                parts, labels, stop, pos_slice, incl_remainder, apply_ln, return_labels, mlp_input=mlp_input
            )
        proj = torch.as_tensor(project_output_onto)
        folded = self._ln_folded(proj, stop, mlp_input) if apply_ln else proj
        parts = [self.neuron_results(i, idx, pos_slice, folded) for i in range(stop)]
        stack = torch.cat(parts) if parts else _project(self._empty(pos_slice), proj)[0]
        if apply_ln:
            stack = stack / self._ln_scale(stop, mlp_input, pos_slice, stack)
        if incl_remainder:
            rest = self._remainder_target(stop, mlp_input, pos_slice)
            for i in range(stop):  # minus the neurons' sum, computed in d_model without the per-neuron terms
                post = _slice(self["post", i], pos_slice)[..., idx]
                rest = rest - post @ self._down(i)[idx].to(post.device, post.dtype)
            rest = rest[None]
            if apply_ln:
                rest = self.apply_ln_to_stack(rest, stop, mlp_input=mlp_input, pos_slice=pos_slice)
            rest, _ = _project(rest, proj)
            stack = torch.cat([stack, rest.to(stack.dtype)])
            labels.append("remainder")
        return (stack, labels) if return_labels else stack

    def _down(self, layer: int) -> torch.Tensor:
        return self.model.model.layers[layer].mlp.down_proj.weight.detach().T  # [F, M]

    def _norm_at(self, stop: int, mlp_input: bool):
        """(RMSNorm module, cached scale name) of the input of block ``stop`` (its MLP), or the final norm."""
        if stop == self.model.n_layers:
            if mlp_input:
                raise InputError("mlp_input=True needs a layer below n_layers (the final norm has no MLP)")
            return self.model.model.norm, "ln_final.hook_scale"
        block = self.model.model.layers[stop]
        if mlp_input:
            return block.post_attention_layernorm, act_name("ln2_scale", stop)
        return block.input_layernorm, act_name("ln1_scale", stop)

    def _ln_folded(self, proj: torch.Tensor, stop: int, mlp_input: bool) -> torch.Tensor:
        """A projection with the norm's weight folded in: (x / s * w) @ p == (x @ (w p)) / s."""
        norm, _ = self._norm_at(stop, mlp_input)
        w = norm.weight.detach().to(proj.device, proj.dtype)
        return proj * (w if proj.dim() == 1 else w[:, None])

    def _ln_scale(self, stop: int, mlp_input: bool, pos_slice, like: torch.Tensor) -> torch.Tensor:
        """The cached norm scale [B, P] of that input, shaped to divide a projected stack [C, B, P(, k)]."""
        _, name = self._norm_at(stop, mlp_input)
        if name not in self.store:
            raise HookError(f"apply_ln needs {name} in the cache; cache it (names_filter) or cache everything")
        scale = _slice(self.store[name], pos_slice)[..., 0]  # [B, P]
        while scale.dim() < like.dim() - 1:
            scale = scale[..., None]
        return scale.to(like.device, like.dtype)

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice=None,
        return_labels: bool = False,
        project_output_onto=None,
    ):
        """Every head, every neuron (or MLP layer with ``expand_neurons=False``), the embedding and the
        summed biases that make the residual stream entering ``layer`` (its MLP with ``mlp_input``):
        [component, B, P, M] in TransformerLens's order (heads, neurons, ``embed``, ``bias``).
        ``project_output_onto`` ([M] or [M, k]) gives each component's projection instead (after the norm
        with ``apply_ln``); neurons are projected without the [neuron, …, M] intermediate."""
        stop = self._boundary(layer)
        heads, labels = self.stack_head_results(stop + (1 if mlp_input else 0), return_labels=True, pos_slice=pos_slice)
        parts, neuron_part = [heads], None
        if stop > 0:
            if expand_neurons and project_output_onto is not None:
                neuron_part, more = self.stack_neuron_results(
                    stop,
                    pos_slice=pos_slice,
                    return_labels=True,
                    apply_ln=apply_ln,
                    project_output_onto=project_output_onto,
                    mlp_input=mlp_input,
                )
            elif expand_neurons:
                neurons, more = self.stack_neuron_results(stop, pos_slice=pos_slice, return_labels=True)
                parts.append(neurons)
            else:
                neurons, more = self.decompose_resid(
                    stop, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
                )
                parts.append(neurons)
            labels = labels + more
        embed = _slice(self["hook_embed"], pos_slice)[None]
        bias = self.model.accumulated_bias(stop, mlp_input, include_mlp_biases=expand_neurons)
        tail = [embed, bias.to(embed.device, embed.dtype).expand_as(embed)]
        labels = labels + ["embed", "bias"]
        if neuron_part is None:
            stack = torch.cat(parts + tail)
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, stop, mlp_input=mlp_input, pos_slice=pos_slice)
            if project_output_onto is not None:
                stack, _ = _project(stack, torch.as_tensor(project_output_onto))
            return (stack, labels) if return_labels else stack
        rest = [torch.cat(parts), torch.cat(tail)]
        if apply_ln:
            rest = [self.apply_ln_to_stack(r, stop, mlp_input=mlp_input, pos_slice=pos_slice) for r in rest]
        rest = [_project(r, torch.as_tensor(project_output_onto))[0] for r in rest]
        stack = torch.cat([rest[0], neuron_part.to(rest[0].dtype), rest[1]])
        return (stack, labels) if return_labels else stack

    def _remainder_target(self, stop: int, mlp_input: bool, pos_slice) -> torch.Tensor:
        """What a stack with ``incl_remainder`` sums to: the residual stream entering ``stop`` (its MLP with
        ``mlp_input``), except at ``layer=0``, which TransformerLens reads as the whole model (the last
        block's ``resid_post``: nothing stacked, everything in the remainder)."""
        if stop == 0 and not mlp_input:
            return _slice(self["resid_post", self.model.n_layers - 1], pos_slice)
        return self._resid_into(stop, mlp_input, pos_slice)

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
            return _normalised(x.to(stack.dtype) * weight)
        if scale_name not in self.store:
            raise HookError(f"apply_ln needs {scale_name} in the cache; cache it (names_filter) or cache everything")
        scale = _slice(self.store[scale_name], pos_slice)
        if batch_slice is not None and self.has_batch_dim:  # the cache's batch dim, whatever the stack's
            scale = _slice(scale, batch_slice, dim=0)
        return _normalised(stack / scale.to(stack.device, stack.dtype) * weight)

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
        ``tokens`` (minus ``incorrect_tokens``): [component, B, (P)].

        Each component goes through the final norm as TransformerLens does it (divided by the scale cached
        at ``ln_final.hook_scale``, then, since nothing is folded here, multiplied by the norm's weight: see
        ``apply_ln_to_stack``) and is projected onto the unembedding direction of its answer.

        ``tokens`` / ``incorrect_tokens``: one answer for every prompt (an id, or a single-token string such
        as ``" Mary"``), or one per prompt: a list of strings or ids, or an id tensor [B] (TransformerLens
        also takes [B, P] or a [P] tensor of per-position answers). ``pos_slice`` / ``batch_slice``: what the
        stack was sliced with (e.g. ``pos_slice=-1``), so the cached scale is sliced the same way;
        ``has_batch_dim=False`` for a stack without a batch dimension (a cache after ``remove_batch_dim``).

        ``has_ln``: the stack is normalised already (``apply_ln=True`` in ``accumulated_resid``,
        ``decompose_resid``, ``stack_head_results`` …, or ``apply_ln_to_stack``), so the norm is not applied
        again. Applying the norm twice divides by the scale twice and silently shrinks every attribution (by
        the residual's RMS: 17x on the default model's IOI prompt): a stack this cache normalised, or a view of one, passed with
        ``has_ln=False`` is refused.
        """
        stack = residual_stack
        if not has_ln and _is_normalised(stack):
            raise InputError(
                "residual_stack is normalised already (it came from apply_ln=True or apply_ln_to_stack); pass "
                "has_ln=True, or the stack before normalisation",
                param="has_ln",
            )
        if not has_ln:
            stack = self.apply_ln_to_stack(
                stack, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
            )
        directions = self._unembed_dirs(tokens, stack, "tokens")
        if incorrect_tokens is not None:
            wrong = self._unembed_dirs(incorrect_tokens, stack, "incorrect_tokens")
            if wrong.shape != directions.shape:
                raise InputError(
                    f"tokens and incorrect_tokens must have the same shape, got {list(directions.shape[:-1])} and "
                    f"{list(wrong.shape[:-1])}",
                    param="incorrect_tokens",
                )
            directions = directions - wrong
        batch_sliced_to_one = isinstance(_unwrap_slice(batch_slice), int)
        if (
            has_batch_dim
            and not batch_sliced_to_one
            and stack.dim() == 4
            and directions.dim() == 2
            and directions.shape[0] == stack.shape[1]
        ):  # [C, B, P, M] with one answer per prompt [B, M]: the same answer at every position
            directions = directions[:, None, :]
        try:
            torch.broadcast_shapes(stack.shape[1:-1], directions.shape[:-1])
        except RuntimeError:
            raise InputError(
                f"one answer per prompt needs {stack.shape[1] if stack.dim() > 2 else 1} answers for this stack "
                f"{list(stack.shape)}; got answers of shape {list(directions.shape[:-1])}",
                param="tokens",
            ) from None
        return (stack * directions).sum(-1)

    def _unembed_dirs(self, tokens, stack: torch.Tensor, what: str) -> torch.Tensor:
        """Unembedding directions [..., M] of answers given as TransformerLens takes them, or as a list of
        per-prompt strings."""
        W_U = self.model.lm_head.weight  # [V, M]
        ids = self._answer_ids(tokens, what)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= W_U.shape[0]):
            raise InputError(f"{what} must be token ids in 0..{W_U.shape[0] - 1}", param=what)
        return W_U.detach()[ids.to(W_U.device)].to(stack.device, stack.dtype)

    def _answer_ids(self, tokens, what: str) -> torch.Tensor:
        if isinstance(tokens, str):
            return torch.tensor(self.model.to_single_token(tokens))
        if isinstance(tokens, (list, tuple)):
            if not tokens:
                raise InputError(f"{what} is empty; pass one answer, or one per prompt", param=what)
            return torch.stack([self._answer_ids(t, what) for t in tokens])
        if type(tokens).__module__ == "numpy":
            tokens = torch.as_tensor(tokens)
        if isinstance(tokens, torch.Tensor):
            if tokens.is_floating_point() or tokens.is_complex():
                raise InputError(f"{what} must be token ids (integers), got a {tokens.dtype} tensor", param=what)
            return tokens.long()
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            return torch.tensor(tokens)
        raise InputError(
            f"{what} must be a token id, a single-token string, a list of them (one per prompt) or an id "
            f"tensor, got {type(tokens).__name__}",
            param=what,
        )

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.store)} activations, {self.nbytes / 2**20:.1f} MiB)"

    def _repr_html_(self) -> str:
        from .display import cache_html

        return cache_html(self)


_SHORT_GLOBAL = {"embed", "logits", "ln_final_scale", "ln_final_normalized"}


def _normalised(t: torch.Tensor) -> torch.Tensor:
    """Mark a stack this cache normalised, so ``logit_attrs`` can refuse to normalise it twice."""
    t._scalpel_normalised = True
    return t


def _is_normalised(t: torch.Tensor) -> bool:
    """A stack ``_normalised`` marked, or a view of one (indexing keeps ``_base``)."""
    base = getattr(t, "_base", None)
    return bool(getattr(t, "_scalpel_normalised", False) or getattr(base, "_scalpel_normalised", False))


def _projection(project_output_onto, like: torch.Tensor):
    """(projection as [M, k] on ``like``'s device and dtype, whether to squeeze k) or (None, False)."""
    if project_output_onto is None:
        return None, False
    proj = torch.as_tensor(project_output_onto).to(like.device, like.dtype)
    if proj.dim() not in (1, 2):
        raise InputError(f"project_output_onto must be [d_model] or [d_model, k], got {list(proj.shape)}")
    return (proj[:, None], True) if proj.dim() == 1 else (proj, False)


def _project(stack: torch.Tensor, project_output_onto) -> tuple[torch.Tensor, bool]:
    """``stack`` [..., M] onto ``project_output_onto``: [...] for a [M] vector, [..., k] for [M, k]."""
    proj, squeeze = _projection(project_output_onto, stack)
    out = stack @ proj
    return (out[..., 0] if squeeze else out), squeeze


def _unwrap_slice(spec):
    """TransformerLens's ``Slice`` object as the int / slice / index array it holds; numpy arrays as tensors."""
    if hasattr(spec, "apply") and hasattr(spec, "slice"):  # transformer_lens.utilities.Slice
        spec = spec.slice
    if type(spec).__module__ == "numpy":
        spec = torch.as_tensor(spec)
        spec = int(spec) if spec.dim() == 0 else spec
    return spec


def slice_positions(t: torch.Tensor, name: str, pos_slice) -> torch.Tensor:
    """``run_with_cache(pos_slice=…)`` on one activation of a batched layout: positions are dim 1, and the
    query dim of attention scores and patterns (TransformerLens's rule)."""
    if pos_slice is None or t.dim() < 2:
        return t
    if isinstance(pos_slice, int) and not isinstance(pos_slice, bool):  # a plain int keeps the dim (a Slice drops it)
        pos_slice = [pos_slice]
    return _slice(t, pos_slice, dim=-2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1)


def _slice(t: torch.Tensor, spec, dim: int = -2) -> torch.Tensor:
    """Apply a TransformerLens-style slice on ``dim`` (default: positions, the dim before d_model).

    ``None`` keeps everything; an int selects one index and drops the dim; a tuple is
    ``slice(*tuple)``; a ``slice`` as is; a list, tensor or numpy array of indices picks those;
    TransformerLens's ``Slice`` objects mean what they hold.
    """
    spec = _unwrap_slice(spec)
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
