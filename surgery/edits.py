"""Exact weight edits of a ``HookedLlama``.

Each edit is a small dataclass with

- ``apply(model)``: validate, then change the weights in place (returns the model);
- ``as_hooks(model)``: ``[(hook_name, fn), …]``, the run-time intervention with the same effect,
  for ``model.run_with_hooks(x, fwd_hooks=edit.as_hooks(model))`` on the *unedited* model;
- ``applied(model)``: a context manager that applies the edit and restores the exact original
  tensors, config, layer list and hook names on exit (even after an exception);
- ``to_dict()`` / ``Edit.from_dict(d)``: a JSON/YAML-ready record (vectors as lists of floats, which
  round-trip float32 values bit-exactly).

Shapes in comments: H query heads, G key/value heads, D head_dim, M d_model, F d_mlp, V vocab.
The exported checkpoint of any edit is a plain directory of the model's own class (``LlamaForCausalLM``,
``Qwen2ForCausalLM`` …): an edit that needs a bias turns on ``attention_bias`` / ``mlp_bias`` and adds
zero biases everywhere else the flag applies; a family whose class has no such flag refuses the edit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch

from hooks.model import check_model
from . import _state
from ._validate import (
    _check_fits,
    _check_layer,
    _check_range,
    _check_size,
    _float,
    _int,
    _ints,
    _short,
    _tensor,
    _vec_list,
)
from .errors import EditError

HookList = list  # list[tuple[str, HookFn]]

EDIT_KINDS: dict[str, type["Edit"]] = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# --------------------------------------------------------------------------- the base class
@dataclass(eq=False)
class Edit:
    """Base class of every edit. Subclasses define ``validate``, ``_apply`` and ``_hooks``."""

    kind: ClassVar[str] = "Edit"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__
        EDIT_KINDS[cls.__name__] = cls
        EDIT_KINDS[_snake(cls.__name__)] = cls

    @property
    def who(self) -> str:
        return self.kind

    # -- public API -------------------------------------------------------------
    def validate(self, model) -> None:
        """Raise a one-line ``EditError`` if this edit does not fit ``model``; change nothing."""

    def apply(self, model):
        """Validate, then edit ``model``'s weights in place. Returns the model."""
        check_model(model, f"{self.who}.apply")
        self.validate(model)
        self._check_weights(model)
        with torch.no_grad():
            self._apply(model)
        _state.record(model, self.to_dict())
        return model

    def _check_weights(self, model) -> None:
        """Raise a one-line ``EditError`` if the weight form cannot live in the model's family class
        (the hook form still runs)."""

    def as_hooks(self, model) -> HookList:
        """``[(hook_name, fn)]`` with the same effect at run time on the unedited ``model``."""
        self.validate(model)
        return self._hooks(model)

    @contextlib.contextmanager
    def applied(self, model) -> Iterator:
        """``with edit.applied(model):`` – edited inside, exactly restored on exit."""
        with _state.journal(model):
            self.apply(model)
            yield model

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"edit": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = _vec_list(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):  # JSON keys are strings: {layer: weight} records as {"layer": weight}
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Edit":
        """An edit from its ``to_dict()`` record (``Edit.from_dict`` dispatches on ``"edit"``)."""
        if not isinstance(data, dict):
            raise EditError(f"an edit record must be a mapping, got {type(data).__name__}")
        data = dict(data)
        name = data.pop("edit", None) or data.pop("kind", None) or data.pop("type", None)
        target = cls
        if cls is Edit:
            if name is None:
                raise EditError(f"edit record has no 'edit' key naming its kind; kinds: {', '.join(sorted(kinds()))}")
            if name not in EDIT_KINDS:
                import difflib

                close = difflib.get_close_matches(str(name), list(EDIT_KINDS), n=2)
                raise EditError(
                    f"unknown edit kind {name!r}; closest: {', '.join(close) or 'none'}; "
                    f"kinds: {', '.join(sorted(kinds()))}"
                )
            target = EDIT_KINDS[name]
        elif name is not None and EDIT_KINDS.get(name) is not cls:
            raise EditError(f"{cls.kind}.from_dict got a record of kind {name!r}")
        names = {f.name for f in dataclasses.fields(target)}
        required = {
            f.name
            for f in dataclasses.fields(target)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown = sorted(set(data) - names)
        if unknown:
            raise EditError(f"{target.kind}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        missing = sorted(required - set(data))
        if missing:
            raise EditError(f"{target.kind}: missing field(s) {', '.join(missing)}")
        return target(**data)

    def __eq__(self, other) -> bool:
        return isinstance(other, Edit) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}={_short(v) if isinstance(v, torch.Tensor) else repr(v)}")
        return f"{self.kind}({', '.join(parts)})"

    # -- subclass hooks ------------------------------------------------------------
    def _apply(self, model) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hooks(self, model) -> HookList:  # pragma: no cover - abstract
        raise NotImplementedError


def kinds() -> list[str]:
    return sorted(k.kind for k in set(EDIT_KINDS.values()))


# --------------------------------------------------------------------------- hook helpers
def _set_slice(index, value_fn):
    """A hook writing ``value_fn(t)`` into ``t[index]`` of a copy of ``t``."""

    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        t = t.clone()
        t[index] = value_fn(t[index]).to(t.dtype)
        return t

    return hook


def _project_out(d: torch.Tensor):
    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        dd = d.to(device=t.device, dtype=torch.float64)
        x = t.double()
        return (x - (x @ dd)[..., None] * dd).to(t.dtype)

    return hook


def _add_constant(vec: torch.Tensor):
    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        return t + vec.to(device=t.device, dtype=t.dtype)

    return hook


def _zero(t: torch.Tensor, hook) -> torch.Tensor:
    return torch.zeros_like(t)


def _attn(model, layer: int):
    return model.model.layers[layer].self_attn


def _mlp(model, layer: int):
    return model.model.layers[layer].mlp


def _head_cols(heads, d: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])


