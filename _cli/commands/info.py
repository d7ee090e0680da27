"""``scalpel info``: architecture, parameter count, dtype/device and the hook map."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

from _cli.context import DEFAULT_MODEL, model_meta
from _cli.inputs import CLIError
from _cli.options import common
from _cli.report import Output

if TYPE_CHECKING:
    from hooks.model import HookedLlama

HELP = "architecture, parameter count, dtype/device and the hook map"
EXAMPLE = "scalpel info --all-hooks"


def add_arguments(p) -> None:
    p.add_argument("--all-hooks", action="store_true", help="list every hook point instead of one line per kind")
    p.add_argument(
        "--plan",
        action="store_true",
        help="where each layer would go and the memory of weights, KV cache and a cache of every hook point, "
        "from config.json and the safetensors headers alone (no weight is read)",
    )
    p.add_argument(
        "--max-memory",
        type=_max_memory,
        metavar="DEV=SIZE,...",
        help="with --plan: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (default: what is free here)",
    )
    p.add_argument(
        "--shape",
        type=_shape,
        metavar="BxP",
        help="with --plan: batch x positions of the KV cache and cache figures (default 1x2048)",
    )
    common(p)


def _max_memory(text: str) -> dict:
    out: dict = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE,... such as 0=70GiB,cpu=200GiB, got {text!r}")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


def _shape(text: str) -> tuple[int, int]:
    b, sep, p = text.lower().partition("x")
    if not sep or not b.isdigit() or not p.isdigit() or int(b) < 1 or int(p) < 1:
        raise argparse.ArgumentTypeError(f"expected BATCHxPOSITIONS such as 8x256, got {text!r}")
    return int(b), int(p)


PROBE_POSITIONS = 4


@torch.no_grad()
def hook_shapes(model: HookedLlama, positions: int = PROBE_POSITIONS) -> dict[str, list[int]]:
    """Shape of every hook point (``attn.hook_result`` included) for one prompt of ``positions`` tokens."""
    tokens = (torch.arange(positions) % model.d_vocab)[None].to(model.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: True)
    return {name: list(cache[name].shape) for name in model.hook_names()}


def _hook_kind(name: str) -> str:
    parts = name.split(".")
    return "blocks.{i}." + ".".join(parts[2:]) if parts[0] == "blocks" else name


def run(args, ctx) -> Output:
    """Architecture, parameter count, dtype/device and the hook map (names x shapes); or, with ``--plan``,
    the memory plan (``HookedLlama.plan``) without loading the weights."""
    if args.plan:
        return _plan(args, ctx)
    if args.max_memory is not None or args.shape is not None:
        raise CLIError("--max-memory and --shape size a memory plan: add --plan")
    model = ctx.model()
    c = model.config
    from hooks import config as hooks_config

    rope = hooks_config.rope_parameters(c)
    attn = [layer.self_attn for layer in model.model.layers]
    windows = [a.sliding_window for a in attn]
    arch = {
        "architecture": hooks_config.family_class_name(c),
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "n_heads": model.n_heads,
        "n_kv_heads": model.n_kv_heads,
        "d_head": model.d_head,
        "d_mlp": model.d_mlp,
        "d_vocab": model.d_vocab,
        "max_positions": c.max_position_embeddings,
        "activation": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_type": rope.get("rope_type", "default"),
        "rope_theta": rope.get("rope_theta"),
        "tied_embeddings": model.lm_head.weight is model.model.embed_tokens.weight,
        "attention_bias": any(getattr(a, n).bias is not None for a in attn for n in hooks_config.ATTENTION_PROJECTIONS),
        "mlp_bias": any(
            getattr(layer.mlp, n).bias is not None for layer in model.model.layers for n in hooks_config.MLP_PROJECTIONS
        ),
        "sliding_window": windows if any(w is not None for w in windows) else None,  # keys per query, per layer
        "qk_norm": hooks_config.qk_norm(c),
    }
    n_params = sum(p.numel() for p in model.parameters())
    shapes = hook_shapes(model)
    data = {
        "command": "info",
        "model": model_meta(model),
        "config": arch,
        "parameters": n_params,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "tokenizer": type(model.tokenizer).__name__ if model.tokenizer is not None else None,
        "hook_probe": {"batch": 1, "positions": PROBE_POSITIONS},
        "hooks": [{"name": n, "shape": s} for n, s in shapes.items()],
    }
    out = Output("info", data)
    facts = [
        ["source", model.source or "in memory"],
        ["parameters", f"{n_params:,}"],
        ["dtype / device", f"{data['dtype']} / {data['device']}"],
        ["tokenizer", data["tokenizer"] or "none"],
    ]
    facts += [[k, v] for k, v in arch.items()]
    out.table("model", ["", "value"], facts, max_width=0)
    if args.all_hooks:
        out.table(
            f"hook points ({len(shapes)}; shapes for batch=1, pos={PROBE_POSITIONS})",
            ["hook point", "shape"],
            [[n, str(s)] for n, s in shapes.items()],
        )
    else:
        kinds: dict[str, list] = {}
        for name, shape in shapes.items():
            kinds.setdefault(_hook_kind(name), []).append(shape)
        rows = [[k, len(v), str(v[0]) if all(s == v[0] for s in v) else "varies"] for k, v in kinds.items()]
        out.table(
            f"hook map ({len(shapes)} hook points; shapes for batch=1, pos={PROBE_POSITIONS})",
            ["hook point", "count", "shape"],
            rows,
            note="--all-hooks lists every name",
        )
    return out


def _plan(args, ctx) -> Output:
    from hooks import HookedLlama

    batch, positions = args.shape or (1, 2048)
    source = ctx.model().config if ctx.model_spec == DEFAULT_MODEL else ctx.model_spec  # 135M: its config
    plan = HookedLlama.plan(source, max_memory=args.max_memory, dtype=args.dtype, batch=batch, positions=positions)
    data = plan.to_dict()
    out = Output("info", {"command": "info", "model": ctx.model_spec, "plan": data})
    out.table(
        f"plan: {data['family']}, {data['n_layers']} layers, {data['dtype']}",
        ["part", "device", "weights (bytes)"],
        [[p["part"], p["device"], p["weight_bytes"]] for p in data["parts"]],
    )
    shape = f"{batch}x{positions}"
    out.table(
        "memory per device (bytes)",
        ["device", "weights", f"KV cache {shape}", f"cache {shape}", "max_memory"],
        [
            [d["device"], d["weight_bytes"], d["kv_cache_bytes"], d["cache_bytes"], d["max_memory_bytes"]]
            for d in data["devices"]
        ],
        note=f"cache: the {data['cached_hook_points']} hook points run_with_cache keeps by default, each tensor once",
    )
    return out
