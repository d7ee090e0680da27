"""Model state that edits change, in one place: the undo journals behind every ``applied()`` context and
every all-or-nothing ``apply``, the finiteness check of what an edit wrote, turning biases on, untying
embeddings, removing layers, and hashing weights.

The state itself is declared by ``HookedLlama`` (its "edit state" section): ``model.edit_history`` (the
records of the edits applied), ``model.edit_journals`` (the open journals) and ``model.replace_layers``.
Edits write weights only through :func:`writable`, which records the tensor's old values in every open
journal first (one copy, shared by the journals that did not hold the tensor yet); new parameters (biases,
an untied ``lm_head``) and the layer list are restored from references taken when the journal opened.
So a journal restores the exact original tensors, config, layer list, hook names and history, however many
edits ran inside it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from hooks import config as cfg

from .errors import EditError

if TYPE_CHECKING:
    from hooks.model import HookedLlama

ATTENTION_BIAS_MODULES = cfg.ATTENTION_PROJECTIONS
MLP_BIAS_MODULES = cfg.MLP_PROJECTIONS


class Journal:
    """Everything needed to put a model back as it was when the journal opened."""

    def __init__(self, model: HookedLlama) -> None:
        self.model = model
        self.config = copy.deepcopy(model.config.__dict__)
        self.layers = list(model.model.layers)
        self.params = [(m, dict(m._parameters)) for m in model.modules()]
        self.history = list(model.edit_history)
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (live tensor, its old values)

    @torch.no_grad()
    def restore(self) -> None:
        model = self.model
        for tensor, old in self.saved.values():
            tensor.copy_(old)
        for module, params in self.params:
            module._parameters.clear()
            module._parameters.update(params)
        model.replace_layers(self.layers)
        model.config.__dict__.clear()
        model.config.__dict__.update(copy.deepcopy(self.config))
        model.edit_history = list(self.history)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's state with the one this journal holds (its state when the journal opened);
        a second ``swap`` undoes the first. In place, one scratch tensor at a time."""
        model = self.model
        for tensor, old in self.saved.values():
            scratch = tensor.detach().clone()
            tensor.copy_(old)
            old.copy_(scratch)
        for i, (module, params) in enumerate(self.params):
            now = dict(module._parameters)
            module._parameters.clear()
            module._parameters.update(params)
            self.params[i] = (module, now)
        layers, config, history = list(model.model.layers), copy.deepcopy(model.config.__dict__), model.edit_history
        model.replace_layers(self.layers)
        model.config.__dict__.clear()
        model.config.__dict__.update(self.config)
        model.edit_history = list(self.history)
        self.layers, self.config, self.history = layers, config, list(history)

    def new_parameters(self) -> list[torch.Tensor]:
        """Parameters created since the journal opened (biases turned on, an untied ``lm_head``)."""
        out = []
        for module, before in self.params:
            out += [p for name, p in module._parameters.items() if p is not None and before.get(name) is not p]
        return out


def _journals(model: HookedLlama) -> list[Journal]:
    return model.edit_journals


@contextlib.contextmanager
def journal(model: HookedLlama) -> Iterator[Journal]:
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
def transaction(model: HookedLlama) -> Iterator[Journal]:
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


@contextlib.contextmanager
def unapplied(model: HookedLlama) -> Iterator[bool]:
    """Inside, ``model`` is as it was before every edit of its ``edit_history``, when an open journal (an
    ``applied()`` context) holds that state: yields True, and the edits are back on exit. Yields False (and
    changes nothing) when no journal reaches back that far (edits applied outside any journal)."""
    base = next((j for j in _journals(model) if not j.history), None)
    if base is None or not model.edit_history:
        yield False
        return
    base.swap()
    try:
        yield True
    finally:
        base.swap()


def writable(model: HookedLlama, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a parameter of ``model``) ready for an in-place write: open journals keep its old values
    (one copy, shared by every journal that does not hold the tensor yet)."""
    if tensor.is_meta:
        raise EditError(
            "the model's weights are offloaded (on the meta device, kept by accelerate's offload hooks); an edit "
            "needs them in memory: load the model on devices that hold it, or export without edits",
            param="model",
        )
    old = None
    for j in _journals(model):
        if id(tensor) not in j.saved:
            old = tensor.detach().clone() if old is None else old
            j.saved[id(tensor)] = (tensor, old)
    return tensor.data


@torch.no_grad()
def check_finite_writes(model: HookedLlama, j: Journal, who: str, params: tuple[str, ...]) -> None:
    """A one-line ``EditError`` when a tensor written or created since ``j`` opened holds NaN or inf where it
    was finite before (the caller's journal then restores the model)."""
    bad = None
    for tensor, old in j.saved.values():
        if not bool(torch.isfinite(tensor).all()) and bool((~torch.isfinite(tensor) & torch.isfinite(old)).any()):
            bad = tensor
            break
    if bad is None:
        bad = next((p for p in j.new_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is None:
        return
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    value = bad.detach()[~torch.isfinite(bad.detach())][0].item()
    kind = str(bad.dtype).replace("torch.", "")
    what = " / ".join(params) if params else "values"
    raise EditError(
        f"{who}: the edit would write a non-finite value ({value}) into {names.get(id(bad), 'a weight')} "
        f"({kind}); use smaller {what}; nothing was changed",
        param=params[0] if params else None,
    )


def set_param(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """Replace ``module.<name>`` with a new parameter (restored by reference by open journals)."""
    param = nn.Parameter(value.to(device=like.device, dtype=like.dtype), requires_grad=like.requires_grad)
    setattr(module, name, param)
    return param


def check_bias_slot(model: HookedLlama, part: str, module: str, who: str) -> None:
    """Raise a one-line ``EditError`` when ``module`` ("o_proj", "down_proj") of the model's family
    cannot carry a bias in its own transformers class (so the edit could not be exported exactly)."""
    if cfg.bias_flag(model.config, part) is None:
        raise EditError(
            f"{who} needs a bias on {module}, which {cfg.family_class_name(model.config)} cannot carry "
            f"(only {'Llama and Qwen3' if part == 'attention' else 'Llama'} have one); run it at run "
            "time with edit.as_hooks(model), or use an edit without a bias (ZeroHeads, Orthogonalize)"
        )


def enable_biases(model: HookedLlama, *, attention: bool = False, mlp: bool = False) -> None:
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


def untie_embeddings(model: HookedLlama) -> None:
    """Give ``lm_head`` its own copy of the tied embedding matrix (so editing one leaves the other)."""
    if model.lm_head.weight is model.model.embed_tokens.weight or model.config.tie_word_embeddings:
        w = model.model.embed_tokens.weight
        set_param(model.lm_head, "weight", w.detach().clone(), w)
        model.config.tie_word_embeddings = False


def remove_layers(model: HookedLlama, layers: list[int]) -> None:
    """Delete decoder layers (``model.replace_layers`` keeps the rest, their per-layer config, and renumbers)."""
    gone = set(layers)
    model.replace_layers(layer for i, layer in enumerate(model.model.layers) if i not in gone)


def record(model: HookedLlama, entry: dict) -> None:
    """Append an applied edit's record to ``model.edit_history`` (restored with the weights by journals)."""
    model.edit_history.append(entry)