# --------------------------------------------------------------------------- heads
@dataclass(eq=False, repr=False)
class ZeroHeads(Edit):
    """Silence query heads: zero their columns of ``o_proj`` (the heads' slice of the o_proj input).

    Hooks: ``blocks.{layer}.attn.hook_z[:, :, heads] = 0``.
    """

    layer: int
    heads: Sequence[int]

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.heads = _ints(self.heads, "heads", self.who)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_range(self.heads, model.n_heads, "head", self.who)

    def _apply(self, model) -> None:
        o = _attn(model, self.layer).o_proj
        w = _state.writable(model, o.weight)  # [M, H*D]
        w[:, _head_cols(self.heads, model.d_head).to(w.device)] = 0

    def _hooks(self, model) -> HookList:
        heads = list(self.heads)
        return [(f"blocks.{self.layer}.attn.hook_z", _set_slice((slice(None), slice(None), heads), torch.zeros_like))]


@dataclass(eq=False, repr=False)
class ScaleHeads(Edit):
    """Multiply query heads' outputs by ``factor``: scale their ``o_proj`` columns.

    Hooks: ``hook_z[:, :, heads] *= factor``.
    """

    layer: int
    heads: Sequence[int]
    factor: float

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.heads = _ints(self.heads, "heads", self.who)
        self.factor = _float(self.factor, "factor", self.who)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_range(self.heads, model.n_heads, "head", self.who)
        w = _attn(model, self.layer).o_proj.weight
        _check_fits(
            self.who,
            "factor",
            self.factor,
            w[:, _head_cols(self.heads, model.d_head).to(w.device)],
            f"the o_proj columns of heads {list(self.heads)}",
        )

    def _apply(self, model) -> None:
        o = _attn(model, self.layer).o_proj
        w = _state.writable(model, o.weight)
        cols = _head_cols(self.heads, model.d_head).to(w.device)
        w[:, cols] = w[:, cols] * self.factor

    def _hooks(self, model) -> HookList:
        f = self.factor
        return [
            (
                f"blocks.{self.layer}.attn.hook_z",
                _set_slice((slice(None), slice(None), list(self.heads)), lambda x: x * f),
            )
        ]


