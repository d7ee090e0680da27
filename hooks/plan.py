"""A memory plan before loading: where each layer goes and what weights, KV cache and caches take.

``HookedLlama.plan(config_or_dir, max_memory=…, dtype=…)`` builds the model on the meta device (no
memory, no weights read), asks accelerate for the device map a load would use, and adds up, per
device: the weights, the KV cache of ``batch`` × ``positions`` tokens, and the activations
``run_with_cache`` would keep for hook points ``names`` at that shape (each stored tensor counted once,
as ``ActivationCache.nbytes`` counts them). ``scalpel info --plan`` prints the same.

Example::

    plan = HookedLlama.plan("Llama-3.1-70B", max_memory={0: "75GiB", 1: "75GiB", "cpu": "200GiB"})
    print(plan)                      # one row per group of layers, then one per device
    plan.device_map["model.layers.79"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config as cfg
from . import placement
from .errors import InputError

GiB = 1 << 30


def hook_shape(config, name: str, batch: int, positions: int) -> tuple[tuple[int, ...], bool]:
    """(shape, float32?) of hook point ``name`` for ``batch`` × ``positions`` tokens with no KV cache
    (norm scales are float32; every other activation has the model's dtype)."""
    B, P = batch, positions
    M, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, G, D = config.num_attention_heads, config.num_key_value_heads, cfg.head_dim(config)
    local = name.split(".", 2)[2] if name.startswith("blocks.") else name
    if local.endswith("hook_scale"):
        heads = H if "q_ln" in local else G if "k_ln" in local else None
        return ((B, P, heads, 1) if heads else (B, P, 1)), True
    if local in ("attn.q_ln.hook_normalized", "attn.k_ln.hook_normalized"):
        return (B, P, H if "q_ln" in local else G, D), False
    shapes = {
        "attn.hook_q": (B, P, H, D),
        "attn.hook_rot_q": (B, P, H, D),
        "attn.hook_z": (B, P, H, D),
        "attn.hook_k": (B, P, G, D),
        "attn.hook_v": (B, P, G, D),
        "attn.hook_rot_k": (B, P, G, D),
        "attn.hook_attn_scores": (B, H, P, P),
        "attn.hook_pattern": (B, H, P, P),
        "attn.hook_result": (B, P, H, M),
        "mlp.hook_pre": (B, P, F),
        "mlp.hook_gate": (B, P, F),
        "mlp.hook_pre_linear": (B, P, F),
        "mlp.hook_post": (B, P, F),
        "hook_logits": (B, P, V),
    }
    return shapes.get(local, (B, P, M)), False


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class MemoryPlan:
    """What loading and running a model would take, per device (bytes), before anything is loaded."""

    family: str
    n_layers: int
    dtype: torch.dtype
    device_map: dict[str, placement.Device]
    parts: list[tuple[str, placement.Device, int]]  # (module or layer range, device, weight bytes)
    weights: dict[placement.Device, int]
    kv_cache: dict[placement.Device, int]
    cache: dict[placement.Device, int]
    batch: int
    positions: int
    cached_points: int
    max_memory: dict[placement.Device, int] | None = None
    offloaded_layers: list[int] = field(default_factory=list)

    def device_of(self, module: str) -> placement.Device:
        """Where the map puts ``module`` (an HF module name such as ``"model.layers.3"``)."""
        return placement.device_of(self.device_map, module + ".")

    @property
    def total_weights(self) -> int:
        return sum(self.weights.values())

    def to_dict(self) -> dict[str, Any]:
        def dev(d):
            return d if isinstance(d, str) else f"cuda:{d}"

        devices = sorted({*self.weights, *self.kv_cache, *self.cache}, key=_device_order)
        return {
            "family": self.family,
            "n_layers": self.n_layers,
            "dtype": str(self.dtype).replace("torch.", ""),
            "batch": self.batch,
            "positions": self.positions,
            "cached_hook_points": self.cached_points,
            "device_map": {k: dev(v) for k, v in self.device_map.items()},
            "parts": [{"part": p, "device": dev(d), "weight_bytes": b} for p, d, b in self.parts],
            "devices": [
                {
                    "device": dev(d),
                    "weight_bytes": self.weights.get(d, 0),
                    "kv_cache_bytes": self.kv_cache.get(d, 0),
                    "cache_bytes": self.cache.get(d, 0),
                    "max_memory_bytes": (self.max_memory or {}).get(d),
                }
                for d in devices
            ],
            "total_weight_bytes": self.total_weights,
        }

    def __str__(self) -> str:
        shape = f"b{self.batch}×s{self.positions}"
        lines = [
            f"{self.family}, {self.n_layers} layers, {str(self.dtype).replace('torch.', '')}: "
            f"weights {_size(self.total_weights)}",
            "",
            f"{'part':<28} {'device':<8} {'weights':>12}",
        ]
        for part, device, nbytes in self.parts:
            lines.append(f"{part:<28} {_dev(device):<8} {_size(nbytes):>12}")
        lines += [
            "",
            f"{'device':<8} {'weights':>12} {'KV cache ' + shape:>20} {'cache ' + shape:>20} {'max_memory':>12}",
        ]
        for device in sorted({*self.weights, *self.kv_cache, *self.cache}, key=_device_order):
            limit = (self.max_memory or {}).get(device)
            lines.append(
                f"{_dev(device):<8} {_size(self.weights.get(device, 0)):>12} "
                f"{_size(self.kv_cache.get(device, 0)):>20} {_size(self.cache.get(device, 0)):>20} "
                f"{_size(limit) if limit is not None else '-':>12}"
            )
        lines.append(f"(cache: {self.cached_points} hook points, each stored tensor counted once)")
        return "\n".join(lines)


def _device_order(d) -> tuple:
    return (0, d, "") if isinstance(d, int) else (1, 0, {"mps": "a", "cpu": "b", "disk": "c"}.get(d, d))


def _dev(d) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _config_and_dtype(config_or_dir, dtype):
    from transformers import PretrainedConfig

    from .loading import _checkpoint_dtype, parse_dtype, read_config, resolve_source

    wanted = parse_dtype(dtype)
    if isinstance(config_or_dir, PretrainedConfig):
        config = config_or_dir
        if getattr(config, "model_type", None) not in cfg.SUPPORTED_MODEL_TYPES:
            raise InputError(f"plan takes a config of {cfg.SUPPORTED_TEXT}", param="config_or_dir")
        cfg.check_supported(config)
        return config, wanted or _checkpoint_dtype(config) or torch.float32
    if not isinstance(config_or_dir, (str, Path)):
        raise InputError(
            f"plan takes a transformers config or a checkpoint directory, got {type(config_or_dir).__name__}",
            param="config_or_dir",
        )
    source = resolve_source(str(config_or_dir))
    if source.is_file():
        raise InputError(
            f"{source} is a file; plan takes a checkpoint directory or a config (a GGUF is de-quantised in memory)",
            param="config_or_dir",
        )
    config = read_config(source)
    if wanted is None:
        from .checkpoint import Checkpoint

        wanted = _checkpoint_dtype(config)
        if wanted is None:
            try:
                wanted = Checkpoint.open(source).floating_dtype()
            except Exception:  # noqa: BLE001 - no readable weights: the config alone decides
                wanted = None
    return config, wanted or torch.float32


def plan(
    cls,
    config_or_dir,
    *,
    max_memory=None,
    dtype=None,
    device_map="auto",
    batch: int = 1,
    positions: int = 2048,
    names=None,
) -> MemoryPlan:
    for value, what in ((batch, "batch"), (positions, "positions")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be an integer >= 1, got {value!r}", param=what)
    config, dtype = _config_and_dtype(config_or_dir, dtype)
    with torch.device("meta"):
        model = cls(config).to(dtype)  # placeholders only: a 70B config costs no memory
    mapping = placement.device_map_for(
        model, device_map, max_memory=max_memory, dtype=dtype, check_devices=max_memory is None
    )
    limits = placement.parse_max_memory(max_memory)
    item = dtype.itemsize

    def where(tensor_name: str) -> placement.Device:
        return placement.device_of(mapping, tensor_name)

    def run_device(tensor_name: str) -> placement.Device:
        device = where(tensor_name)
        main = placement.main_device(mapping)
        return main if device == "disk" or (device == "cpu" and main != "cpu") else device

    weights: dict[placement.Device, int] = {}
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # tied embeddings: one tensor
        seen.add(id(p))
        nbytes = p.numel() * item
        d = where(name)
        weights[d] = weights.get(d, 0) + nbytes
        top = name.split(".")
        part = ".".join(top[:3]) if top[:2] == ["model", "layers"] else name.rsplit(".", 1)[0]
        sizes[part] = sizes.get(part, 0) + nbytes
    parts: list[tuple[str, placement.Device, int]] = []
    n = model.n_layers
    order = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(n)] + ["model.norm", "lm_head"]
    for part in order:
        if part not in sizes:
            continue
        device = where(part + ".")  # the longest prefix covering the module
        if (
            parts
            and part.startswith("model.layers.")
            and parts[-1][0].startswith("model.layers.")
            and parts[-1][1] == device
        ):
            first = parts[-1][0].split(".")[2].split("-")[0]
            parts[-1] = (f"model.layers.{first}-{part.split('.')[2]}", device, parts[-1][2] + sizes[part])
        else:
            parts.append((part, device, sizes[part]))
    kv: dict[placement.Device, int] = {}
    G, D = config.num_key_value_heads, cfg.head_dim(config)
    per_layer = 2 * batch * positions * G * D * item
    for i in range(n):
        d = run_device(f"model.layers.{i}.")
        kv[d] = kv.get(d, 0) + per_layer
    points = model._cache_points(names)
    cache: dict[placement.Device, int] = {}
    cached = {p.name for p in points}
    for point in points:
        if point.name.endswith(".hook_resid_pre"):  # the very tensor cached just before it, stored once
            previous = "hook_embed" if point.layer == 0 else f"blocks.{point.layer - 1}.hook_resid_post"
            if previous in cached:
                continue
        shape, fp32 = hook_shape(config, point.name, batch, positions)
        if point.layer is not None:
            d = run_device(f"model.layers.{point.layer}.")
        else:
            owner = {"hook_logits": "lm_head.", "hook_embed": "model.embed_tokens."}.get(point.name, "model.norm.")
            d = run_device(owner)
        cache[d] = cache.get(d, 0) + _numel(shape) * (4 if fp32 else item)
    offloaded = [i for i in range(n) if run_device(f"model.layers.{i}.") != where(f"model.layers.{i}.")]
    return MemoryPlan(
        family=cfg.family_class_name(config),
        n_layers=n,
        dtype=dtype,
        device_map=mapping,
        parts=parts,
        weights=weights,
        kv_cache=kv,
        cache=cache,
        batch=batch,
        positions=positions,
        cached_points=len(points),
        max_memory=limits,
        offloaded_layers=offloaded,
    )
