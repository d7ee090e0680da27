"""The TransformerLens surface of ``HookedLlama``: ``cfg``, weight views, ``blocks[i]``, ``loss_fn`` …

Spelled as TransformerLens 4.3 spells them, with the same shapes and meanings, so TransformerLens code
runs unchanged. Weight views are computed from the Hugging Face parameters on each access (never
folded, never copied into the model): ``W_Q`` [layer, head, d_model, d_head], ``W_K`` / ``W_V``
[layer, kv_head, d_model, d_head] (TransformerLens's ``_W_K``: one per key/value head under GQA),
``W_O`` [layer, head, d_head, d_model], ``W_in`` / ``W_gate`` [layer, d_model, d_mlp],
``W_out`` [layer, d_mlp, d_model], ``W_E`` [vocab, d_model], ``W_U`` [d_model, vocab].
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import config as cfg_helpers
from .errors import HookError, InputAssertionError, InputError

if TYPE_CHECKING:
    from .model import HookedLlama


def _factored_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of ``A @ B`` per leading index, from the inner (small) Gram matrices."""
    return ((A.transpose(-1, -2) @ A) * (B @ B.transpose(-1, -2)).transpose(-1, -2)).sum((-2, -1)).clamp(min=0).sqrt()


class Factored:
    """A matrix kept as a product ``A @ B`` (TransformerLens's ``FactoredMatrix``, the part people use):
    ``AB`` the full product, ``BA``, ``eigenvalues`` (of ``BA``: the non-zero ones of ``AB``), ``svd()``,
    ``T``, ``norm()``, ``shape``, and ``@`` with a tensor or another ``Factored``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B = A, B

    @property
    def AB(self) -> torch.Tensor:
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def T(self) -> "Factored":
        return Factored(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.A.shape[:-1] + self.B.shape[-1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def eigenvalues(self) -> torch.Tensor:
        return torch.linalg.eigvals(self.BA)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, Vh) of ``AB`` [..., m, r], [..., r], [..., r, n] with r the inner size."""
        U, S, Vh = torch.linalg.svd(self.AB, full_matrices=False)
        r = self.A.shape[-1]
        return U[..., :r], S[..., :r], Vh[..., :r, :]

    def norm(self) -> torch.Tensor:
        """Frobenius norm of ``AB``."""
        return self.AB.pow(2).sum((-2, -1)).sqrt()

    def __getitem__(self, idx) -> "Factored":
        idx = idx if isinstance(idx, tuple) else (idx,)
        return Factored(self.A[idx], self.B[idx])

    def __matmul__(self, other):
        if isinstance(other, Factored):
            return Factored(self.A, self.B @ other.AB)
        return Factored(self.A, self.B @ other)

    def __rmatmul__(self, other):
        return Factored(other @ self.A, self.B)

    def __repr__(self) -> str:
        return f"Factored(shape={tuple(self.shape)}, inner={self.A.shape[-1]})"