@dataclass(eq=False, repr=False)
class ZeroKVGroups(Edit):
    """GQA-aware: silence key/value groups and every query head that reads them.

    Zeroes the groups' rows of ``k_proj``/``v_proj`` (and biases), the reading heads' rows of
    ``q_proj`` and their columns of ``o_proj``. Query head ``h`` reads group ``h // (H / G)``.
    Hooks: zero ``hook_q`` (heads), ``hook_k`` / ``hook_v`` (groups) and ``hook_z`` (heads).
    """

    layer: int
    groups: Sequence[int]

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.groups = _ints(self.groups, "groups", self.who)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_range(self.groups, model.n_kv_heads, "group", self.who)

    def heads(self, model) -> list[int]:
        rep = model.n_heads // model.n_kv_heads
        return [g * rep + i for g in self.groups for i in range(rep)]

    def _apply(self, model) -> None:
        attn, d = _attn(model, self.layer), model.d_head
        heads = self.heads(model)
        head_rows, group_rows = _head_cols(heads, d), _head_cols(self.groups, d)
        for proj, rows in ((attn.q_proj, head_rows), (attn.k_proj, group_rows), (attn.v_proj, group_rows)):
            _state.writable(model, proj.weight)[rows.to(proj.weight.device)] = 0
            if proj.bias is not None:
                _state.writable(model, proj.bias)[rows.to(proj.bias.device)] = 0
        _state.writable(model, attn.o_proj.weight)[:, head_rows.to(attn.o_proj.weight.device)] = 0

    def _hooks(self, model) -> HookList:
        heads, groups, i = self.heads(model), list(self.groups), self.layer
        zero = torch.zeros_like
        sel = lambda idx: _set_slice((slice(None), slice(None), idx), zero)  # noqa: E731
        return [
            (f"blocks.{i}.attn.hook_q", sel(heads)),
            (f"blocks.{i}.attn.hook_k", sel(groups)),
            (f"blocks.{i}.attn.hook_v", sel(groups)),
            (f"blocks.{i}.attn.hook_z", sel(heads)),
        ]


