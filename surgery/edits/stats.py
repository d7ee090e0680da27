"""Statistics that edits are built from: mean head outputs, key covariances, subject keys.

Prompts are strings (tokenised by the model's tokenizer), token-id tensors ``[P]`` / ``[B, P]``
or lists of ids. Each prompt runs on its own (no padding), and every position counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from hooks.errors import InputError

from ..errors import EditError
from .base import as_int, check_layer

if TYPE_CHECKING:
    from hooks.model import HookedLlama


def _rows(model: HookedLlama, prompts) -> Iterator[torch.Tensor]:
    """Token ids [1, P] per prompt."""
    if isinstance(prompts, (str, torch.Tensor)):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(i, int) for i in prompts):
        prompts = [prompts]
    n = 0
    for p in prompts:
        if isinstance(p, str):
            ids = model.to_tokens(p)
            yield from ids.split(1)
        elif isinstance(p, torch.Tensor):
            ids = p if p.dim() == 2 else p[None]
            yield from ids.split(1)
        else:
            yield torch.as_tensor(list(p), dtype=torch.long)[None]
        n += 1
    if n == 0:
        raise InputError("no prompts given; pass at least one text or token sequence")


def _layers(model: HookedLlama, layers) -> list[int]:
    if layers is None:
        return list(range(model.n_layers))
    out = [as_int(i, "layer", "mean_activations") for i in ([layers] if isinstance(layers, int) else layers)]
    for i in out:
        check_layer(model, i, "mean_activations")
    return out


@torch.no_grad()
def mean_activations(
    model: HookedLlama, prompts, *, layers: Iterable[int] | int | None = None, hook: str = "z"
) -> dict[int, torch.Tensor]:
    """Mean of ``blocks.{layer}.attn.hook_{hook}`` (default ``hook_z``, [n_heads, d_head]) over every
    token of every prompt, per layer: ``{layer: tensor}`` (float32, CPU). Feed it to
    ``MeanAblateHeads.from_means(layer, heads, means)``."""
    layers = _layers(model, layers)
    names = {f"blocks.{i}.attn.hook_{hook}": i for i in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for ids in _rows(model, prompts):
        _, cache = model.run_with_cache(ids, names_filter=list(names))
        for name, i in names.items():
            t = cache[name][0].double().sum(0).cpu()  # [heads, d_head]
            sums[i] = sums[i] + t if i in sums else t
        count += ids.shape[1]
    return {i: (s / count).float() for i, s in sums.items()}


@torch.no_grad()
def key_covariance(model: HookedLlama, layer: int, texts) -> torch.Tensor:
    """C = E[k kᵀ] [d_mlp, d_mlp] (uncentred, as ROME) of ``blocks.{layer}.mlp.hook_post`` over every
    token of ``texts``. float64 on CPU; use with ``RankOneEdit.compute(..., covariance=C)``."""
    layer = as_int(layer, "layer", "key_covariance")
    check_layer(model, layer, "key_covariance")
    name = f"blocks.{layer}.mlp.hook_post"
    acc = torch.zeros(model.d_mlp, model.d_mlp, dtype=torch.float64)
    count = 0
    for ids in _rows(model, texts):
        _, cache = model.run_with_cache(ids, names_filter=[name])
        k = cache[name][0].double().cpu()  # [P, F]
        acc += k.T @ k
        count += k.shape[0]
    return acc / count


@torch.no_grad()
def last_token_mean(model: HookedLlama, prompts, name: str) -> torch.Tensor:
    """Mean of a hook point's activation at the last token of each prompt (float32, CPU)."""
    acc, n = None, 0
    for ids in _rows(model, prompts):
        _, cache = model.run_with_cache(ids, names_filter=[name])
        v = cache[name][0, -1].double().cpu()
        acc = v if acc is None else acc + v
        n += 1
    if acc is None:
        raise EditError("no prompts given")
    return (acc / n).float()
