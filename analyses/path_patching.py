"""Path patching (IOI-style): how much of a sender head's effect reaches a set of receiver heads, or
the logits, along direct paths only.

Convention (the same as ``activation_patching``): the base run is the corrupted prompt and values come
from the clean prompt. For each sender head S:

1. Run the corrupted prompt with S's output (``hook_z``, every position) taken from the clean run and
   every *other* head in later layers frozen at its corrupted value (MLPs recomputed, or frozen too
   with ``freeze_mlps=True``). Record the receivers' inputs (``hook_q`` of each receiver query head,
   ``hook_k`` / ``hook_v`` of its key/value group: under GQA the group is shared, so a k/v receiver
   changes every query head of its group).
2. Run the corrupted prompt again with only those receiver inputs replaced by the recorded values and
   read the metric. With ``receivers=None`` step 1 runs to the logits and is the answer (sender →
   logits, through MLPs unless frozen).

Senders are batched per layer (one variant per batch row) and each run starts at the sender's (or the
first receiver's) layer from the cached corrupted residual stream.

Example::

    res = path_patching(model, clean, corrupted, answers=(" Mary", " John"),
                        receivers=["L20H3", "L21H0"], receiver_input="q")
    res.values.shape      # [layers before 20, 9 heads]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hooks import InputError, act_name
from hooks.model import takes_model

from .engine import FINAL, EngineStats, _capture, _Captured, prepare_pair, score_logits, unembed_normalized
from .heads import group_size, kv_group, parse_heads
from .metrics import Metric, resolve_metric
from .patching import PatchingResult, _baselines, _metric_name

if TYPE_CHECKING:
    from hooks.model import HookedLlama


def _set_sender_hook(heads: list[int], clean_z: torch.Tensor, B: int):
    """Row block j gets the clean z of head ``heads[j]`` (every position)."""

    def hook(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        rows = z.view(len(heads), B, *z.shape[1:])
        for j, h in enumerate(heads):
            rows[j, :, :, h] = clean_z[:, :, h].to(z.device, z.dtype)
        return z

    return hook


def _freeze_hook(frozen: torch.Tensor, n_rows: int):
    """Replace the whole activation by the corrupted run's (repeated for every row block)."""

    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        return frozen.to(t.device, t.dtype).repeat(n_rows, *([1] * (t.dim() - 1)))

    return hook