class TLConfig:
    """``model.cfg``: TransformerLens's config field names, read live from the model's ``LlamaConfig``.

    Settable flags: ``default_prepend_bos`` (False: follow the tokenizer, which for SmolLM2 adds no
    BOS), ``default_padding_side`` (see ``TokenizerMixin.padding_side``) and ``use_attn_result``
    (``set_use_attn_result``).
    """

    _FIELDS = (
        "n_layers",
        "d_model",
        "n_heads",
        "n_key_value_heads",
        "d_head",
        "d_mlp",
        "d_vocab",
        "d_vocab_out",
        "n_ctx",
        "act_fn",
        "eps",
        "normalization_type",
        "positional_embedding_type",
        "rotary_base",
        "rotary_dim",
        "device",
        "dtype",
        "model_name",
        "gated_mlp",
        "final_rms",
        "attn_only",
        "original_architecture",
        "tokenizer_prepends_bos",
        "default_prepend_bos",
        "default_padding_side",
        "tokenizer_appends_eos",
        "use_attn_result",
    )

    def __init__(self, model: HookedLlama) -> None:
        self._model = model
        self.default_prepend_bos = False
        self.use_attn_result = False
        self.tokenizer_appends_eos = False  # True: to_tokens drops the EOS such a tokenizer ends each text with
        self.gated_mlp, self.final_rms, self.attn_only = True, True, False
        self.normalization_type, self.positional_embedding_type = "RMS", "rotary"

    n_layers = property(lambda self: self._model.n_layers)
    d_model = property(lambda self: self._model.d_model)
    n_heads = property(lambda self: self._model.n_heads)
    n_key_value_heads = property(lambda self: self._model.n_kv_heads)
    d_head = property(lambda self: self._model.d_head)
    rotary_dim = property(lambda self: self._model.d_head)
    d_mlp = property(lambda self: self._model.d_mlp)
    d_vocab = property(lambda self: self._model.d_vocab)
    d_vocab_out = property(lambda self: self._model.d_vocab)
    n_ctx = property(lambda self: self._model.config.max_position_embeddings)
    act_fn = property(lambda self: self._model.config.hidden_act)
    eps = property(lambda self: self._model.config.rms_norm_eps)
    rotary_base = property(
        lambda self: float(cfg_helpers.rope_parameters(self._model.config).get("rope_theta", 10000.0))
    )
    device = property(lambda self: self._model.device)
    dtype = property(lambda self: self._model.dtype)
    model_name = property(lambda self: self._model.source or "llama")
    original_architecture = property(
        lambda self: (getattr(self._model.config, "architectures", None) or ["LlamaForCausalLM"])[0]
    )

    @property
    def default_padding_side(self) -> str:
        """Where batches of text are padded when no ``padding_side`` is passed ("left" unless set here or
        on the tokenizer after the model took it)."""
        return self._model.padding_side()

    @default_padding_side.setter
    def default_padding_side(self, side: str) -> None:
        self._model.set_padding_side(side)

    @property
    def tokenizer_prepends_bos(self) -> bool:
        tok = self._model.tokenizer
        if tok is None or tok.bos_token_id is None:
            return False
        return tok("a")["input_ids"][:1] == [tok.bos_token_id]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    def __repr__(self) -> str:
        return "TLConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


class WriteThrough(torch.Tensor):
    """A TransformerLens weight that is not one of the model's tensors (a stack over layers, or the zero
    bias of a projection that has none), edited in place by TransformerLens code (``model.W_O[1, 2] = 0``,
    ``model.W_Q.mul_(2)``, ``model.b_U += 1``): every in-place change to it, or to a view of it, is written
    into the model's parameters at once; a change the model cannot hold (a non-zero value in a missing
    bias) raises ``InputError`` and leaves the model as it was. Reading it is reading a copy."""

    _wt_root: "WriteThrough"
    _wt_write: Any

    @staticmethod
    def of(t: torch.Tensor, write) -> "WriteThrough":
        out = t.as_subclass(WriteThrough)
        out._wt_root, out._wt_write = out, write
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__repr__":
            with torch._C.DisableTorchFunctionSubclass():
                return "WriteThrough(" + torch.Tensor.__repr__(args[0].as_subclass(torch.Tensor)) + ")"
        target = args[0] if args and isinstance(args[0], WriteThrough) else None
        root = getattr(target, "_wt_root", None)
        inplace = root is not None and (name == "__setitem__" or (name.endswith("_") and not name.startswith("_")))
        with torch._C.DisableTorchFunctionSubclass():
            before = root.detach().clone() if inplace else None
            out = func(*args, **kwargs)
        if before is not None:
            root._wt_write(root, before)
        return _keep_root(out, root) if root is not None else out


def _keep_root(out, root: WriteThrough):
    """A view of a write-through tensor stays write-through; anything computed from it is a plain tensor."""
    if isinstance(out, (tuple, list)):
        return type(out)(_keep_root(o, root) for o in out)
    if not isinstance(out, torch.Tensor) or out is root:
        return out
    with torch._C.DisableTorchFunctionSubclass():
        shared = out.numel() > 0 and out.untyped_storage().data_ptr() == root.untyped_storage().data_ptr()
        if not shared:
            return out.as_subclass(torch.Tensor) if isinstance(out, WriteThrough) else out
        view = out.as_subclass(WriteThrough)
    view._wt_root, view._wt_write = root, root._wt_write
    return view


