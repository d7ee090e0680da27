"""Training sparse autoencoders and transcoders on the fly, on any device, one process or many (torchrun).

Data: the texts are packed into rows of ``max_tokens`` tokens (``hooks.harvest``: no padding) and the
model runs over them in batches of ``text_batch`` rows, stopped after the last layer any SAE reads. The
kept activations (each row's first position left out with ``skip_first``) fill a shuffling buffer:
window ``j`` of an epoch is the tokens ``[j·W, (j+1)·W)`` of the packed stream (``W = buffer_tokens``,
a multiple of ``batch_size``), shuffled by a generator seeded with (seed, epoch, window, rank) and
consumed in batches; then the next window is harvested. Nothing goes to disk: ``cache_to_disk`` is the
option that does (``hooks.harvest.harvest_to_disk``: the stream written once, keyed by what made it, and
read back instead of running the model). The data order is a pure function of the seed and the step, so a resumed run ends
bit-identical to an uninterrupted one (the checkpoint records the window and the batch within it).

Recipes: TopK (OpenAI, Gao et al. 2024: unit-norm decoder rows with the gradient's radial part removed,
``b_dec`` at the data mean, AuxK loss on latents dead for ``dead_after`` tokens) and JumpReLU
(Rajamanoharan et al. 2024: ``relu(h)·(h > θ)``, straight-through gradients for θ with a rectangle kernel
of width ``bandwidth``, loss = normalised MSE + ``l0_coef`` × L0; the same AuxK loss revives dead latents).
A transcoder reads one hook point and reconstructs another (``hook_name_out``; the MLP's input → its output
for per-layer transcoders), with an optional linear skip connection (``W_skip``, Paulo et al. 2025). Inputs (and targets) are scaled to mean
norm √d during training; the scales are folded into the weights at the end, so the saved SAE takes raw
activations.

Under torchrun (``_core.distributed``) each rank harvests its own part of every window (the window's
tokens split in contiguous blocks, so a window holds the one-process run's tokens) and trains on
``batch_size / world`` tokens a step (shuffled within its block, so batches are composed differently
from one process's); the loss is normalised by the global batch's variance and the gradients are summed
over the ranks (all-reduce), so a step equals the one-process step on the same global batch up to
rounding; the dead-latent counts are shared. ``train_saes(..., parallel="hooks")``
instead gives each rank whole hook points. Rank 0 writes files; every rank returns the same results.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

from _core import distributed as dist
from _core.autograd import differentiates
from _core.writer import Output, check_outputs, writable, write_dir, write_file
from hooks import InputError
from hooks.harvest import PackedCache, PackStats, harvest, harvest_to_disk, pack_rows

from .formats import _hook_widths, check_fits, saelens_cfg, save_sae, save_sparsify
from .sae import SAE, SAEConfig

if TYPE_CHECKING:
    from hooks.model import HookedLlama

TRAINABLE = ("topk", "jumprelu")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    """What ``train_sae`` did: the SAE, where it was written, the loss history and the data it saw.

    ``stats``: documents, rows, positions computed, real tokens among them and positions kept, over
    this call's harvesting (``padding`` = positions − tokens, 0 when packed)."""

    sae: SAE
    path: Path
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # normalised MSE per logged step
    resumed_from: int = 0
    scale: float = 1.0  # the input scaling factor folded into the weights
    scale_out: float = 1.0  # the target's (a transcoder's output; = scale for an SAE)
    stats: dict = field(default_factory=dict)