@dataclass(eq=False, repr=False)
class MeanAblateHeads(Edit):
    """Replace query heads' outputs by reference means: ``hook_z[:, :, h] = means[i]``.

    Exact in weights: the heads' ``o_proj`` columns become zero and ``o_proj.bias`` gains
    ``W_O[:, h] @ means[i]`` (turning on ``attention_bias``, zero q/k/v/o biases elsewhere).
    ``means`` is ``[len(heads), head_dim]``, row ``i`` for ``heads[i]``; get it with
    ``MeanAblateHeads.compute(model, layer, heads, prompts)`` or ``from_means`` on the output of
    ``surgery.mean_activations`` (``{layer: [n_heads, head_dim]}``).
    """

    layer: int
    heads: Sequence[int]
    means: Any

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.heads = _ints(self.heads, "heads", self.who)
        self.means = _tensor(self.means, "means", self.who, 2)
        if self.means.shape[0] != len(self.heads):
            raise EditError(
                f"{self.who}: means has {self.means.shape[0]} rows but {len(self.heads)} heads are named; "
                "pass one mean vector per head (use MeanAblateHeads.from_means for a [n_heads, d_head] table)"
            )

    @classmethod
    def from_means(cls, layer: int, heads: Sequence[int], means) -> "MeanAblateHeads":
        """From a per-layer table ``[n_heads, d_head]`` or the ``{layer: table}`` of ``mean_activations``."""
        if isinstance(means, dict):
            if layer not in means:
                raise EditError(f"MeanAblateHeads: no means for layer {layer}; computed for {sorted(means)}")
            means = means[layer]
        table = _tensor(means, "means", "MeanAblateHeads", 2)
        heads = _ints(heads, "heads", "MeanAblateHeads")
        _check_range(heads, table.shape[0], "head", "MeanAblateHeads")
        return cls(layer, heads, table[list(heads)])

    @classmethod
    def compute(cls, model, layer: int, heads: Sequence[int], prompts) -> "MeanAblateHeads":
        """Means of ``hook_z`` over every token of ``prompts`` (see ``surgery.mean_activations``)."""
        from .stats import mean_activations

        return cls.from_means(layer, heads, mean_activations(model, prompts, layers=[layer]))

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_range(self.heads, model.n_heads, "head", self.who)
        _check_size(self.means, model.d_head, "means", self.who, "head_dim")

    def _check_weights(self, model) -> None:
        _state.check_bias_slot(model, "attention", "o_proj", self.who)

    def _apply(self, model) -> None:
        _state.enable_biases(model, attention=True)
        o, d = _attn(model, self.layer).o_proj, model.d_head
        w = _state.writable(model, o.weight)  # [M, H*D]
        b = _state.writable(model, o.bias)  # [M]
        means = self.means.to(device=w.device, dtype=torch.float64)
        add = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        for i, h in enumerate(self.heads):
            add += w[:, h * d : (h + 1) * d].double() @ means[i]
        cols = _head_cols(self.heads, d).to(w.device)
        w[:, cols] = 0
        b.copy_((b.double() + add).to(b.dtype))

    def _hooks(self, model) -> HookList:
        heads, means = list(self.heads), self.means.clone()

        def hook(z: torch.Tensor, hook) -> torch.Tensor:
            z = z.clone()
            z[:, :, heads] = means.to(device=z.device, dtype=z.dtype)
            return z

        return [(f"blocks.{self.layer}.attn.hook_z", hook)]


# --------------------------------------------------------------------------- neurons
@dataclass(eq=False, repr=False)
class ZeroNeurons(Edit):
    """Silence MLP neurons: zero their columns of ``down_proj``. Hooks: ``mlp.hook_post[..., n] = 0``."""

    layer: int
    neurons: Sequence[int]

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.neurons = _ints(self.neurons, "neurons", self.who)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_range(self.neurons, model.d_mlp, "neuron", self.who)

    def _apply(self, model) -> None:
        w = _state.writable(model, _mlp(model, self.layer).down_proj.weight)  # [M, F]
        w[:, torch.tensor(self.neurons, device=w.device)] = 0

    def _hooks(self, model) -> HookList:
        return [(f"blocks.{self.layer}.mlp.hook_post", _set_slice((..., list(self.neurons)), torch.zeros_like))]


@dataclass(eq=False, repr=False)
class ScaleNeurons(Edit):
    """Multiply MLP neurons' activations by ``factor``: scale their ``down_proj`` columns."""

    layer: int
    neurons: Sequence[int]
    factor: float

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.neurons = _ints(self.neurons, "neurons", self.who)
        self.factor = _float(self.factor, "factor", self.who)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_range(self.neurons, model.d_mlp, "neuron", self.who)
        w = _mlp(model, self.layer).down_proj.weight
        _check_fits(
            self.who,
            "factor",
            self.factor,
            w[:, torch.tensor(self.neurons, device=w.device)],
            f"the down_proj columns of neurons {list(self.neurons)}",
        )

    def _apply(self, model) -> None:
        w = _state.writable(model, _mlp(model, self.layer).down_proj.weight)
        cols = torch.tensor(self.neurons, device=w.device)
        w[:, cols] = w[:, cols] * self.factor

    def _hooks(self, model) -> HookList:
        f = self.factor
        return [(f"blocks.{self.layer}.mlp.hook_post", _set_slice((..., list(self.neurons)), lambda x: x * f))]