def _changed(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    return ~((now == before) | (now.isnan() & before.isnan()))


# TransformerLens weight name -> (module path in a decoder layer, how the HF tensor is viewed)
_LAYER_WEIGHTS = {
    "W_Q": ("self_attn.q_proj.weight", "heads_in:H"),
    "W_K": ("self_attn.k_proj.weight", "heads_in:G"),
    "W_V": ("self_attn.v_proj.weight", "heads_in:G"),
    "W_O": ("self_attn.o_proj.weight", "heads_out"),
    "b_Q": ("self_attn.q_proj.bias", "heads_bias:H"),
    "b_K": ("self_attn.k_proj.bias", "heads_bias:G"),
    "b_V": ("self_attn.v_proj.bias", "heads_bias:G"),
    "b_O": ("self_attn.o_proj.bias", "vector:M"),
    "W_in": ("mlp.up_proj.weight", "T"),
    "W_gate": ("mlp.gate_proj.weight", "T"),
    "W_out": ("mlp.down_proj.weight", "T"),
    "b_in": ("mlp.up_proj.bias", "vector:F"),
    "b_gate": ("mlp.gate_proj.bias", "vector:F"),
    "b_out": ("mlp.down_proj.bias", "vector:M"),
}
_ALIASES = {"_W_K": "W_K", "_W_V": "W_V", "_b_K": "b_K", "_b_V": "b_V"}
_ATTN_NAMES = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V", "_b_K", "_b_V")
_MLP_NAMES = ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")


def _layer_weight(model: HookedLlama, layer: int, name: str) -> torch.Tensor | None:
    """The real tensor behind TransformerLens's ``blocks[layer].<name>``, as a view of the HF parameter
    (so in-place edits of it edit the model), or None for a bias the projection does not have."""
    name = _ALIASES.get(name, name)
    path, how = _LAYER_WEIGHTS[name]
    t = model.model.layers[layer].get_submodule(path.rsplit(".", 1)[0])
    t = getattr(t, path.rsplit(".", 1)[1])
    if t is None:
        return None
    H, G, D, M = model.n_heads, model.n_kv_heads, model.d_head, model.d_model
    kind, _, n = how.partition(":")
    heads = {"H": H, "G": G}.get(n)
    if kind == "heads_in":  # Linear [n*D, M] -> [n, M, D]
        return t.view(heads, D, M).transpose(1, 2)
    if kind == "heads_out":  # Linear [M, H*D] -> [H, D, M]
        return t.view(M, H, D).permute(1, 2, 0)
    if kind == "heads_bias":
        return t.view(heads, D)
    if kind == "T":
        return t.T
    return t


def _weight_shape(model: HookedLlama, name: str) -> tuple[int, ...]:
    name = _ALIASES.get(name, name)
    H, G, D, M, F = model.n_heads, model.n_kv_heads, model.d_head, model.d_model, model.d_mlp
    how = _LAYER_WEIGHTS[name][1]
    kind, _, n = how.partition(":")
    heads = {"H": H, "G": G}.get(n)
    return {
        "heads_in": (heads, M, D),
        "heads_out": (H, D, M),
        "heads_bias": (heads, D),
        "vector": ({"M": M, "F": F}.get(n),),
        "T": (M, F) if name != "W_out" else (F, M),
    }[kind]


def _write_layers(model: HookedLlama, name: str, layers: list[int], stacked: bool):
    """The writer of a write-through copy of ``name`` over ``layers``: changed entries go into each layer's
    parameter; a missing bias takes zeros only."""

    def write(now: torch.Tensor, before: torch.Tensor) -> None:
        now, before = now.as_subclass(torch.Tensor), before.as_subclass(torch.Tensor)
        if not stacked:
            now, before = now[None], before[None]
        changed = _changed(now, before)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                mask = changed[i]
                if not bool(mask.any()):
                    continue
                real = _layer_weight(model, layer, name)
                if real is None:
                    if bool((now[i][mask] != 0).any()):
                        path = _LAYER_WEIGHTS[_ALIASES.get(name, name)][0]
                        raise InputError(
                            f"blocks[{layer}] has no {path.rsplit('.', 1)[0]} bias, so {name} is always zero; "
                            "load a checkpoint with that bias to change it",
                            param=name,
                        )
                    continue
                real[mask] = now[i][mask].to(real.device, real.dtype)

    return write


def _assign(model: HookedLlama, name: str, layers: list[int], value, stacked: bool) -> None:
    """``blocks[i].attn.W_O = value`` / ``model.W_O = value``: the values are copied into the model's
    parameters (the parameter objects stay, so tied and shared tensors stay tied)."""
    shape = _weight_shape(model, name)
    value = torch.as_tensor(value)
    want = ((len(layers),) if stacked else ()) + shape
    if tuple(value.shape) != want:
        raise InputError(f"{name} has shape {list(want)}; got a value of shape {list(value.shape)}", param=name)
    stack = value if stacked else value[None]
    for i, layer in enumerate(layers):
        real = _layer_weight(model, layer, name)
        if real is None:
            if bool((stack[i] != 0).any()):
                _write_layers(model, name, [layer], True)(stack[i : i + 1], torch.zeros_like(stack[i : i + 1]))
            continue
        with torch.no_grad():
            real.copy_(stack[i].to(real.device, real.dtype))


class _View:
    """A block or sublayer under TransformerLens's attribute names; anything else reads the module."""

    _names: dict = {}
    _weights: tuple = ()

    def __init__(self, module, layer: int, model: HookedLlama) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_model", model)

    _prefix = ""  # the hook-name prefix of this component ("blocks.3.attn"): hook_in / hook_out resolve under it

    def _hook_name(self, which: str) -> str:
        if which not in ("input", "output"):
            raise HookError(f"hook_name must be 'input' or 'output', got {which!r}")
        return self._prefix.format(self._layer) + (".hook_in" if which == "input" else ".hook_out")

    def add_hook(self, hook, hook_name: str = "output"):
        """A hook on this component's output (its ``hook_out``) or input (``hook_in``), as TransformerLens's
        components take one; returns the handle."""
        return self._model.add_hook(self._hook_name(hook_name), hook)

    def remove_hooks(self, hook_name: str | None = None) -> None:
        for which in ("input", "output") if hook_name is None else (hook_name,):
            with contextlib.suppress(HookError):  # a component without that hook point has no hooks there
                self._model.hook_registry.get(self._hook_name(which)).remove_hooks("both")

    def __getattr__(self, name):
        if name in ("hook_in", "hook_out") and self._prefix:
            return self._model.hook_registry.get(self._hook_name("input" if name == "hook_in" else "output"))
        if name in self._weights:
            real = _layer_weight(self._model, self._layer, name)
            if real is None:  # a bias the projection does not have: zeros that refuse a non-zero value
                zeros = torch.zeros(
                    _weight_shape(self._model, name), device=self._model.device, dtype=self._model.dtype
                )
                return WriteThrough.of(zeros, _write_layers(self._model, name, [self._layer], stacked=False))
            return real
        target = self._names.get(name)
        if target is None:
            return getattr(self._module, name)
        return target(self)

    def __setattr__(self, name, value) -> None:
        if name in self._weights:
            _assign(self._model, name, [self._layer], value, stacked=False)
            return
        setattr(self._module, name, value)

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self._layer})"