def transcoder_hooks(model: HookedLlama, layers: Iterable[int] | None = None) -> list[tuple[str, str]]:
    """(read, write) hook names of per-layer MLP transcoders: the MLP's input
    (``blocks.{i}.ln2.hook_normalized``) to its output (``blocks.{i}.hook_mlp_out``), for ``layers``
    (default: all)."""
    layers = range(model.n_layers) if layers is None else layers
    out = []
    for i in layers:
        i = int(i)
        if not -model.n_layers <= i < model.n_layers:
            raise InputError(
                f"layer {i} does not exist (the model has {model.n_layers} layers, 0..{model.n_layers - 1})",
                param="layers",
            )
        i %= model.n_layers
        out.append((f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out"))
    return out


# --------------------------------------------------------------------------- texts
def _text_source(texts) -> tuple[Callable[[], Iterable], bool]:
    """(a function returning a fresh iterable of documents, whether it can be read more than once)."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise InputError(
                f"corpus file {path} does not exist; pass a list of strings, a text file (one document a "
                "line), a .jsonl file or a datasets.Dataset",
                param="texts",
            )
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            from ..refusal import load_prompts

            docs = load_prompts(path)
            return (lambda: docs), True
        from ..neurons import iter_corpus

        return (lambda: iter_corpus(path)), True
    if isinstance(texts, (list, tuple)):
        if not texts:
            raise InputError("train_sae needs texts: pass a non-empty list of strings", param="texts")
        return (lambda: texts), True
    if not isinstance(texts, Iterable):
        raise InputError(
            f"texts must be a list of strings, a file path, a datasets.Dataset or an iterable, got {type(texts).__name__}",
            param="texts",
        )
    if iter(texts) is texts:  # a generator or another one-shot iterator
        return (lambda: texts), False
    return (lambda: texts), True


# --------------------------------------------------------------------------- the data feed
class _Feed:
    """Batches of harvested activations: shuffled windows of the packed token stream (module docstring)."""

    def __init__(
        self,
        model: HookedLlama,
        names: list[str],
        source: Callable[[], Iterable],
        repeatable: bool,
        *,
        max_tokens: int,
        skip_first: bool,
        text_batch: int,
        window: int,
        batch: int,
        seed: int,
        device: torch.device,
        epochs: int | None,
        cache: PackedCache | None = None,
    ) -> None:
        self.model, self.names, self.source, self.repeatable = model, names, source, repeatable
        self.cache = cache
        self.max_tokens, self.skip, self.text_batch = max_tokens, int(skip_first), text_batch
        self.window, self.batch, self.seed, self.device, self.epochs = window, batch, seed, device, epochs
        self.rank, self.world = dist.rank(), dist.world_size()
        self.local = batch // self.world
        self.stats = PackStats()
        self.epoch, self.win, self.pos = 0, 0, 0  # the next batch: epoch, window in it, batch in the window
        self._rows = None  # row cursor of the current epoch: iterator, current row, kept offset in it
        self._buf: dict[str, torch.Tensor] | None = None
        self._n_batches = 0
        self._done = False
        self._epoch_over = False  # the row cursor has no row left (set by _next_window_pieces)
        self._whole: tuple[dict[str, list[torch.Tensor]], int, int] | None = None  # an epoch that fits a window

    # -- the token stream (no model run) ----------------------------------------------------------
    def _open_epoch(self) -> None:
        if self.cache is not None or self._whole is not None:  # random access / kept in memory: no row cursor
            self._rows = [iter(()), None, 0]
            return
        self._rows = [pack_rows(self.model, self.source(), self.max_tokens, stats=self.stats), None, 0]

    def _next_window_pieces(self) -> list[tuple[torch.Tensor, int, int]]:
        """(row, kept start, kept end) pieces making the next ``window`` kept tokens (fewer at the end)."""
        pieces, need = [], self.window
        cur = self._rows
        if cur is None:
            return pieces
        while need > 0:
            if cur[1] is None:
                cur[1] = next(cur[0], None)
                cur[2] = 0
                if cur[1] is None:
                    break
            kept = max(cur[1].numel() - self.skip, 0)
            take = min(kept - cur[2], need)
            if take > 0:
                pieces.append((cur[1], cur[2], cur[2] + take))
            cur[2] += take
            need -= take
            if cur[2] >= kept:
                cur[1] = None
        if cur[1] is None:  # peek: is the epoch over?
            cur[1], cur[2] = next(cur[0], None), 0
        self._epoch_over = cur[1] is None
        return pieces

    # -- windows ---------------------------------------------------------------------------------
    def _load_window(self, harvest_it: bool = True) -> int:
        """Read the next window's pieces; harvest and shuffle this rank's part. Returns its batch count."""
        if self.cache is not None:
            start = self.win * self.window
            n_batches = max(0, min(self.window, self.cache.total - start)) // self.batch
            if not harvest_it or n_batches == 0:
                return n_batches
            per_rank = n_batches * self.batch // self.world
            acts = self.cache.read(start + self.rank * per_rank, start + (self.rank + 1) * per_rank, self.names)
            return self._shuffle({n: [t] for n, t in acts.items()}, per_rank, n_batches)
        if self._whole is not None:  # the whole epoch is one window, harvested once and kept
            kept, per_rank, n_batches = self._whole
            if self.win > 0 or not harvest_it:
                return 0 if self.win > 0 else n_batches
            return self._shuffle(kept, per_rank, n_batches)
        pieces = self._next_window_pieces()
        total = sum(b - a for _, a, b in pieces)
        n_batches = total // self.batch
        if not harvest_it or n_batches == 0:
            return n_batches
        usable = n_batches * self.batch
        per_rank = usable // self.world
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        mine, at = [], 0  # this rank's pieces, clipped to [lo, hi)
        for row, a, b in pieces:
            s, e = max(lo - at, 0), min(hi - at, b - a)
            if s < e:
                mine.append((row, a + s, a + e))
            at += b - a
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        rows = [row for row, _, _ in mine]
        i = 0
        for acts in harvest(
            self.model, self.names, rows, batch_rows=self.text_batch, skip_first=bool(self.skip), stats=self.stats
        ):
            first = next(iter(acts.values()))
            n_rows, off = 0, 0
            while off < first.shape[0]:  # split the batch's kept tokens back into its rows
                row, a, b = mine[i + n_rows]
                kept = row.numel() - self.skip
                for n in self.names:
                    parts[n].append(acts[n][off + a : off + b])
                off += kept
                n_rows += 1
            i += n_rows
        if self.win == 0 and self._epoch_over and self.repeatable:  # later epochs reuse it (no model run)
            self._whole = (parts, per_rank, n_batches)
        return self._shuffle(parts, per_rank, n_batches)

    def _shuffle(self, parts: dict[str, list[torch.Tensor]], per_rank: int, n_batches: int) -> int:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + self.win) * 131 + self.rank)
        perm = torch.randperm(per_rank, generator=g).to(self.device)
        self._buf = {n: torch.cat(p).to(self.device)[perm] for n, p in parts.items()}
        return n_batches

    def seek(self, epoch: int, win: int, pos: int) -> None:
        """Put the feed at batch ``pos`` of window ``win`` of ``epoch`` (tokenizing, not running the
        model, to skip what came before)."""
        self.epoch, self.win, self.pos = epoch, 0, pos
        if epoch > 0 and not self.repeatable:
            raise InputError(
                "this run was checkpointed in epoch > 0 of a one-shot iterator; pass the texts as a list, a file "
                "or a dataset to resume it",
                param="texts",
            )
        self._open_epoch()
        for _ in range(win):
            self._load_window(harvest_it=False)
            self.win += 1
        self._n_batches = 0
        self._buf = None

    def next(self) -> dict[str, torch.Tensor] | None:
        """The next batch ``{name: [batch/world, d]}`` of this rank, or None when the data is done."""
        while self._buf is None or self.pos >= self._n_batches:
            if self._buf is not None:  # the window is used up
                self.win, self.pos, self._buf = self.win + 1, 0, None
            if self._rows is None:
                if self.win > 0 or self._done:
                    return None
                self._open_epoch()
            n = self._load_window()
            if n == 0:  # the epoch is over (a tail shorter than a batch is left out)
                last = self.epochs is not None and self.epoch + 1 >= self.epochs
                if last or not self.repeatable or self.win == 0:  # win 0: an epoch gives no batch at all
                    self._done, self._rows = True, None
                    return None
                self.epoch, self.win, self.pos = self.epoch + 1, 0, 0
                self._open_epoch()
                continue
            self._n_batches = n
        i = self.pos
        self.pos += 1
        return {k: v[i * self.local : (i + 1) * self.local] for k, v in self._buf.items()}

    def window_tensors(self) -> dict[str, torch.Tensor]:
        return self._buf or {}


# --------------------------------------------------------------------------- one SAE in training
class _StepFn(torch.autograd.Function):
    """Heaviside step H(h − θ) with a straight-through gradient for θ (rectangle kernel of width ``bw``)."""

    @staticmethod
    def forward(ctx, pre, theta, bw):
        ctx.save_for_backward(pre, theta)
        ctx.bw = bw
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bw / 2).to(g.dtype)
        return None, (-(1.0 / ctx.bw) * near * g).reshape(-1, theta.shape[0]).sum(0), None


class _JumpReLUFn(torch.autograd.Function):
    """h · H(h − θ); gradient 1 for h where open, straight-through −θ/bw · K for θ."""

    @staticmethod
    def forward(ctx, pre, theta, bw):
        ctx.save_for_backward(pre, theta)
        ctx.bw = bw
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bw / 2).to(g.dtype)
        g_theta = (-(theta / ctx.bw) * near * g).reshape(-1, theta.shape[0]).sum(0)
        return g * (pre > theta).to(g.dtype), g_theta, None


@dataclass
class _Run:
    read: str
    write: str | None
    sae: SAE
    out: Path
    params: list[torch.Tensor] = field(default_factory=list)
    opt: Any = None
    since_fired: torch.Tensor | None = None
    log_threshold: torch.Tensor | None = None
    s_in: float = 1.0
    s_out: float = 1.0

    @property
    def key(self) -> str:
        return self.read if self.write is None else f"{self.read}->{self.write}"

    @property
    def target(self) -> str:
        return self.write or self.read

    @property
    def sparsify(self) -> bool:
        """A TopK MLP transcoder: sparsify's layout, reading the MLP input with its norm weight."""
        return self.sae.input_scale is not None

    def inputs(self, acts: dict[str, torch.Tensor], s_in: float, s_out: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) in float32, scaled for training."""
        x = acts[self.read].float()
        if self.sae.input_scale is not None:
            x = x * self.sae.input_scale
        x = x * s_in
        return x, (acts[self.write].float() * s_out if self.write else x)

    @property
    def path(self) -> Path:
        """Where the trained SAE is read back from (``load_sae(path, model)``)."""
        return self.out / f"layers.{self.read.split('.')[1]}.mlp" if self.sparsify else self.out


def _init_seed(seed: int, key: str) -> int:
    return seed * 1_000_003 + zlib.crc32(key.encode())


def _init_run(run: _Run, win: dict[str, torch.Tensor], seed: int, lr: float, k: int) -> None:
    """Scales from the first window (global over ranks), weights, optimiser."""
    sae, cfg = run.sae, run.sae.cfg
    x, y = run.inputs(win, 1.0, 1.0)
    sums = torch.stack([x.norm(dim=-1).sum(), y.norm(dim=-1).sum(), torch.tensor(float(x.shape[0]), device=x.device)])
    dist.all_reduce(sums)
    run.s_in = float(math.sqrt(cfg.d_in) * sums[2] / sums[0])
    run.s_out = float(math.sqrt(cfg.d_out) * sums[2] / sums[1]) if run.write else run.s_in
    mean = (y * run.s_out).sum(0)
    dist.all_reduce(mean)
    mean /= sums[2]
    g = torch.Generator().manual_seed(_init_seed(seed, run.key))
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, cfg.d_out, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        if run.write is None:
            sae.W_enc.copy_(sae.W_dec.T)
        else:  # a transcoder's encoder reads another space: its own random unit columns
            e = torch.randn(cfg.d_in, cfg.d_sae, generator=g)
            sae.W_enc.copy_(e / e.norm(dim=0, keepdim=True))
        sae.b_dec.copy_(mean)
        sae.b_enc.zero_()
        if cfg.skip_connection:
            sae.W_skip.zero_()
        if cfg.architecture == "jumprelu":  # θ_j: the (1 - k/d_sae) quantile of latent j's pre-activation
            xs = x[:4096] * run.s_in
            pre = (xs - sae.b_dec if cfg.apply_b_dec_to_input else xs) @ sae.W_enc
            q = min(max(1.0 - k / cfg.d_sae, 0.0), 1.0)
            theta = torch.quantile(pre, q, dim=0).clamp(min=1e-3)
            dist.all_reduce(theta)
            run.log_threshold = torch.nn.Parameter((theta / dist.world_size()).log())
    _make_opt(run, lr)


def _make_opt(run: _Run, lr: float) -> None:
    sae = run.sae
    run.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    if sae.cfg.skip_connection:
        run.params.append(sae.W_skip)
    if sae.cfg.architecture == "jumprelu":
        run.params.append(run.log_threshold)
    run.opt = torch.optim.Adam(run.params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    if run.since_fired is None:
        run.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_enc.device)


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, hp: dict) -> float:
    """One optimiser step on this rank's tokens ``x`` → ``y`` (scaled); the global normalised MSE."""
    sae, cfg = run.sae, run.sae.cfg
    n_global = x.shape[0] * dist.world_size()
    mean = y.sum(0)
    dist.all_reduce(mean)
    mean /= n_global
    var = (y - mean).pow(2).sum()
    dist.all_reduce(var)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=hp["amp"]):
        sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
        pre = sae_in @ sae.W_enc + sae.b_enc
        if cfg.architecture == "topk":
            top = pre.topk(cfg.k, dim=-1)
            vals = torch.relu(top.values)
            recon = (vals[..., None] * sae.W_dec[top.indices]).sum(-2) + sae.b_dec
            fired_idx = top.indices[vals > 0]
        else:
            theta = run.log_threshold.exp()
            acts = _JumpReLUFn.apply(pre, theta, hp["bandwidth"])
            recon = acts @ sae.W_dec + sae.b_dec
            l0 = _StepFn.apply(pre, theta, hp["bandwidth"]).sum()
            fired_idx = (pre > theta).nonzero()[:, 1]
        if cfg.skip_connection:
            recon = recon + x @ sae.W_skip.T
    err = y - recon.float()
    sse = err.pow(2).sum()
    loss = sse / var
    fired = torch.zeros(cfg.d_sae, dtype=torch.int32, device=x.device)
    fired[fired_idx] = 1
    dist.all_reduce(fired, "max")
    run.since_fired += n_global
    run.since_fired[fired.bool()] = 0
    if cfg.architecture == "jumprelu":
        loss = loss + hp["l0_coef"] * l0.float() / n_global
    dead = run.since_fired > hp["dead_after"]
    if hp["aux_coef"] and dead.any():  # AuxK: the top dead latents (relu, no threshold) fit the error
        k_aux = min(int(dead.sum()), cfg.d_out // 2)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=hp["amp"]):
            atop = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
            aux = (torch.relu(atop.values)[..., None] * sae.W_dec[atop.indices]).sum(-2)
        aux_loss = (err.detach() - aux.float()).pow(2).sum() / var
        loss = loss + hp["aux_coef"] * torch.nan_to_num(aux_loss, nan=0.0)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
    dist.all_reduce_many(grads)
    for p, g in zip(run.params, grads):
        p.grad = g
    with torch.no_grad():  # keep decoder rows on the unit sphere: drop the radial part of the gradient
        g, w = sae.W_dec.grad, sae.W_dec
        g -= (g * w).sum(-1, keepdim=True) * w
    run.opt.step()
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    sse = sse.detach()
    dist.all_reduce(sse)
    return float(sse / var)


def _fold(run: _Run) -> None:
    """Fold the training scales into the weights: the SAE then takes raw activations."""
    sae = run.sae
    with torch.no_grad():
        sae.W_enc.mul_(run.s_in)
        sae.W_dec.div_(run.s_out)
        sae.b_dec.div_(run.s_out)
        if sae.cfg.skip_connection:
            sae.W_skip.mul_(run.s_in / run.s_out)
        if run.log_threshold is not None:
            sae.threshold.copy_(run.log_threshold.detach().exp())


# --------------------------------------------------------------------------- checkpoints
def _state(runs: list[_Run], feed: _Feed, step: int, losses: list, settings: str) -> dict:
    """Everything a resumed run needs, as plain tensors and numbers (read with ``weights_only=True``)."""
    return {
        "format": 2,
        "config": settings,
        "step": step,
        "position": [feed.epoch, feed.win, feed.pos],
        "losses": losses,
        "sae": {r.key: {k: v.detach().cpu() for k, v in r.sae.state_dict().items()} for r in runs},
        "opt": {r.key: r.opt.state_dict() for r in runs},
        "since_fired": {r.key: r.since_fired.cpu() for r in runs},
        "log_threshold": {r.key: r.log_threshold.detach().cpu() for r in runs if r.log_threshold is not None},
        "scales": {r.key: [r.s_in, r.s_out] for r in runs},
    }


def _save_checkpoint(path: Path, state: dict, single: bool) -> None:
    """Write a checkpoint through the staged writer. One SAE: the checkpoint is ``out``'s content until
    the SAE replaces it (a sealed directory of ours holding ``checkpoint.pt``); several: one file in ``out``."""
    if not single:
        write_file(path, lambda tmp: torch.save(state, tmp), kind="checkpoint", overwrite=True, param="out")
        return
    with write_dir(path.parent, kind="sae", overwrite=True, param="out") as stage:
        torch.save(state, stage.file(path.name))
        stage.meta["training_checkpoint"] = {"step": state["step"]}


def _load_checkpoint(path: Path, settings: str, runs: list[_Run], lr: float) -> tuple[int, list, list[float]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable: say so in one line
        raise InputError(
            f"{path} is not a readable train_sae checkpoint ({type(exc).__name__}); move it out "
            "or use another out path",
            param="out",
        ) from exc
    if not isinstance(state, dict) or state.get("format") != 2 or state.get("config") != settings:
        raise InputError(
            f"{path} was written by a run with other settings (or another version); delete it or use another out path",
            param="out",
        )
    for r in runs:
        dev = r.sae.W_enc.device
        r.sae.load_state_dict({k: v.to(dev) for k, v in state["sae"][r.key].items()})
        if r.key in state["log_threshold"]:
            r.log_threshold = torch.nn.Parameter(state["log_threshold"][r.key].to(dev))
        r.since_fired = state["since_fired"][r.key].to(dev)
        r.s_in, r.s_out = state["scales"][r.key]
        _make_opt(r, lr)
        r.opt.load_state_dict(state["opt"][r.key])
    return int(state["step"]), list(state["position"]), list(state["losses"])


# --------------------------------------------------------------------------- the public API
def _resumable(out: Path) -> bool:
    """Whether ``out`` is a checkpoint directory a run wrote (sealed by the writer, unchanged since)."""
    return (out / CHECKPOINT).is_file() and writable(out, kind="sae", overwrite=True) is None


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an ``out`` the SAE could not be written onto: it exists and is neither a
    checkpoint directory of a run (resumed) nor, with ``overwrite=True``, an unchanged output of ours or empty."""
    if not out.exists() or _resumable(out):
        return
    if not overwrite:
        raise InputError(f"{out} exists; pass overwrite=True or choose another path", param="overwrite")
    check_outputs([Output(out, kind="sae", overwrite=True, param="out")])


def _write_sae(run: _Run, overwrite: bool) -> None:
    """Write the trained SAE onto ``out`` through the staged writer (``save_sae``/``save_sparsify``): it
    replaces this run's checkpoint directory, or (``overwrite``) an unchanged SAE of ours or an empty one."""
    (save_sparsify if run.sparsify else save_sae)(run.sae, run.out, overwrite=overwrite or _resumable(run.out))


@differentiates  # works under torch.no_grad() and torch.inference_mode()
def train_sae(
    model: HookedLlama,
    hook_name: str,
    texts,
    out: str | os.PathLike,
    *,
    hook_name_out: str | None = None,
    architecture: str = "topk",
    skip_connection: bool = False,
    d_sae: int | None = None,
    expansion: int = 8,
    k: int = 32,
    l0_coef: float = 2e-3,
    bandwidth: float = 0.05,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 1024,
    lr: float | None = None,
    text_batch: int = 16,
    max_tokens: int = 128,
    skip_first: bool = True,
    aux_coef: float = 1 / 32,
    dead_after: int = 200_000,
    buffer_tokens: int | None = None,
    checkpoint_every: int = 200,
    seed: int = 0,
    device=None,
    amp: bool | None = None,
    cache_to_disk: bool | str | os.PathLike = False,
    progress: bool | None = None,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a TopK or JumpReLU SAE on ``hook_name`` of ``model`` (or a transcoder from ``hook_name`` to
    ``hook_name_out``) over ``texts`` and write it to ``out`` in the SAELens layout.

    Args:
        texts: a list of strings, a text file (one document a line) or .jsonl file, a ``datasets``
            dataset (a ``text`` column, or ``input_ids``), or any iterable of those records (a one-shot
            iterator gives one epoch; pass it again, freshly made, to resume).
        hook_name_out: where a transcoder writes (``blocks.{i}.hook_mlp_out`` for ``hook_name =
            blocks.{i}.ln2.hook_normalized``, see ``transcoder_hooks``); ``skip_connection`` adds ``W_skip``.
        architecture: ``"topk"`` (``k`` active latents) or ``"jumprelu"`` (sparsity from ``l0_coef``,
            straight-through ``bandwidth``; each θ starts at the quantile of its latent's pre-activations
            on the first window that makes about ``k`` latents fire per token).
        d_sae: number of latents (default ``expansion * d_in``).
        steps: optimiser steps (default: ``epochs`` passes over the texts); batch_size: tokens a step
            (over all ranks under torchrun).
        lr: Adam learning rate (default ``2e-4 / sqrt(d_sae / 16384)``, OpenAI's scaling).
        text_batch / max_tokens: packed rows per forward, and tokens per row.
        skip_first: leave each row's first token out of training (its residual is an outlier).
        buffer_tokens: tokens shuffled together (default 16 batches; rounded up to whole batches).
        device: where the SAE trains (default: the model's device); amp: bf16 autocast for the SAE's
            maths (default: on for CUDA).
        cache_to_disk: harvest the texts once to a keyed cache (True: ``<out>.acts``, or a path;
            ``hooks.harvest.harvest_to_disk``) and train from it; a cache made from another model, other
            texts or other settings is never reused. Default: no disk, activations harvested on the fly.
        stop_after: stop (with a checkpoint) after this many steps in this call — to test resumption.
        progress: a tqdm bar with the normalised MSE and the dead-latent count (rank 0; off by default).

    Returns:
        ``TrainResult`` with the trained ``SAE`` (already written to ``out``; on every rank under torchrun).

    Example::

        res = train_sae(model, "blocks.15.hook_resid_post", load_corpus(), "sae-l15", k=32, steps=300)
    """
    spec = (hook_name, hook_name_out) if hook_name_out is not None else hook_name
    return _train(model, [spec], texts, Path(out), single=True, **_settings(locals()))


@differentiates  # works under torch.no_grad() and torch.inference_mode()
def train_saes(
    model: HookedLlama,
    hooks: Sequence[str | tuple[str, str]],
    texts,
    out: str | os.PathLike,
    *,
    parallel: str = "data",
    **kwargs,
) -> dict[str, TrainResult]:
    """Train one SAE per hook point (or transcoder per ``(read, write)`` pair) on the same forwards:
    each batch of rows runs once, stopped after the last layer any of them reads. ``out/<hook name>`` holds
    each result (a transcoder's directory is named by the hook it reads); the keyword arguments are
    ``train_sae``'s.

    ``parallel`` (under torchrun): ``"data"`` — every rank trains every SAE on its share of the data,
    gradients summed over ranks; ``"hooks"`` — each rank trains whole hook points (the i-th on rank
    i mod world) over all the data, each one equal to a one-process run of it.

    Returns ``{read hook name: TrainResult}`` (on every rank).

    Example::

        res = train_saes(model, transcoder_hooks(model), texts, "transcoders", k=32, steps=2000)
    """
    if parallel not in ("data", "hooks"):
        raise InputError(f"parallel must be 'data' or 'hooks', got {parallel!r}", param="parallel")
    bad = set(kwargs) - set(_SETTINGS)
    if bad:
        raise TypeError(f"train_saes() got unexpected keyword arguments {sorted(bad)}")
    settings = dict(_DEFAULTS, **kwargs)
    hooks = list(hooks)
    if not hooks:
        raise InputError("train_saes needs at least one hook name", param="hooks")
    out = Path(out)
    if parallel == "hooks" and dist.enabled():
        w, r = dist.world_size(), dist.rank()
        mine = hooks[r::w]
        with dist.local():
            res = _train(model, mine, texts, out, single=False, ckpt_tag=f"rank{r}-of-{w}", **settings) if mine else {}
        merged: dict[str, TrainResult] = {}
        for part in dist.gather({h: _portable(r) for h, r in res.items()}):
            merged.update({h: _unportable(p) for h, p in part.items() if h not in res})
        merged.update(res)
        return {h if isinstance(h, str) else h[0]: merged[h if isinstance(h, str) else h[0]] for h in hooks}
    return _train(model, hooks, texts, out, single=False, **settings)


def _portable(res: TrainResult) -> dict:
    """A ``TrainResult`` as plain data (an SAE's hook points cannot be pickled)."""
    sae = res.sae
    fields = {k: v for k, v in vars(res).items() if k != "sae"}
    return {"cfg": sae.cfg.to_dict(), "state": sae.state_dict(), "input_scale": sae.input_scale, "fields": fields}


def _unportable(data: dict) -> TrainResult:
    sae = SAE(SAEConfig(**data["cfg"]))
    sae.load_state_dict(data["state"])
    sae.input_scale = data["input_scale"]
    return TrainResult(sae=sae, **data["fields"])


_DEFAULTS = {
    k: v.default
    for k, v in inspect.signature(train_sae).parameters.items()
    if v.kind is v.KEYWORD_ONLY and k != "hook_name_out"
}
_SETTINGS = tuple(_DEFAULTS)


def _settings(values: dict) -> dict:
    return {k: values[k] for k in _SETTINGS}


def _train(model: HookedLlama, specs, texts, out: Path, *, single: bool, ckpt_tag: str | None = None, **s) -> Any:
    # ---- step 1 of 5: check everything before any work
    if s["architecture"] not in TRAINABLE:
        raise InputError(
            f"train_sae trains {' or '.join(TRAINABLE)} SAEs, got architecture={s['architecture']!r}",
            param="architecture",
        )
    for name in ("batch_size", "text_batch", "checkpoint_every", "epochs"):
        if not isinstance(s[name], int) or s[name] < 1:
            raise InputError(f"{name} must be a positive integer, got {s[name]!r}", param=name)
    if s["steps"] is not None and (not isinstance(s["steps"], int) or s["steps"] < 1):
        raise InputError(f"steps must be a positive integer or None, got {s['steps']!r}", param="steps")
    world = dist.world_size()
    if s["batch_size"] % world:
        raise InputError(
            f"batch_size={s['batch_size']} does not split over {world} processes; pass a multiple of {world}",
            param="batch_size",
        )
    widths = _hook_widths(model)
    runs: list[_Run] = []
    seen = set()
    device = torch.device(s["device"]) if s["device"] is not None else model.device
    for spec in specs:
        read, write = (spec, None) if isinstance(spec, str) else tuple(spec)
        model.hook_registry.get(read)
        if write is not None:
            model.hook_registry.get(write)
            if write == read:
                write = None
        d_in = widths.get(read, model.d_model)
        d_out = widths.get(write, model.d_model) if write else d_in
        d_sae = int(s["d_sae"] or s["expansion"] * d_in)
        cfg = SAEConfig(
            s["architecture"],
            d_in,
            d_sae,
            read,
            hook_name_out=write,
            d_out=d_out,
            k=int(s["k"]) if s["architecture"] == "topk" else None,
            skip_connection=bool(s["skip_connection"]),
            source_format="saelens",
            metadata={
                "model_name": getattr(model.config, "_name_or_path", None) or getattr(model, "source", None),
                "context_size": s["max_tokens"],
            },
        )
        if s["skip_connection"] and write is None:
            raise InputError(
                "a skip connection is for transcoders; pass hook_name_out= or skip_connection=False",
                param="skip_connection",
            )
        sae = SAE(cfg).to(device)
        check_fits(sae, model)
        if cfg.is_transcoder and cfg.architecture == "topk":
            m = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", read)
            if m is None or write != f"blocks.{m.group(1)}.hook_mlp_out":
                raise InputError(
                    "a TopK transcoder is written in sparsify's layout, which holds MLP transcoders only "
                    "(blocks.{i}.ln2.hook_normalized -> blocks.{i}.hook_mlp_out); pass architecture='jumprelu' "
                    "for this pair (SAELens's layout)",
                    param="architecture",
                )
            norm = model.model.layers[int(m.group(1))].post_attention_layernorm.weight
            sae.input_scale = norm.detach().float().to(device).clone()
        else:
            saelens_cfg(sae)  # refuses what the SAELens layout cannot hold, before any work
        if read in seen:
            raise InputError(f"{read} is listed twice; train one SAE per hook point", param="hooks")
        seen.add(read)
        runs.append(_Run(read, write, sae, out if single else out / read))
    source, repeatable = _text_source(texts)
    if not repeatable and s["epochs"] > 1:
        raise InputError(
            "a one-shot iterator gives one epoch; pass the texts as a list, a file or a dataset for epochs > 1",
            param="epochs",
        )
    for r in runs:
        _check_out(r.out, s["overwrite"])
    ckpt = out / (CHECKPOINT if ckpt_tag is None else f"checkpoint-{ckpt_tag}.pt")
    if not single and out.exists() and not out.is_dir():
        raise InputError(f"{out} is not a directory; choose another out path", param="out")
    lr = s["lr"] if s["lr"] is not None else 2e-4 / math.sqrt(runs[0].sae.d_sae / 16384)
    batch = s["batch_size"]
    window = max(batch, -(-(s["buffer_tokens"] or 16 * batch) // batch) * batch)
    amp = s["amp"] if s["amp"] is not None else device.type == "cuda"
    hp = {
        "amp": amp,
        "bandwidth": s["bandwidth"],
        "l0_coef": s["l0_coef"],
        "aux_coef": s["aux_coef"],
        "dead_after": s["dead_after"],
    }
    names = sorted({n for r in runs for n in (r.read, r.target)})
    settings = json.dumps(
        {
            "runs": [(r.key, r.sae.cfg.to_dict()) for r in runs],
            "world": world,
            **{k: v for k, v in s.items() if k not in ("progress", "overwrite", "stop_after", "device", "steps")},
        },
        sort_keys=True,
        default=str,
    )

    # ---- step 2 of 5: the data feed (from a keyed disk cache when asked), resumed or fresh
    cache = None
    if s["cache_to_disk"]:
        if not repeatable:
            raise InputError(
                "cache_to_disk reads the texts twice (to key the cache, then to fill it); pass a list, a file or "
                "a dataset instead of a one-shot iterator",
                param="cache_to_disk",
            )
        where = out.with_name(out.name + ".acts") if s["cache_to_disk"] is True else Path(s["cache_to_disk"])
        cache = harvest_to_disk(
            model,
            names,
            source,
            where,
            max_tokens=s["max_tokens"],
            skip_first=s["skip_first"],
            text_batch=s["text_batch"],
            progress=bool(s["progress"]),
        )
    feed = _Feed(
        model,
        names,
        source,
        repeatable,
        max_tokens=s["max_tokens"],
        skip_first=s["skip_first"],
        text_batch=s["text_batch"],
        window=window,
        batch=batch,
        seed=s["seed"],
        device=device,
        epochs=s["epochs"] if s["steps"] is None else None,
        cache=cache,
    )
    start, losses = 0, []
    if ckpt.exists():
        start, position, losses = _load_checkpoint(ckpt, settings, runs, lr)
        feed.seek(*position)
    resumed_from = start
    steps = s["steps"]

    # ---- step 3 of 5: train
    from tqdm.auto import tqdm

    label = runs[0].key if len(runs) == 1 else f"{len(runs)} SAEs"
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"train_sae {label}",
        disable=not s["progress"] or not dist.is_main(),
        leave=False,
    )
    step, stopped = start, False
    try:
        while steps is None or step < steps:
            if s["stop_after"] is not None and step - start >= s["stop_after"]:
                stopped = True
                break
            batch_acts = feed.next()
            if batch_acts is None:
                break
            if step == 0:
                for r in runs:
                    _init_run(r, feed.window_tensors(), s["seed"], lr, s["k"])
            nmse = []
            for r in runs:
                nmse.append(_step(r, *r.inputs(batch_acts, r.s_in, r.s_out), hp))
            if step % 10 == 0 or (steps is not None and step == steps - 1):
                losses.append(sum(nmse) / len(nmse))
                dead = sum(int((r.since_fired > s["dead_after"]).sum()) for r in runs)
                bar.set_postfix(nmse=f"{losses[-1]:.3f}", dead=dead)
            bar.update(1)
            step += 1
            if step % s["checkpoint_every"] == 0 and dist.is_main():
                _save_checkpoint(ckpt, _state(runs, feed, step, losses, settings), single)
    finally:
        bar.close()
    if step == 0:
        raise InputError(
            f"the texts give fewer than batch_size={batch} tokens; pass more texts or a smaller batch_size",
            param="batch_size",
        )
    made = cache.stats if cache is not None else feed.stats
    stats = {**vars(made), "padding": made.padding}

    def results() -> Any:
        res = {
            r.read: TrainResult(r.sae, r.path, step, step * batch, losses, resumed_from, r.s_in, r.s_out, stats)
            for r in runs
        }
        return res[runs[0].read] if single else res

    if stopped:  # stopped early on purpose: keep the checkpoint, write nothing else
        if dist.is_main():
            _save_checkpoint(ckpt, _state(runs, feed, step, losses, settings), single)
        dist.barrier()
        return results()
    if steps is not None and step < steps:
        warnings.warn(f"the texts ran out after {step} of {steps} steps; the SAE is written as it is", stacklevel=3)

    # ---- step 4 of 5: fold the scales, write
    for r in runs:
        _fold(r)
        r.sae.cfg.metadata["training_tokens"] = step * batch
    if dist.is_main():
        for r in runs:
            _write_sae(r, s["overwrite"])
        if not single and ckpt.exists():
            ckpt.unlink()
    dist.barrier()

    # ---- step 5 of 5: the results
    return results()