# --------------------------------------------------------------------------- layers
@dataclass(eq=False, repr=False)
class RemoveLayers(Edit):
    """Delete decoder layers; the exported config has the reduced ``num_hidden_layers``.

    Layers after a removed one are renumbered (``blocks.0..N-1``); later edits of a plan use the new
    numbers. Hooks: the removed layers' ``hook_attn_out`` and ``hook_mlp_out`` are zero, so the layer
    is the identity (``resid_post == resid_pre``).
    """

    layers: Sequence[int]

    def __post_init__(self) -> None:
        self.layers = tuple(sorted(_ints(self.layers, "layers", self.who)))

    def validate(self, model) -> None:
        n = model.n_layers
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise EditError(f"{self.who}: layer {bad[0]} is out of range; the model has {n} layers (0..{n - 1})")
        if len(self.layers) >= n:
            raise EditError(f"{self.who}: removing all {n} layers leaves no model; keep at least one")

    def kept(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if i not in self.layers]

    def _apply(self, model) -> None:
        _state.remove_layers(model, list(self.layers))

    def _hooks(self, model) -> HookList:
        return [(f"blocks.{i}.{name}", _zero) for i in self.layers for name in ("hook_attn_out", "hook_mlp_out")]


# --------------------------------------------------------------------------- residual directions
@dataclass(eq=False, repr=False)
class Orthogonalize(Edit):
    """Project a residual direction out of everything that writes to the residual stream.

    ``W ← W − d dᵀ W`` for ``o_proj`` and ``down_proj`` (weights and biases) of ``layers`` ("all"
    or a list), and ``E ← E − (E d) dᵀ`` for the token embeddings when ``embeddings`` is true
    (refusal-direction "abliteration"). With tied embeddings, ``lm_head`` keeps the original matrix
    (the export unties it: ``tie_word_embeddings`` becomes false), since only writers are edited.
    Hooks: project ``d`` out of ``hook_embed`` and each chosen layer's ``hook_attn_out`` /
    ``hook_mlp_out``.
    """

    direction: Any
    layers: Any = "all"
    embeddings: bool = True

    def __post_init__(self) -> None:
        self.direction = _tensor(self.direction, "direction", self.who, 1)
        if float(self.direction.double().norm()) == 0.0:
            raise EditError(f"{self.who}: direction is the zero vector; pass a non-zero direction")
        if self.layers != "all":
            if isinstance(self.layers, str):
                raise EditError(f"{self.who}: layers must be 'all' or a list of layer indices, got {self.layers!r}")
            self.layers = _ints(self.layers, "layers", self.who, allow_empty=True)
        if not isinstance(self.embeddings, bool):
            raise EditError(f"{self.who}: embeddings must be true or false, got {self.embeddings!r}")

    def unit(self) -> torch.Tensor:
        d = self.direction.double()
        return d / d.norm()  # float64

    def layer_list(self, model) -> list[int]:
        return list(range(model.n_layers)) if self.layers == "all" else list(self.layers)

    def validate(self, model) -> None:
        _check_size(self.direction, model.d_model, "direction", self.who, "d_model (hidden_size)")
        for i in self.layer_list(model):
            _check_layer(model, i, self.who)

    def _apply(self, model) -> None:
        d = self.unit()
        if self.embeddings:
            if model.lm_head.weight is model.model.embed_tokens.weight or model.config.tie_word_embeddings:
                _state.untie_embeddings(model)
            e = _state.writable(model, model.model.embed_tokens.weight)  # [V, M]
            dd = d.to(e.device)
            for rows in torch.arange(e.shape[0], device=e.device).split(8192):  # bounded float64 scratch
                x = e[rows].double()
                e[rows] = (x - (x @ dd)[:, None] * dd[None, :]).to(e.dtype)
        for i in self.layer_list(model):
            for lin in (_attn(model, i).o_proj, _mlp(model, i).down_proj):
                w = _state.writable(model, lin.weight)  # [M, in]
                dd = d.to(w.device)
                x = w.double()
                w.copy_((x - dd[:, None] * (dd @ x)[None, :]).to(w.dtype))
                if lin.bias is not None:
                    b = _state.writable(model, lin.bias)
                    x = b.double()
                    b.copy_((x - dd * (dd @ x)).to(b.dtype))

    def _hooks(self, model) -> HookList:
        fn = _project_out(self.unit())
        out = [("hook_embed", fn)] if self.embeddings else []
        for i in self.layer_list(model):
            out += [(f"blocks.{i}.hook_attn_out", fn), (f"blocks.{i}.hook_mlp_out", fn)]
        return out