def _per_layer(name: str):
    return lambda view: getattr(view._model, name)[view._layer]


class AttnView(_View):
    _prefix = "blocks.{}.attn"
    _weights = _ATTN_NAMES
    _names = {n: _per_layer(n) for n in ("OV", "QK")}


class MLPView(_View):
    _prefix = "blocks.{}.mlp"
    _weights = _MLP_NAMES


class NormView(_View):
    _names = {"w": lambda v: v._module.weight}


class EmbedView(_View):
    """``model.embed``: ``W_E`` and ``embed(tokens)`` -> [batch, pos, d_model]."""

    _names = {"W_E": lambda v: v._module.weight}


class UnembedView(_View):
    """``model.unembed``: ``W_U``, ``b_U`` and ``unembed(resid)`` -> logits (the final norm is not applied)."""

    _names = {"W_U": lambda v: v._model.W_U, "b_U": lambda v: v._model.b_U}


class BlockView(_View):
    _prefix = "blocks.{}"
    _names = {
        "attn": lambda v: AttnView(v._module.self_attn, v._layer, v._model),
        "mlp": lambda v: MLPView(v._module.mlp, v._layer, v._model),
        "ln1": lambda v: NormView(v._module.input_layernorm, v._layer, v._model),
        "ln2": lambda v: NormView(v._module.post_attention_layernorm, v._layer, v._model),
    }


