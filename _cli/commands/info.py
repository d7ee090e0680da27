"""``scalpel info``: architecture, parameter count, dtype/device and the hook map."""

from __future__ import annotations

import torch

from _cli.context import model_meta
from _cli.options import common
from _cli.report import Output

HELP = "architecture, parameter count, dtype/device and the hook map"
EXAMPLE = "scalpel info --all-hooks"


def add_arguments(p) -> None:
    p.add_argument("--all-hooks", action="store_true", help="list every hook point instead of one line per kind")
    common(p)


PROBE_POSITIONS = 4


@torch.no_grad()
def hook_shapes(model, positions: int = PROBE_POSITIONS) -> dict[str, list[int]]:
    """Shape of every hook point (``attn.hook_result`` included) for one prompt of ``positions`` tokens."""
    tokens = (torch.arange(positions) % model.d_vocab)[None].to(model.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: True)
    return {name: list(cache[name].shape) for name in model.hook_names()}


def _hook_kind(name: str) -> str:
    parts = name.split(".")
    return "blocks.{i}." + ".".join(parts[2:]) if parts[0] == "blocks" else name


def run(args, ctx) -> Output:
    """Architecture, parameter count, dtype/device and the hook map (names x shapes)."""
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
