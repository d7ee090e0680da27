"""Training a TopK sparse autoencoder on one hook point of a model.

Activations are streamed to disk once with ``hooks.cache_to_disk`` (one safetensors shard per batch of
texts) and read back one shard at a time, so memory holds one shard, the SAE and Adam's state.
The recipe is OpenAI's TopK SAE (Gao et al. 2024): decoder rows kept at unit norm (the gradient's
component along each row removed first), encoder initialised as the decoder's transpose, ``b_dec``
at the activations' mean, inputs scaled so that their mean norm is sqrt(d_in) — the scale is folded
into the weights at the end (SAELens's ``fold_activation_norm_scaling_factor``), so the saved SAE takes
raw activations — and an AuxK loss on latents that have not fired for ``dead_after`` tokens.

Every ``checkpoint_every`` steps the SAE, Adam's state and the step are written to ``<out>/checkpoint.pt``
(plain tensors, read back with ``weights_only=True``); calling ``train_sae`` again with the same
arguments resumes from it and ends bit-identical to an uninterrupted run (the data order is a pure
function of the seed and the step). The result is written in the SAELens layout to ``out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from hooks import InputError
from hooks.streaming import cache_to_disk

from .formats import check_fits, replace_dir, replace_refusal, save_sae
from .sae import SAE, SAEConfig


@dataclass
class TrainResult:
    """What ``train_sae`` did: the SAE, where it was written, and the loss history."""

    sae: SAE
    path: Path
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # normalised MSE per logged step
    resumed_from: int = 0
    scale: float = 1.0  # the input scaling factor folded into the weights


def _shards(acts_dir: Path) -> list[str]:
    return json.loads((acts_dir / "index.json").read_text())["shards"]


def _load_shard(acts_dir: Path, shard: str, hook_name: str, skip_first: bool) -> torch.Tensor:
    """Real-token activations [n, d] of one shard (padding dropped; each row's first token too if asked)."""
    from safetensors import safe_open

    with safe_open(str(acts_dir / shard), "pt") as f:
        acts, mask = f.get_tensor(hook_name), f.get_tensor("attention_mask").bool()
    if skip_first:
        first = mask.float().argmax(dim=1)  # left padding: the first real token of each row
        mask = mask.clone()
        mask[torch.arange(mask.shape[0]), first] = False
    return acts[mask].float()


def _order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def train_sae(
    model,
    hook_name: str,
    texts: Sequence[str],
    out: str | os.PathLike,
    *,
    d_sae: int | None = None,
    expansion: int = 8,
    k: int = 32,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 1024,
    lr: float | None = None,
    text_batch: int = 16,
    max_tokens: int = 128,
    skip_first: bool = True,
    aux_coef: float = 1 / 32,
    dead_after: int = 200_000,
    checkpoint_every: int = 200,
    seed: int = 0,
    acts_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a TopK SAE on ``hook_name`` of ``model`` over ``texts`` and write it to ``out`` (SAELens layout).

    Args:
        d_sae: number of latents (default ``expansion * d_in``); k: active latents per token.
        steps: optimiser steps (default: ``epochs`` passes over the cached tokens); batch_size: tokens a step.
        lr: Adam learning rate (default ``2e-4 / sqrt(d_sae / 16384)``, OpenAI's scaling).
        text_batch / max_tokens: texts per forward when caching, and their truncation length.
        skip_first: leave each text's first token out of training (its residual is an outlier).
        acts_dir: where the activations are cached (default ``<out>.acts``; reused when present).
        stop_after: stop (with a checkpoint) after this many steps in this call — to test resumption.

    Returns:
        ``TrainResult`` with the trained ``SAE`` (already written to ``out``).

    Example::

        res = train_sae(model, "blocks.15.hook_resid_post", load_corpus(), "sae-l15", k=32, steps=300)
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise InputError("train_sae needs texts: pass a non-empty list of strings")
    model.hook_registry.get(hook_name)
    out = Path(out)
    if out.exists() and not overwrite and not (out / "checkpoint.pt").exists():
        raise InputError(f"{out} exists; pass overwrite=True or choose another path")
    if out.exists() and (why := replace_refusal(out)):
        raise InputError(
            f"{why}; train_sae writes only into an empty directory, its own checkpoint "
            "directory or an SAE llama-scalpel wrote: choose another out path"
        )
    d_in = model.d_mlp if ".mlp.hook_" in hook_name else model.d_model
    d_sae = int(d_sae or expansion * d_in)
    cfg = SAEConfig(
        "topk",
        d_in,
        d_sae,
        hook_name,
        k=int(k),
        source_format="saelens",
        metadata={
            "model_name": getattr(model.config, "_name_or_path", None) or model.source,
            "context_size": max_tokens,
        },
    )
    sae = SAE(cfg)
    check_fits(sae, model)

    acts_dir = Path(acts_dir) if acts_dir is not None else out.with_name(out.name + ".acts")
    if not (acts_dir / "index.json").exists():
        tok = [model.tokenize(t)[0][0][:max_tokens] for t in texts]
        layer = model.hook_registry.get(hook_name).layer
        stop = int(layer) + 1 if layer is not None and int(layer) + 1 < model.n_layers else None
        cache_to_disk(model, tok, [hook_name], acts_dir, batch_size=text_batch, progress=progress, stop_at_layer=stop)
    shards = _shards(acts_dir)
    stream = _TokenStream(acts_dir, shards, hook_name, skip_first, seed, batch_size)
    first = _load_shard(acts_dir, shards[0], hook_name, skip_first)
    if steps is None:
        steps = max(1, epochs * stream.total // batch_size)
    lr = lr if lr is not None else 2e-4 / math.sqrt(d_sae / 16384)
    scale = float(math.sqrt(d_in) / first.norm(dim=-1).mean())

    torch.manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_((first * scale).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    start, losses = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["config"] != json.dumps(cfg.to_dict(), sort_keys=True) or state["seed"] != seed:
            raise InputError(f"{ckpt} was written by a run with other settings; delete it or use another out path")
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired, start, losses, scale = (
            state["since_fired"],
            int(state["step"]),
            list(state["losses"]),
            state["scale"],
        )
    resumed_from = start

    from tqdm.auto import tqdm

    end = steps if stop_after is None else min(steps, start + stop_after)
    bar = tqdm(total=steps, initial=start, desc=f"train_sae {hook_name}", disable=progress is False, leave=False)
    try:
        for step in range(start, end):
            x = stream.batch(step) * scale
            loss, mse = _step(sae, opt, x, since_fired, aux_coef, dead_after)
            if step % 10 == 0 or step == steps - 1:
                losses.append(mse)
                bar.set_postfix(nmse=f"{mse:.3f}", dead=int((since_fired > dead_after).sum()))
            bar.update(1)
            if (step + 1) % checkpoint_every == 0 or step + 1 == end:
                _checkpoint(ckpt, sae, opt, since_fired, step + 1, losses, scale, cfg, seed)
    finally:
        bar.close()
    if end < steps:
        return TrainResult(sae, out, end, end * batch_size, losses, resumed_from, scale)
    with torch.no_grad():  # fold the input scale into the weights: the saved SAE takes raw activations
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
    keep = Path(tempfile.mkdtemp(prefix=".scalpel-tmp-", dir=out.parent)) / "sae"
    try:
        save_sae(sae, keep)
        replace_dir(keep, out)  # out holds only this run's checkpoint (checked above)
    finally:
        shutil.rmtree(keep.parent, ignore_errors=True)
    return TrainResult(sae, out, steps, steps * batch_size, losses, resumed_from, scale)


class _TokenStream:
    """Batches of activations in a seed-determined order; holds one shard in memory."""

    def __init__(
        self, acts_dir: Path, shards: list[str], hook_name: str, skip_first: bool, seed: int, batch_size: int
    ) -> None:
        self.acts_dir, self.shards, self.hook_name, self.skip_first = acts_dir, shards, hook_name, skip_first
        self.seed, self.batch_size = seed, batch_size
        self.sizes = [_load_shard(acts_dir, s, hook_name, skip_first).shape[0] for s in shards]
        self.total = sum(self.sizes)
        if self.total < batch_size:
            raise InputError(
                f"the texts give {self.total} tokens, fewer than batch_size={batch_size}; pass more "
                "texts or a smaller batch_size"
            )
        self._loaded: tuple[int, int, torch.Tensor] | None = None

    def _shard_tokens(self, epoch: int, s: int) -> torch.Tensor:
        if self._loaded is None or self._loaded[:2] != (epoch, s):
            acts = _load_shard(self.acts_dir, self.shards[s], self.hook_name, self.skip_first)
            self._loaded = (epoch, s, acts[_order(self.seed + 7919 * (s + 1), epoch, acts.shape[0])])
        return self._loaded[2]

    def batch(self, step: int) -> torch.Tensor:
        """Tokens [batch_size, d] of ``step``: epochs visit the shards in a shuffled order, each shard shuffled."""
        per_epoch = self.total // self.batch_size
        epoch, i = divmod(step, per_epoch)
        shard_order = _order(self.seed, epoch, len(self.shards)).tolist()
        pos, parts, need = i * self.batch_size, [], self.batch_size
        for s in shard_order:
            n = self.sizes[s]
            if pos >= n:
                pos -= n
                continue
            take = self._shard_tokens(epoch, s)[pos : pos + need]
            parts.append(take)
            need -= take.shape[0]
            pos = 0
            if need == 0:
                break
        return torch.cat(parts)


def _step(sae: SAE, opt, x: torch.Tensor, since_fired: torch.Tensor, aux_coef: float, dead_after: int):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=-1)
    vals = torch.relu(top.values)
    recon = (vals[..., None] * sae.W_dec[top.indices]).sum(-2) + sae.b_dec
    err = x - recon
    var = (x - x.mean(0)).pow(2).sum()
    mse = err.pow(2).sum() / var
    loss = mse
    fired = torch.zeros_like(since_fired, dtype=torch.bool)
    fired[top.indices[vals > 0]] = True
    since_fired += x.shape[0]
    since_fired[fired] = 0
    dead = since_fired > dead_after
    if aux_coef and dead.any():  # AuxK: dead latents reconstruct the residual error
        k_aux = min(int(dead.sum()), x.shape[1] // 2)
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        atop = aux_pre.topk(k_aux, dim=-1)
        aux = (torch.relu(atop.values)[..., None] * sae.W_dec[atop.indices]).sum(-2)
        aux_loss = (err.detach() - aux).pow(2).sum() / var
        loss = loss + aux_coef * torch.nan_to_num(aux_loss, nan=0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # keep decoder rows on the unit sphere: drop the radial part of the gradient
        g, w = sae.W_dec.grad, sae.W_dec
        g -= (g * w).sum(-1, keepdim=True) * w
    opt.step()
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    return float(loss.detach()), float(mse.detach())


def _checkpoint(path: Path, sae, opt, since_fired, step, losses, scale, cfg, seed) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "sae": sae.state_dict(),
            "opt": opt.state_dict(),
            "since_fired": since_fired,
            "step": step,
            "losses": losses,
            "scale": scale,
            "seed": seed,
            "config": json.dumps(cfg.to_dict(), sort_keys=True),
        },
        tmp,
    )
    os.replace(tmp, path)
