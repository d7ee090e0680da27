"""Model state that edits change, in one place: the undo journal behind every ``applied()`` context,
turning biases on, untying embeddings, removing layers, and hashing weights.

Edits write weights only through :func:`writable`, which records the tensor's old values in every
open journal first; new parameters (biases, an untied ``lm_head``) and the layer list are restored
from references taken when the journal opened. So a journal restores the exact original tensors,
config, layer list and hook names, however many edits ran inside it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Iterator

import torch
from torch import nn

from hooks import config as cfg

from .errors import EditError

ATTENTION_BIAS_MODULES = cfg.ATTENTION_PROJECTIONS
MLP_BIAS_MODULES = cfg.MLP_PROJECTIONS


class Journal:
    """Everything needed to put a model back as it was when the journal opened."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = copy.deepcopy(model.config.__dict__)
        self.layers = list(model.model.layers)
        self.params = [(m, dict(m._parameters)) for m in model.modules()]
        self.history = list(getattr(model, "scalpel_history", []))
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, tensor: torch.Tensor) -> None:
        if id(tensor) not in self.saved:
            self.saved[id(tensor)] = (tensor, tensor.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        model = self.model
        for tensor, old in self.saved.values():
            tensor.copy_(old)
        for module, params in self.params:
            module._parameters.clear()
            module._parameters.update(params)
        model.model.layers = _layer_list(model, self.layers)
        model.config.__dict__.clear()
        model.config.__dict__.update(copy.deepcopy(self.config))
        object.__setattr__(model, "scalpel_history", list(self.history))
        model._index_hooks()


def _journals(model) -> list[Journal]:
    journals = model.__dict__.get("_scalpel_journals")
    if journals is None:
        journals = []
        object.__setattr__(model, "_scalpel_journals", journals)
    return journals


@contextlib.contextmanager
def journal(model) -> Iterator[Journal]:
    """Restore ``model`` exactly on exit, even after an exception."""
    j = Journal(model)
    stack = _journals(model)
    stack.append(j)
    try:
        yield j
    finally:
        stack.remove(j)
        j.restore()


@contextlib.contextmanager
def transaction(model) -> Iterator[Journal]:
    """Keep what the body did if it succeeds; restore ``model`` exactly if it raises."""
    j = Journal(model)
    stack = _journals(model)
    stack.append(j)
    try:
        yield j
    except BaseException:
        stack.remove(j)
        j.restore()
        raise
    else:
        stack.remove(j)


def writable(model, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a parameter of ``model``) ready for an in-place write: open journals keep its old values."""
    for j in _journals(model):
        j.save(tensor)
    return tensor.data


def set_param(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """Replace ``module.<name>`` with a new parameter (restored by reference by open journals)."""
    param = nn.Parameter(value.to(device=like.device, dtype=like.dtype), requires_grad=like.requires_grad)
    setattr(module, name, param)
    return param


def check_bias_slot(model, part: str, module: str, who: str) -> None:
    """Raise a one-line ``EditError`` when ``module`` ("o_proj", "down_proj") of the model's family
    cannot carry a bias in its own transformers class (so the edit could not be exported exactly)."""
    if cfg.bias_flag(model.config, part) is None:
        raise EditError(
            f"{who} needs a bias on {module}, which {cfg.family_class_name(model.config)} cannot carry "
            f"(only {'Llama and Qwen3' if part == 'attention' else 'Llama'} have one); run it at run "
            "time with edit.as_hooks(model), or use an edit without a bias (ZeroHeads, Orthogonalize)"
        )


def enable_biases(model, *, attention: bool = False, mlp: bool = False) -> None:
    """Give every module a ``attention_bias`` / ``mlp_bias`` flag governs a (zero) bias, and set the flag.

    HF builds q/k/v/o (attention_bias, Llama and Qwen3) or gate/up/down (mlp_bias, Llama) with biases
    in every layer when the flag is on, so an exported checkpoint needs all of them; zeros keep the
    maths unchanged. Families without the flag are refused earlier by ``check_bias_slot``.
    """
    for part, on, names, owner_name in (
        ("attention", attention, ATTENTION_BIAS_MODULES, "self_attn"),
        ("mlp", mlp, MLP_BIAS_MODULES, "mlp"),
    ):
        flag = cfg.bias_flag(model.config, part)
        if not on:
            continue
        if flag is None:
            raise EditError(f"{cfg.family_class_name(model.config)} has no {part} bias flag")
        for layer in model.model.layers:
            owner = getattr(layer, owner_name)
            for name in names:
                linear = getattr(owner, name)
                if linear.bias is None:
                    w = linear.weight
                    set_param(linear, "bias", torch.zeros(w.shape[0]), w)
        setattr(model.config, flag, True)


def untie_embeddings(model) -> None:
    """Give ``lm_head`` its own copy of the tied embedding matrix (so editing one leaves the other)."""
    if model.lm_head.weight is model.model.embed_tokens.weight or model.config.tie_word_embeddings:
        w = model.model.embed_tokens.weight
        set_param(model.lm_head, "weight", w.detach().clone(), w)
        model.config.tie_word_embeddings = False


def _layer_list(model, layers) -> nn.ModuleList:
    """A new layer list in the model's own train/eval mode (a fresh ModuleList starts in training mode,
    which tools that check ``module.training`` everywhere, such as TransformerLens's patching, refuse)."""
    return nn.ModuleList(layers).train(model.training)


def remove_layers(model, layers: list[int]) -> None:
    keep = [layer for i, layer in enumerate(model.model.layers) if i not in set(layers)]
    model.model.layers = _layer_list(model, keep)
    model.config.num_hidden_layers = len(keep)
    types = getattr(model.config, "layer_types", None)
    if types:  # Qwen2/Qwen3: each kept layer keeps its full / sliding attention
        model.config.layer_types = [t for i, t in enumerate(types) if i not in set(layers)]
    model._index_hooks()


def record(model, entry: dict) -> None:
    """Append an applied edit to ``model.scalpel_history`` (restored with the weights by journals)."""
    history = list(getattr(model, "scalpel_history", []))
    history.append(entry)
    object.__setattr__(model, "scalpel_history", history)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def state_sha256(model) -> str:
    """sha256 over the state dict in name order: name, dtype, shape and raw bytes of each tensor."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
