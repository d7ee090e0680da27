"""``MergeLora``: merge a PEFT LoRA adapter directory into the weights.

Reads ``adapter_config.json`` (``base_model_name_or_path``, ``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, ``rank_pattern``/``alpha_pattern``) and ``adapter_model.safetensors`` with PEFT's key
names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), and adds
``scale · s · B @ A`` to each target weight, ``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from _core.readers import read_json_object, register_loader

from .. import _state
from ..errors import AdapterError
from .base import Edit, HookList, as_float

if TYPE_CHECKING:
    from hooks import HookedLlama

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Features whose merge is not ``W += s·B@A`` (or that carry more than LoRA matrices): refused by name.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA",
}
_LINEAR = re.compile(r"^(?:model\.layers\.(?P<layer>\d+)\.(?P<part>self_attn|mlp)\.(?P<proj>[a-z_]+)|lm_head)$")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _model_key(name: str | None) -> str | None:
    """A comparable model name: last path component, without .gguf and a quantisation suffix."""
    if not name:
        return None
    base = Path(str(name).rstrip("/")).name.lower()
    base = re.sub(r"\.gguf$", "", base)
    base = re.sub(r"[.\-_](q\d\w*|f16|f32|bf16|fp16|fp32|iq\d\w*)$", "", base)
    return base or None


def _use_its_base(base: str | None) -> str:
    """The fix for an adapter that does not fit: merge it into the model it was trained on."""
    if base:
        return f"merge it into the model it was trained on ({base})"
    return "merge it into the model it was trained on (its base_model_name_or_path is not recorded)"


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name's tail (regex)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass
class _Pair:
    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float


@dataclass(eq=False, repr=False)
class MergeLora(Edit):
    """Merge a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``W += scale · (lora_alpha / r) · B @ A`` per target module (``/ sqrt(r)`` with rsLoRA). An adapter
    whose shapes do not fit (another base model) or whose matrices disagree with ``r`` is refused
    naming the module and both shapes; so is one whose ``base_model_name_or_path`` names another
    model than ``model.source`` when both are known (``allow_base_mismatch=True`` overrides).
    ``adapter_sha256`` (filled on first read) pins the weights file: a plan replayed on a changed
    file is refused. Hooks add ``scale·s·(x Aᵀ) Bᵀ`` to each target module's output at run time.
    """

    adapter_dir: str
    scale: float = 1.0
    allow_base_mismatch: bool = False
    adapter_sha256: str | None = None

    magnitudes = ("scale",)

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_dir, (str, Path)) or not str(self.adapter_dir):
            raise AdapterError(f"{self.who}: adapter_dir must be a directory path, got {self.adapter_dir!r}")
        self.adapter_dir = str(self.adapter_dir)
        self.scale = as_float(self.scale, "scale", self.who)
        if not isinstance(self.allow_base_mismatch, bool):
            raise AdapterError(f"{self.who}: allow_base_mismatch must be true or false")
        self._cache: tuple[dict, list[_Pair]] | None = None

    # -- reading ---------------------------------------------------------------------
    def read(self) -> tuple[dict, list[_Pair]]:
        """(adapter config, [(module, A, B, scaling)]) – validated against the files, not yet the model."""
        if self._cache is not None:
            return self._cache
        where = Path(self.adapter_dir)
        cfg_file, w_file = where / CONFIG_FILE, where / WEIGHTS_FILE
        if not where.is_dir():
            raise AdapterError(f"{self.who}: adapter directory {where} does not exist")
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise AdapterError(
                    f"{self.who}: {where} has no {f.name}; a PEFT LoRA adapter directory holds "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE} (save it with peft_model.save_pretrained)"
                )
        config = read_json_object(cfg_file, AdapterError, "adapter config", fix="re-save the adapter with peft")
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise AdapterError(f"{self.who}: {cfg_file} is a {config.get('peft_type')} adapter; only LoRA merges")
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise AdapterError(
                    f"{self.who}: the adapter uses {what} ({key}={config[key]!r}), which MergeLora "
                    "does not merge; merge it with peft's merge_and_unload instead"
                )
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise AdapterError(f"{self.who}: {cfg_file} has no valid {key!r} (got {config.get(key)!r})")
        for key in ("rank_pattern", "alpha_pattern"):
            pats = config.get(key) or {}
            if not isinstance(pats, dict) or not all(
                isinstance(k, str)
                and _is_regex(k)
                and not isinstance(v, bool)
                and isinstance(v, (int, float))
                and v > 0
                for k, v in pats.items()
            ):
                raise AdapterError(f"{self.who}: {cfg_file}: {key} must map module name patterns to positive numbers")
        digest = _sha256(w_file)
        if self.adapter_sha256 is not None and digest != self.adapter_sha256:
            raise AdapterError(
                f"{self.who}: {w_file} has sha256 {digest[:12]}…, the plan recorded "
                f"{self.adapter_sha256[:12]}…; the adapter changed since the plan was written"
            )
        self.adapter_sha256 = digest
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(w_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{self.who}: cannot read {w_file}: {str(exc).splitlines()[0]}") from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is None:
                kind = "embedding LoRA" if "lora_embedding" in key else "a tensor that is no LoRA matrix"
                raise AdapterError(
                    f"{self.who}: {w_file.name} holds {key!r} ({kind}); MergeLora merges lora_A/lora_B "
                    "of linear layers only"
                )
            pairs.setdefault(m["module"], {})[m["ab"]] = t
        if not pairs:
            raise AdapterError(f"{self.who}: {w_file} holds no LoRA matrices")
        r0, alpha0, rs = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
        out = []
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{self.who}: {module} has lora_{''.join(ab)} but not its partner matrix")
            a, b = ab["A"].float(), ab["B"].float()
            r = _pattern_value(config.get("rank_pattern"), module, r0)
            alpha = _pattern_value(config.get("alpha_pattern"), module, alpha0)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise AdapterError(
                    f"{self.who}: rank mismatch at {module}: lora_A {tuple(a.shape)}, lora_B "
                    f"{tuple(b.shape)}, but the adapter config says r={r}"
                )
            for name, t in (("lora_A", a), ("lora_B", b)):
                if not torch.isfinite(t).all():
                    raise AdapterError(f"{self.who}: {module}.{name} holds NaN or inf")
            scaling = alpha / math.sqrt(r) if rs else alpha / r
            out.append(_Pair(module, a, b, float(scaling)))
        self._cache = (config, out)
        return self._cache

    # -- model checks -------------------------------------------------------------------
    def validate(self, model: HookedLlama) -> None:
        config, pairs = self.read()
        base = config.get("base_model_name_or_path")
        source = getattr(model, "source", None)
        if not self.allow_base_mismatch and base and source and _model_key(base) != _model_key(source):
            raise AdapterError(
                f"{self.who}: the adapter was trained on {base!r} but the model is {source!r}; "
                "pass allow_base_mismatch=True if they are the same weights"
            )
        for p in pairs:
            linear = self._linear(model, p.module)
            want = tuple(linear.weight.shape)
            got = (p.b.shape[0], p.a.shape[1])
            if got != want:
                raise AdapterError(
                    f"{self.who}: adapter for another base model: {p.module} lora_B@lora_A is {got} "
                    f"but the model's weight is {want}; {_use_its_base(base)}"
                )

    def _linear(self, model: HookedLlama, module: str):
        m = _LINEAR.match(module)
        if m is None:
            raise AdapterError(
                f"{self.who}: the adapter targets {module!r}, which is not a linear layer of a "
                "LlamaForCausalLM (q/k/v/o_proj, gate/up/down_proj, lm_head)"
            )
        if m["layer"] is None:
            return model.lm_head
        layer, part, proj = int(m["layer"]), m["part"], m["proj"]
        if layer >= model.n_layers:
            raise AdapterError(
                f"{self.who}: adapter for another base model: it targets {module} but the model has "
                f"{model.n_layers} layers (0..{model.n_layers - 1}); "
                f"{_use_its_base(self.read()[0].get('base_model_name_or_path'))}"
            )
        if proj not in (_ATTN if part == "self_attn" else _MLP):
            raise AdapterError(
                f"{self.who}: the adapter targets {module!r}, which is not a linear layer of a LlamaForCausalLM"
            )
        return getattr(getattr(model.model.layers[layer], part), proj)

    # -- edit -------------------------------------------------------------------------
    def _apply(self, model: HookedLlama) -> None:
        _, pairs = self.read()
        if any(p.module == "lm_head" for p in pairs):
            _state.untie_embeddings(model)
        for p in pairs:
            w = _state.writable(model, self._linear(model, p.module).weight)
            delta = (p.b.double() @ p.a.double()) * (self.scale * p.scaling)
            w.copy_((w.double() + delta.to(w.device)).to(w.dtype))

    def _hooks(self, model: HookedLlama) -> HookList:
        """Run-time LoRA: capture each target's input where a hook sees it, add the delta at its output.

        q/k/v read ``ln1`` output (``ln1.weight * ln1.hook_normalized``) and write ``attn.hook_q/k/v``;
        o_proj reads ``attn.hook_z`` and writes ``hook_attn_out``; gate/up read ``ln2`` output and write
        ``mlp.hook_pre`` / ``mlp.hook_pre_linear``; down reads ``mlp.hook_post`` and writes
        ``hook_mlp_out``; lm_head reads ``ln_final`` output and writes ``hook_logits``.
        """
        _, pairs = self.read()
        hooks: HookList = []
        stash: dict[str, torch.Tensor] = {}

        def capture(key: str, weight: torch.Tensor | None):
            def fn(t: torch.Tensor, hook) -> None:
                x = t.flatten(-2) if key.endswith(".z") else t
                stash[key] = x if weight is None else weight.to(device=t.device, dtype=t.dtype) * x

            return fn

        def add(key: str, a: torch.Tensor, b: torch.Tensor, s: float):
            def fn(t: torch.Tensor, hook) -> torch.Tensor:
                x = stash[key]
                delta = ((x @ a.to(x.device, x.dtype).T) @ b.to(x.device, x.dtype).T) * s  # [B, P, out]
                return t + delta.view(t.shape).to(t.dtype)

            return fn

        captured: set[str] = set()
        for p in pairs:
            s = self.scale * p.scaling
            m = _LINEAR.match(p.module)
            if m["layer"] is None:  # lm_head
                key, src, weight, dst = "final", "ln_final.hook_normalized", model.model.norm.weight, "hook_logits"
            else:
                i, proj, layer = int(m["layer"]), m["proj"], model.model.layers[int(m["layer"])]
                if proj in ("q_proj", "k_proj", "v_proj"):
                    key, src, weight = f"{i}.ln1", f"blocks.{i}.ln1.hook_normalized", layer.input_layernorm.weight
                    dst = f"blocks.{i}.attn.hook_{proj[0]}"
                elif proj == "o_proj":
                    key, src, weight, dst = f"{i}.z", f"blocks.{i}.attn.hook_z", None, f"blocks.{i}.hook_attn_out"
                elif proj in ("gate_proj", "up_proj"):
                    key, src, weight = (
                        f"{i}.ln2",
                        f"blocks.{i}.ln2.hook_normalized",
                        layer.post_attention_layernorm.weight,
                    )
                    dst = f"blocks.{i}.mlp.hook_pre" if proj == "gate_proj" else f"blocks.{i}.mlp.hook_pre_linear"
                else:  # down_proj
                    key, src, weight, dst = f"{i}.post", f"blocks.{i}.mlp.hook_post", None, f"blocks.{i}.hook_mlp_out"
            if key not in captured:
                captured.add(key)
                w = None if weight is None else weight.detach().clone()
                hooks.insert(0, (src, capture(key, w)))
            hooks.append((dst, add(key, p.a.clone(), p.b.clone(), s)))
        return hooks

    def to_dict(self) -> dict[str, Any]:
        return {
            "edit": self.kind,
            "adapter_dir": self.adapter_dir,
            "scale": self.scale,
            "allow_base_mismatch": self.allow_base_mismatch,
            "adapter_sha256": self.adapter_sha256,
        }


def _sample_adapter() -> dict[str, bytes]:
    """A valid rank-1 adapter of one q_proj (for the loader registry's fuzz test)."""
    from safetensors.torch import save

    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 1),
    }
    config = b'{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}'
    return {CONFIG_FILE: config, WEIGHTS_FILE: save(weights)}


register_loader(
    "lora adapter", lambda path: MergeLora(str(path)).read(), kind="dir", files=(CONFIG_FILE,), sample=_sample_adapter
)