@dataclass(eq=False, repr=False)
class AddSteering(Edit):
    """Add ``scale * vector`` to the residual stream after layer ``layer``'s MLP, at every position.

    Baked into ``down_proj.bias`` of that layer (turning on ``mlp_bias``, zero gate/up/down biases
    elsewhere). Hooks: ``blocks.{layer}.hook_mlp_out += scale * vector``.
    """

    layer: int
    vector: Any
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.vector = _tensor(self.vector, "vector", self.who, 1)
        self.scale = _float(self.scale, "scale", self.who)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_size(self.vector, model.d_model, "vector", self.who, "d_model (hidden_size)")
        bias = _mlp(model, self.layer).down_proj.bias
        _check_fits(
            self.who,
            "scale",
            self.scale,
            bias if bias is not None else torch.zeros(1, dtype=model.dtype),
            "the down_proj bias",
            add=self.vector,
        )

    def _check_weights(self, model) -> None:
        _state.check_bias_slot(model, "mlp", "down_proj", self.who)

    def _apply(self, model) -> None:
        _state.enable_biases(model, mlp=True)
        b = _state.writable(model, _mlp(model, self.layer).down_proj.bias)
        b.copy_((b.double() + self.scale * self.vector.to(b.device, torch.float64)).to(b.dtype))

    def _hooks(self, model) -> HookList:
        return [(f"blocks.{self.layer}.hook_mlp_out", _add_constant(self.scale * self.vector.double()))]