@takes_model
def path_patching(
    model: HookedLlama,
    clean,
    corrupted,
    metric: Metric | str | None = None,
    *,
    answers=None,
    receivers=None,
    receiver_input: str = "qkv",
    senders=None,
    freeze_mlps: bool = False,
    attention_mask=None,
    max_batch: int | None = None,
) -> PatchingResult:
    """Effect of each sender head on the metric through the receivers' inputs only (see module docstring).

    Args:
        model, clean, corrupted, metric, answers: as in ``activation_patching``.
        receivers: receiver heads (``["L20H3", (21, 0)]``, query heads) or None for the logits.
        receiver_input: which receiver inputs carry the path: any of "q", "k", "v" (e.g. "qkv", "v").
        senders: sender heads (default: every head in layers before the first receiver, or every head).
        freeze_mlps: also freeze MLP outputs at their corrupted values (paths through heads only).
        max_batch: most senders per forward.

    Returns:
        ``PatchingResult`` (method "path") with ``values`` [sender layer, head]; cells of heads that were
        not senders are NaN.

    Example::

        path_patching(model, clean, corrupted, answers=(" Mary", " John"), receivers=None).top_rows(5)
    """
    inputs = prepare_pair(model, clean, corrupted, attention_mask)
    n, H, B = model.n_layers, model.n_heads, inputs.batch
    recv = parse_heads(model, receivers) if receivers is not None else []
    kinds = [k for k in "qkv" if k in receiver_input]
    if receivers is not None and (not kinds or set(receiver_input) - set("qkv")):
        raise InputError(f"receiver_input={receiver_input!r}; use letters from 'qkv', e.g. 'q' or 'kv'")
    first_recv = min(l for l, _ in recv) if recv else n
    if senders is None:
        send = [(l, h) for l in range(first_recv) for h in range(H)]
    else:
        send = parse_heads(model, senders)
    if not send:
        raise InputError("no sender heads: receivers in layer 0 have no earlier heads; pass later receivers")
    late = [f"L{l}H{h}" for l, h in send if l >= first_recv]
    if late:
        raise InputError(f"sender(s) {late} are not before the first receiver layer {first_recv}")
    send_layers = sorted({l for l, _ in send})
    lo = send_layers[0]
    stop = max(l for l, _ in recv) + 1 if recv else n
    names_c = [act_name("z", l) for l in send_layers]
    names_k = {act_name("z", l) for l in range(lo, n)} | {
        act_name("resid_pre", l) for l in send_layers + [first_recv] if l < n
    }
    if freeze_mlps:
        names_k |= {act_name("mlp_out", l) for l in range(lo, n)}
    with torch.no_grad():
        clean_logits, cc = model.run_with_cache(inputs.clean, attention_mask=inputs.mask, names_filter=names_c)
        corr_logits, kc = model.run_with_cache(
            inputs.corrupted, attention_mask=inputs.mask, names_filter=sorted(names_k)
        )
    metric = resolve_metric(model, metric, answers, clean_logits)
    P = inputs.n_pos
    full = not isinstance(metric, Metric)
    read = (lambda x: x) if full else (lambda x: x[:, [metric.pos % P]])
    values = torch.full((len(send_layers), H), float("nan"))
    stats = EngineStats()
    size = max_batch or H
    with torch.no_grad():
        for li, Ls in enumerate(send_layers):
            heads = [h for l, h in send if l == Ls]
            for c0 in range(0, len(heads), size):
                hs = heads[c0 : c0 + size]
                c = len(hs)
                am = inputs.mask.repeat(c, 1) if inputs.mask is not None else None
                hooks = [(act_name("z", Ls), _set_sender_hook(hs, cc["z", Ls], B))]
                hooks += [(act_name("z", l), _freeze_hook(kc["z", l], c)) for l in range(Ls + 1, stop)]
                if freeze_mlps:
                    hooks += [(act_name("mlp_out", l), _freeze_hook(kc["mlp_out", l], c)) for l in range(Ls, stop)]
                recorded: dict[str, torch.Tensor] = {}

                def record(t, hook, recorded=recorded):
                    recorded[hook.name] = t.detach().clone()

                names_r = sorted({act_name(k, l) for l, _ in recv for k in kinds})
                hooks += [(name, record) for name in names_r]
                x = kc["resid_pre", Ls].repeat(c, 1, 1)
                stats.n_forward_calls += 1
                with model.hooks(fwd_hooks=hooks):
                    out = model(x, attention_mask=am, start_at_layer=Ls, stop_at_layer=stop if recv else None)
                if not recv:
                    logits = read(out)
                else:  # step 2: corrupted run with only the receivers' inputs replaced
                    hooks2 = []
                    for name in names_r:
                        layer, kind = int(name.split(".")[1]), name.rsplit("_", 1)[1]
                        idx = sorted({h if kind == "q" else kv_group(model, h) for l, h in recv if l == layer})
                        keep = recorded[name]

                        def put(t, hook, idx=idx, keep=keep):
                            t = t.clone()
                            t[:, :, idx] = keep[:, :, idx].to(t.dtype)
                            return t

                        hooks2.append((name, put))
                    hooks2.append((FINAL, _capture))
                    x = kc["resid_pre", first_recv].repeat(c, 1, 1)
                    stats.n_forward_calls += 1
                    with model.hooks(fwd_hooks=hooks2):
                        try:
                            model(x, attention_mask=am, start_at_layer=first_recv)
                        except _Captured as cap:
                            resid = cap.tensor
                    logits = unembed_normalized(model, read(resid))
                scores = score_logits(metric, logits.reshape(c, B, *logits.shape[1:])).cpu()
                for h, s in zip(hs, scores):
                    values[li, h] = s
                stats.n_chunks += 1
    stats.n_patches = stats.n_computed = len(send)
    clean_v, corr_v = _baselines(metric, clean_logits, corr_logits)
    extra = {
        "receivers": [{"layer": l, "head": h, "kv_group": kv_group(model, h)} for l, h in recv],
        "receiver_input": "".join(kinds) if recv else "logits",
        "freeze_mlps": freeze_mlps,
    }
    return PatchingResult(
        component="z" if not recv else f"z → {''.join(kinds)} of {len(recv)} receivers",
        method="path",
        metric_name=_metric_name(metric),
        values=values,
        axes=("layer", "head"),
        layers=send_layers,
        positions=None,
        units=list(range(H)),
        unit_kind="head",
        clean_value=clean_v,
        corrupted_value=corr_v,
        str_tokens=inputs.str_tokens,
        group_size=group_size(model),
        stats=stats,
        extra=extra,
    )