class _Blocks(list):
    """``model.blocks``: a list of ``BlockView``; ``getattr(blocks, "3")`` works as on a ``ModuleList``, so a
    dotted hook name can be walked attribute by attribute."""

    def __getattr__(self, name: str):
        if name.isdigit():
            return self[int(name)]
        raise AttributeError(name)


class _Labels(list):
    """``model.all_head_labels``, a list that can also be called (TransformerLens spells it both ways)."""

    def __call__(self) -> list[str]:
        return list(self)


class TransformerLensMixin:
    """TransformerLens attribute names on ``HookedLlama`` (see the module docstring)."""

    @property
    def cfg(self) -> TLConfig:
        if "_tl_cfg" not in self.__dict__:
            self.__dict__["_tl_cfg"] = TLConfig(self)
        return self.__dict__["_tl_cfg"]

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Cache ``attn.hook_result`` (per-head outputs) by default in ``run_with_cache``."""
        self.cfg.use_attn_result = bool(use_attn_result)

    # ----------------------------------------------------------------- blocks
    @property
    def blocks(self) -> "_Blocks":
        """``blocks[i]`` with TransformerLens's names: ``.attn.W_Q``, ``.mlp.W_in``, ``.ln1.w``, hook points."""
        return _Blocks(BlockView(layer, i, self) for i, layer in enumerate(self.model.layers))

    @property
    def ln_final(self):
        return NormView(self.model.norm, -1, self)

    @property
    def embed(self) -> EmbedView:
        return EmbedView(self.model.embed_tokens, -1, self)

    @property
    def unembed(self) -> UnembedView:
        return UnembedView(self.lm_head, -1, self)

    @property
    def all_head_labels(self) -> _Labels:
        """``["L0H0", "L0H1", …]``, layer-major (``model.all_head_labels`` or ``model.all_head_labels()``)."""
        return _Labels(f"L{l}H{h}" for l in range(self.n_layers) for h in range(self.n_heads))

    # ----------------------------------------------------------------- weights
    _TL_WEIGHTS = frozenset(_LAYER_WEIGHTS) | frozenset(_ALIASES)

    def _stacked(self, name: str) -> WriteThrough:
        """[layer, …] copy of ``name`` whose in-place edits are written into every layer (``WriteThrough``)."""
        layers = list(range(self.n_layers))
        shape = _weight_shape(self, name)
        parts = []
        for layer in layers:
            real = _layer_weight(self, layer, name)
            parts.append(real if real is not None else torch.zeros(shape, device=self.device, dtype=self.dtype))
        return WriteThrough.of(torch.stack(parts), _write_layers(self, name, layers, stacked=True))

    def __setattr__(self, name, value) -> None:
        if name in TransformerLensMixin._TL_WEIGHTS:  # model.W_O = value: into every layer's parameter
            _assign(self, name, list(range(self.n_layers)), value, stacked=True)
            return
        super().__setattr__(name, value)

    @property
    def W_E(self) -> torch.Tensor:
        return self.model.embed_tokens.weight

    @property
    def b_U(self) -> torch.Tensor:
        """Zeros [d_vocab] (a Llama's unembedding has no bias); a non-zero value written into it is refused."""

        def write(now, before):
            if bool(_changed(now.as_subclass(torch.Tensor), before.as_subclass(torch.Tensor)).any()):
                raise InputError("lm_head has no bias, so b_U is always zero; it cannot be changed", param="b_U")

        return WriteThrough.of(torch.zeros(self.d_vocab, device=self.device, dtype=self.dtype), write)

    W_Q = property(lambda self: self._stacked("W_Q"), doc="[layer, head, d_model, d_head]")
    W_K = property(lambda self: self._stacked("W_K"), doc="[layer, kv_head, d_model, d_head]")
    W_V = property(lambda self: self._stacked("W_V"), doc="[layer, kv_head, d_model, d_head]")
    _W_K, _W_V = W_K, W_V
    W_O = property(lambda self: self._stacked("W_O"), doc="[layer, head, d_head, d_model]")
    b_Q = property(lambda self: self._stacked("b_Q"), doc="[layer, head, d_head]")
    b_K = property(lambda self: self._stacked("b_K"), doc="[layer, kv_head, d_head]")
    b_V = property(lambda self: self._stacked("b_V"), doc="[layer, kv_head, d_head]")
    _b_K, _b_V = b_K, b_V
    b_O = property(lambda self: self._stacked("b_O"), doc="[layer, d_model]")
    W_in = property(lambda self: self._stacked("W_in"), doc="[layer, d_model, d_mlp] (up_proj)")
    W_gate = property(lambda self: self._stacked("W_gate"), doc="[layer, d_model, d_mlp] (gate_proj)")
    W_out = property(lambda self: self._stacked("W_out"), doc="[layer, d_mlp, d_model] (down_proj)")
    b_in = property(lambda self: self._stacked("b_in"), doc="[layer, d_mlp]")
    b_gate = property(lambda self: self._stacked("b_gate"), doc="[layer, d_mlp]")
    b_out = property(lambda self: self._stacked("b_out"), doc="[layer, d_model]")

    def _plain(self, name: str) -> torch.Tensor:
        return self._stacked(name).as_subclass(torch.Tensor)

    def _per_query_head(self, w: torch.Tensor) -> torch.Tensor:  # [L, G, ...] -> [L, H, ...]
        return w.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    @property
    def OV(self) -> Factored:
        """``W_V @ W_O`` per query head, [layer, head, d_model, d_model] (kept factored)."""
        return Factored(self._per_query_head(self._plain("W_V")), self._plain("W_O"))

    @property
    def QK(self) -> Factored:
        """``W_Q @ W_K^T`` per query head, [layer, head, d_model, d_model] (kept factored; no RoPE)."""
        return Factored(self._plain("W_Q"), self._per_query_head(self._plain("W_K")).transpose(-1, -2))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[d_model]: the biases written into the residual stream before block ``layer`` (its attention
        output bias too with ``mlp_input``): o_proj biases, and down_proj biases with ``include_mlp_biases``.
        Zeros for a Llama without biases."""
        n = self.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise InputError(
                f"layer={layer!r} is out of range; pass 0..{n} ({n} = after the last block)", param="layer"
            )
        if mlp_input and layer == n:
            raise InputError(f"mlp_input=True needs a layer below {n} (after the last block there is no MLP)")
        total = torch.zeros(self.d_model, device=self.device, dtype=self.dtype)
        for i, block in enumerate(self.model.layers[: layer + (1 if mlp_input else 0)]):
            if block.self_attn.o_proj.bias is not None:
                total = total + block.self_attn.o_proj.bias.detach().to(total.device)
            if include_mlp_biases and i < layer and block.mlp.down_proj.bias is not None:
                total = total + block.mlp.down_proj.bias.detach().to(total.device)
        return total

    def all_composition_scores(self, mode: str) -> torch.Tensor:
        """[layer, head, layer, head] composition scores (Elhage et al.): how much head (l1, h1)'s OV output
        is read by head (l2, h2)'s query ("Q"), key ("K") or value ("V") side,
        ‖L R‖_F / (‖L‖_F ‖R‖_F) with L = W_V W_O of the first head; zero unless l1 < l2. No RoPE, no norms."""
        if mode not in ("Q", "K", "V"):
            raise InputError(f"mode must be one of ['Q', 'K', 'V'], got {mode!r}", param="mode")
        with torch.no_grad():
            W_V, W_O = self._per_query_head(self._plain("W_V")).float(), self._plain("W_O").float()
            W_Q, W_K = self._plain("W_Q").float(), self._per_query_head(self._plain("W_K")).float()
            L, H = self.n_layers, self.n_heads
            left_A, left_B = W_V.flatten(0, 1), W_O.flatten(0, 1)  # [N, M, D], [N, D, M]
            if mode == "Q":
                right_A, right_B = W_Q.flatten(0, 1), W_K.flatten(0, 1).transpose(-1, -2)
            elif mode == "K":
                right_A, right_B = W_K.flatten(0, 1), W_Q.flatten(0, 1).transpose(-1, -2)
            else:
                right_A, right_B = left_A, left_B
            left_n = _factored_norm(left_A, left_B)  # [N]
            right_n = _factored_norm(right_A, right_B)
            gram_left = left_A.transpose(-1, -2) @ left_A  # [N, D, D]
            gram_right = right_B @ right_B.transpose(-1, -2)  # [N, D, D]
            scores = torch.empty(L * H, L * H)
            for i in range(L * H):
                X = left_B[i] @ right_A  # [N, D, D]: the inner product of the chain A_i (B_i A_j) B_j
                sq = ((X.transpose(-1, -2) @ gram_left[i] @ X) * gram_right.transpose(-1, -2)).sum((-2, -1))
                scores[i] = sq.clamp(min=0).sqrt() / (left_n[i] * right_n)
            scores = scores.view(L, H, L, H)
            layer = torch.arange(L)
            keep = layer[:, None, None, None] < layer[None, None, :, None]
            return torch.where(keep, scores, torch.zeros_like(scores)).to(self.device)

    # ----------------------------------------------------------------- hooks, TransformerLens's names
    def add_perma_hook(self, name, hook, dir: str = "fwd"):
        """``add_hook(name, hook, dir, is_permanent=True)``: survives ``reset_hooks()``."""
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False, level=None) -> None:
        """``reset_hooks`` under TransformerLens's other name."""
        self.reset_hooks(direction=direction, including_permanent=including_permanent, level=level)

    def get_caching_hooks(
        self,
        names_filter=None,
        incl_bwd: bool = False,
        device=None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice=None,
    ) -> tuple[dict, list, list]:
        """(cache dict, fwd_hooks, bwd_hooks) that fill the dict when run (``hooks()`` / ``run_with_hooks``),
        as TransformerLens builds them: activations detached (moved to ``device``), sliced on positions
        (``pos_slice``: dim 1, the query dim of patterns and scores), a leading dim of 1 dropped with
        ``remove_batch_dim``; gradients under ``<name>_grad`` with ``incl_bwd``."""
        from .cache import slice_positions

        cache = {} if cache is None else cache
        registry = self.hook_registry
        keys: dict[str, list[str]] = {}  # hook point -> the spellings the filter named (its keys in the dict)
        if names_filter is None:
            keys = {p.name: [p.name] for p in self._cache_points(None)}
        elif callable(names_filter):
            for p in self._cache_points(names_filter):
                keys[p.name] = [n for n in registry.spellings(p.name) if names_filter(n)]
        else:
            for n in [names_filter] if isinstance(names_filter, str) else names_filter:
                keys.setdefault(registry.get(n).name, []).append(n)

        def saver(names: list[str], suffix: str):
            def save(t: torch.Tensor, hook) -> None:
                kept = slice_positions(t.detach().to(device), hook.name, pos_slice)
                if remove_batch_dim and kept.dim() > 0 and kept.shape[0] == 1:
                    kept = kept[0]
                for name in names:
                    cache[name + suffix] = kept

            return save

        fwd = [(name, saver(names, "")) for name, names in keys.items()]
        bwd = [(name, saver(names, "_grad")) for name, names in keys.items()] if incl_bwd else []
        return cache, fwd, bwd

    def hook_points(self) -> list:
        """Every ``HookPoint`` of the model, in forward order."""
        return list(self.hook_registry.points.values())

    def add_caching_hooks(
        self, names_filter=None, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False, cache=None
    ) -> dict:
        """Attach caching hooks (until ``reset_hooks()``) and return the dict they fill."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for name, fn in fwd:
            self.add_hook(name, fn, "fwd")
        for name, fn in bwd:
            self.add_hook(name, fn, "bwd")
        return cache

    def cache_all(self, cache: dict, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False) -> None:
        """Deprecated in TransformerLens: ``add_caching_hooks(cache=cache)``."""
        warnings.warn("cache_all is deprecated; use run_with_cache or add_caching_hooks", DeprecationWarning, 2)
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(
        self, cache: dict, names, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False
    ) -> None:
        """Deprecated in TransformerLens: ``add_caching_hooks(names, cache=cache)``."""
        warnings.warn("cache_some is deprecated; use run_with_cache or add_caching_hooks", DeprecationWarning, 2)
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    # ----------------------------------------------------------------- inputs
    def input_to_embed(self, input, prepend_bos=None, padding_side=None, attention_mask=None, past_kv_cache=None):
        """(residual entering block 0 [batch, pos, d_model], tokens, None, attention_mask), as
        TransformerLens returns it; ``forward(residual, start_at_layer=0)`` resumes the pass. The third item
        (TransformerLens's shortformer positional embedding) is always None: RoPE acts inside attention."""
        if past_kv_cache is not None:
            raise InputError("input_to_embed takes no past_kv_cache here; the KV cache belongs to generate")
        if isinstance(input, torch.Tensor):
            tokens = input[None] if input.dim() == 1 else input
        else:
            tokens, mask = self.tokenize(input, prepend_bos, padding_side=padding_side)
            tokens = tokens.to(self.device)
            if attention_mask is None and not bool(mask.all()):
                attention_mask = mask.to(self.device)
        residual = self(tokens, attention_mask=attention_mask, stop_at_layer=0)
        return residual, tokens, None, attention_mask

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos=None, padding_side=None) -> int:
        """Position of ``single_token`` (an id or a single-token string) in ``input`` (text, or ids [pos] /
        [1, pos]): its first occurrence, or its last with ``mode="last"``."""
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', not {mode!r}", param="mode")
        tokens = (
            self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if isinstance(input, str)
            else torch.as_tensor(input)
        )
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise InputError(f"tokens must be [pos] or [1, pos], got {list(tokens.shape)}", param="input")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            single_token = int(single_token.item())
        where = (tokens == single_token).nonzero()[:, 0]
        if where.numel() == 0:
            raise InputAssertionError(
                f"The token does not occur in the prompt (token {single_token}; check prepend_bos)",
                param="single_token",
            )
        return int(where[0] if mode == "first" else where[-1])

    # ----------------------------------------------------------------- losses and directions
    def loss_fn(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy of ``logits`` [B, P, V] on ``tokens`` [B, P]; mean, or [B, P-1] per token."""
        padding = None if attention_mask is None else torch.as_tensor(attention_mask).bool()
        return self.loss_from_logits(logits, tokens, padding, per_token=per_token)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Unembedding direction(s) of ``tokens`` (id, single-token string, or id tensor): [..., d_model];
        one token, however it is wrapped (``tensor([[5]])``), gives one [d_model] vector, as TransformerLens."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.lm_head.weight.device)
        if ids.numel() == 1:
            ids = ids.reshape(())
        if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= self.d_vocab):
            raise InputError(f"token ids must be in 0..{self.d_vocab - 1}")
        return self.lm_head.weight[ids]