# --------------------------------------------------------------------------- ROME
@dataclass(eq=False, repr=False)
class RankOneEdit(Edit):
    """ROME-style closed-form rank-one update of layer ``layer``'s ``down_proj``.

    ``W ← W + (v* − W k*) uᵀ / (uᵀ k*)`` with ``u = C⁻¹ k*`` (``c_inv_key``; ``None`` means
    ``C = I``, i.e. ``u = k*``), so that afterwards ``W k* = v*`` while keys uncorrelated with
    ``k*`` under ``C`` are barely moved. ``key`` lives in the down_proj input space [d_mlp]
    (``mlp.hook_post``), ``value`` in its output space [d_model]. Build one from prompts with
    ``RankOneEdit.compute`` and a covariance from ``surgery.key_covariance``.
    Hooks: ``hook_mlp_out += (post · u) / (uᵀ k*) · (v* − W k*)``.
    """

    layer: int
    key: Any
    value: Any
    c_inv_key: Any = None

    def __post_init__(self) -> None:
        self.layer = _int(self.layer, "layer", self.who)
        self.key = _tensor(self.key, "key", self.who, 1)
        self.value = _tensor(self.value, "value", self.who, 1)
        if self.c_inv_key is not None:
            self.c_inv_key = _tensor(self.c_inv_key, "c_inv_key", self.who, 1)
            if self.c_inv_key.shape != self.key.shape:
                raise EditError(
                    f"{self.who}: c_inv_key has size {self.c_inv_key.shape[0]} but key has {self.key.shape[0]}"
                )
        if float(self.u.double() @ self.key.double()) == 0.0:
            raise EditError(f"{self.who}: uᵀk* is zero (key is zero or orthogonal to C⁻¹k*); the update is undefined")

    @property
    def u(self) -> torch.Tensor:
        return self.key if self.c_inv_key is None else self.c_inv_key

    @classmethod
    def compute(
        cls,
        model,
        layer: int,
        prompts,
        delta,
        *,
        covariance: torch.Tensor | None = None,
        cov_texts=None,
        ridge: float = 1e-2,
    ) -> "RankOneEdit":
        """k* = mean ``hook_post`` at the last token of each prompt (end each prompt on the subject's
        last token); v* = W k* + ``delta`` (the wanted change of down_proj's output, [d_model]);
        u = (C + ridge·mean(diag C)·I)⁻¹ k* with C from ``covariance`` or ``key_covariance(cov_texts)``
        (neither: C = I)."""
        from .stats import key_covariance, last_token_mean

        layer = _int(layer, "layer", "RankOneEdit")
        _check_layer(model, layer, "RankOneEdit")
        key = last_token_mean(model, prompts, f"blocks.{layer}.mlp.hook_post")
        delta = _tensor(delta, "delta", "RankOneEdit", 1)
        _check_size(delta, model.d_model, "delta", "RankOneEdit", "d_model (hidden_size)")
        w = _mlp(model, layer).down_proj.weight.detach().float().cpu()
        value = w @ key + delta
        if covariance is None and cov_texts is not None:
            covariance = key_covariance(model, layer, cov_texts)
        u = None
        if covariance is not None:
            c = covariance.detach().double().cpu()
            if c.shape != (key.shape[0], key.shape[0]):
                raise EditError(f"RankOneEdit: covariance has shape {tuple(c.shape)}, expected {(key.shape[0],) * 2}")
            c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
            u = torch.linalg.solve(c, key.double()).float()
        return cls(layer, key, value, u)

    def validate(self, model) -> None:
        _check_layer(model, self.layer, self.who)
        _check_size(self.key, model.d_mlp, "key", self.who, "d_mlp (intermediate_size)")
        _check_size(self.value, model.d_model, "value", self.who, "d_model (hidden_size)")

    def _residual(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, u/(uᵀk)) with r = v* − W k*: the update is ΔW = r (u/(uᵀk))ᵀ; float64 maths."""
        w = _mlp(model, self.layer).down_proj.weight.detach().double().cpu()
        k, v, u = self.key.double(), self.value.double(), self.u.double()
        return v - w @ k, u / (u @ k)

    def _apply(self, model) -> None:
        r, u = self._residual(model)
        w = _state.writable(model, _mlp(model, self.layer).down_proj.weight)
        w.copy_((w.double() + torch.outer(r, u).to(w.device)).to(w.dtype))

    def _hooks(self, model) -> HookList:
        r, u = self._residual(model)  # float64; cast to the activations' dtype at use
        stash: dict[str, torch.Tensor] = {}

        def read(post: torch.Tensor, hook) -> None:
            stash["s"] = post @ u.to(device=post.device, dtype=post.dtype)  # [B, P]

        def write(out: torch.Tensor, hook) -> torch.Tensor:
            return out + stash.pop("s")[..., None] * r.to(device=out.device, dtype=out.dtype)

        return [(f"blocks.{self.layer}.mlp.hook_post", read), (f"blocks.{self.layer}.hook_mlp_out", write)]


# MergeLora lives in lora.py (adapter reading); import registers it.
from .lora import MergeLora  # noqa: E402,F401
from .abliteration import Abliterate  # noqa: E402,F401  (weighted, norm-preserving Orthogonalize)

ALL_EDITS = (
    ZeroHeads,
    ZeroKVGroups,
    MeanAblateHeads,
    ScaleHeads,
    ZeroNeurons,
    ScaleNeurons,
    RemoveLayers,
    Orthogonalize,
    AddSteering,
    RankOneEdit,
    MergeLora,
    Abliterate,
)
