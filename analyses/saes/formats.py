"""Reading and writing SAEs on local disk: SAELens, sparsify and dictionary_learning layouts.

No hub access and no pickle: safetensors files are read as tensors, ``ae.pt`` with
``torch.load(weights_only=True)``.

- **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` (optionally ``sparsity.safetensors``).
  ``architecture`` standard / gated / jumprelu / topk / batchtopk (batchtopk runs as topk with its
  ``k`` unless a ``threshold`` tensor is present, then as jumprelu, as SAELens's inference class does).
  ``hook_name`` is a TransformerLens name, which is ours.
- **sparsify**: ``cfg.json`` + ``sae.safetensors`` (``encoder.weight`` [d_sae, d_in], ``encoder.bias``,
  ``W_dec`` [d_sae, d_out], ``b_dec``, optional ``W_skip``), one directory per hook point named as
  the Hugging Face module (``layers.6`` → ``blocks.6.hook_resid_post``; ``layers.6.mlp`` → a
  transcoder reading the MLP input and writing ``blocks.6.hook_mlp_out``).
- **dictionary_learning**: ``ae.pt`` (state dict) + ``config.json`` (``trainer.dict_class``
  AutoEncoder / AutoEncoderTopK / JumpReluAutoEncoder / GatedAutoEncoder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from _core.readers import Fields, read_json_object, register_loader
from _core.writer import write_dir
from hooks import HookError, InputError, LoadError
from hooks.loading import check_weights

from .sae import DTYPES, NORMALIZATIONS, SAE, SAEConfig

if TYPE_CHECKING:
    from hooks.model import HookedLlama

SAELENS_WEIGHTS = "sae_weights.safetensors"
_FIX = "fix the SAE's config or re-save the SAE"


def load_sae(
    path: str | os.PathLike,
    model: HookedLlama | None = None,
    *,
    hook_name: str | None = None,
    device=None,
    dtype: torch.dtype | None = None,
) -> SAE:
    """Load an SAE or transcoder from a local directory in any supported layout.

    ``model`` (a ``HookedLlama``) checks the hook name and ``d_in`` against the model; ``hook_name``
    overrides the hook point the files name (needed when they name none).

    Example: ``sae = load_sae("saes/blocks.6.hook_resid_post", model)``.
    """
    root = Path(path)
    if not root.is_dir():
        raise LoadError(f"SAE directory {root} does not exist; pass a local directory holding the SAE's files")
    if (root / "cfg.json").is_file() and (root / SAELENS_WEIGHTS).is_file():
        sae = _load_saelens(root)
    elif (root / "cfg.json").is_file() and (root / "sae.safetensors").is_file():
        sae = _load_sparsify(root, model)
    elif (root / "ae.pt").is_file():
        sae = _load_dictionary_learning(root)
    else:
        files = ", ".join(sorted(p.name for p in root.iterdir())[:6]) or "nothing"
        raise LoadError(
            f"{root} holds no SAE in a known layout (found {files}); expected cfg.json + "
            f"{SAELENS_WEIGHTS} (SAELens), cfg.json + sae.safetensors (sparsify) or ae.pt + config.json "
            "(dictionary_learning)"
        )
    if hook_name is not None:
        sae.cfg.hook_name = hook_name
    if not sae.cfg.hook_name:
        raise LoadError(f"{root} does not say which hook point the SAE reads; pass hook_name=")
    if model is not None:
        check_fits(sae, model)
    if device is not None or dtype is not None:
        sae = sae.to(device=device, dtype=dtype)
        sae.cfg.dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    return sae


def check_fits(sae: SAE, model: HookedLlama) -> None:
    """Hook names exist in ``model`` and their widths are ``d_in`` / ``d_out``."""
    widths = _hook_widths(model)
    for name, width, what in (
        (sae.cfg.hook_name, sae.cfg.d_in, "d_in"),
        (sae.cfg.hook_name_out, sae.cfg.d_out, "d_out"),
    ):
        if name is None:
            continue
        if name not in widths:
            model.hook_registry.get(name)  # raises the usual unknown-hook-name error with close names
            raise HookError(
                f"the SAE reads {name}, which holds no per-token vector; use a residual, MLP or "
                "attention-output hook point"
            )
        if widths[name] != width:
            raise InputError(
                f"the SAE's {what} is {width} but {name} has width {widths[name]}; "
                "load it for a model of this size or pass the right hook_name="
            )


def _hook_widths(model: HookedLlama) -> dict[str, int]:
    """Width of the last axis of every [batch, pos, d] hook point (and z flattened to heads × d_head)."""
    out = {"hook_embed": model.d_model}
    for i in range(model.n_layers):
        for name in (
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_resid_post",
            "hook_attn_out",
            "hook_mlp_out",
            "ln1.hook_normalized",
            "ln2.hook_normalized",
        ):
            out[f"blocks.{i}.{name}"] = model.d_model
        for name in ("mlp.hook_pre", "mlp.hook_gate", "mlp.hook_pre_linear", "mlp.hook_post"):
            out[f"blocks.{i}.{name}"] = model.d_mlp
    out["ln_final.hook_normalized"] = model.d_model
    return out


# --------------------------------------------------------------------------- SAELens
def _config(path: Path) -> Fields:
    """The SAE config file ``path`` as typed fields (unique keys, size-capped, one-line errors)."""
    return Fields(read_json_object(path, LoadError, "SAE config", fix=_FIX), str(path), LoadError, _FIX)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise LoadError(
            f"{path} is not a readable safetensors file ({_first(exc)}); re-download or re-save it"
        ) from exc
    check_weights(tensors, str(path))  # floating point and finite, as model loading checks
    return tensors


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _dims(t: dict, name: str, ndim: int, where: Path) -> torch.Tensor:
    """``t[name]``, a tensor of ``ndim`` dimensions; one-line ``LoadError`` otherwise."""
    if name not in t:
        raise LoadError(f"{where} has no {name!r}; it does not hold this kind of SAE")
    value = t[name]
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise LoadError(f"{where}: {name} has shape {shape}, not {ndim}-D; the file is corrupt or not an SAE")
    return value


def _dtype(f: Fields, default: str = "float32") -> str:
    value = f.str("dtype", default)
    name = value.removeprefix("torch.")
    if name not in DTYPES:
        raise f.bad("dtype", f"one of {', '.join(DTYPES)}")
    return name


def _hook(f: Fields, key: str) -> str | None:
    value = f.data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise f.bad(key, "a hook name (text)")
    return value


# SAELens architecture name -> (our architecture, transcoder, skip connection)
_SAELENS_ARCH = {
    "standard": ("standard", False, False),
    "gated": ("gated", False, False),
    "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False),
    "batchtopk": ("topk", False, False),
    "transcoder": ("standard", True, False),
    "skip_transcoder": ("standard", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}


def _load_saelens(root: Path) -> SAE:
    f = _config(root / "cfg.json")
    tensors = _read_safetensors(root / SAELENS_WEIGHTS)
    name = f.data.get("architecture")
    name = "standard" if name is None else name
    if name == "batchtopk" and "threshold" in tensors:  # saved after training: runs as jumprelu
        name = "jumprelu"
    if not isinstance(name, str) or name not in _SAELENS_ARCH:
        raise LoadError(
            f"{root / 'cfg.json'}: SAELens architecture {name!r} is not supported; supported: "
            f"{', '.join(_SAELENS_ARCH)}"
        )
    arch, transcoder, skip = _SAELENS_ARCH[name]
    d_in, d_sae = f.int("d_in", minimum=1), f.int("d_sae", minimum=1)
    meta = f.mapping("metadata")
    if meta.data.get("hook_head_index") is not None or f.data.get("hook_head_index") is not None:
        raise LoadError(f"{root / 'cfg.json'}: an SAE of one attention head (hook_head_index) is not supported")
    f.str("reshape_activations", "none", choices=("none",))
    hook_name = _module_to_hook(_hook(f, "hook_name") or _hook(meta, "hook_name"), output=not transcoder)
    hook_name_out = _module_to_hook(_hook(f, "hook_name_out") or _hook(meta, "hook_name_out")) if transcoder else None
    if transcoder and not hook_name_out:
        raise LoadError(f"{root / 'cfg.json'} is a transcoder without hook_name_out; add it to the config's metadata")
    info = {}
    for key, check in (("model_name", "str"), ("context_size", "int"), ("dataset_path", "str")):
        where = meta if meta.data.get(key) is not None else f
        info[key] = where.str(key, None) if check == "str" else where.int(key, None, minimum=1)
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook_name,
        hook_name_out=hook_name_out,
        d_out=f.int("d_out", None, minimum=1) if transcoder else None,
        k=f.int("k", minimum=1, maximum=d_sae) if arch == "topk" else None,
        apply_b_dec_to_input=f.bool("apply_b_dec_to_input", True) and not transcoder,
        normalize_activations=f.str("normalize_activations", "none", choices=NORMALIZATIONS),
        skip_connection=skip,
        rescale_acts_by_decoder_norm=f.bool("rescale_acts_by_decoder_norm", False),
        dtype=_dtype(f),
        source_format="saelens",
        metadata=info,
    )
    if arch == "topk":
        tensors.pop("threshold", None)  # batchtopk's training threshold is not used by a topk SAE
    return _build(cfg, tensors, root / SAELENS_WEIGHTS)


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: Path) -> SAE:
    sae = SAE(cfg)
    own = dict(sae.named_parameters())
    extra = set(tensors) - set(own)
    missing = set(own) - set(tensors)
    if missing or extra:
        raise LoadError(
            f"{where} does not fit a {cfg.architecture} SAE: missing {sorted(missing) or 'nothing'}, "
            f"unexpected {sorted(extra) or 'nothing'}"
        )
    with torch.no_grad():
        for name, p in own.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise LoadError(
                    f"{where}: {name} has shape {tuple(t.shape)} but d_in={cfg.d_in}, d_sae={cfg.d_sae} "
                    f"need {tuple(p.shape)}; the config does not match the weights"
                )
            p.copy_(t.to(p.dtype))
    return sae


WRITTEN_BY = {"written_by": "llama-scalpel"}  # safetensors metadata marking an SAE this toolkit wrote


def save_sae(sae: SAE, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sae`` in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``, with a
    ``scalpel_manifest.json``) through the staged writer. ``overwrite=True`` replaces only an empty
    directory or an output of llama-scalpel that is unchanged since. Non-finite weights are refused."""
    if not isinstance(sae, SAE):
        raise InputError(f"save_sae takes an SAE (from load_sae or train_sae), got {type(sae).__name__}", param="sae")
    if sae.input_scale is not None:
        raise InputError(
            "this SAE reads a norm output with its weight folded in at load time; it has no "
            "SAELens equivalent, save it in its own format"
        )
    cfg = saelens_cfg(sae)
    tensors = {n: p.detach().cpu() for n, p in sae.named_parameters()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise InputError(
                f"the SAE's {name} holds NaN or inf; an SAE is saved only with finite weights", param="sae"
            )
    with write_dir(path, kind="sae", overwrite=overwrite, param="path") as stage:
        stage.save_tensors(SAELENS_WEIGHTS, tensors, metadata=WRITTEN_BY)
        stage.write_json("cfg.json", cfg)
    return Path(path)


def saelens_cfg(sae: SAE) -> dict:
    """The ``cfg.json`` SAELens 6 writes for this SAE."""
    c = sae.cfg
    name = c.architecture
    if c.is_transcoder:
        name = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}.get(c.architecture)
        if name is None:
            raise InputError(f"SAELens has no {c.architecture} transcoder; save it in its own format")
        name = name.replace("transcoder", "skip_transcoder") if c.skip_connection else name
    elif c.skip_connection:
        raise InputError("SAELens has no SAE with a skip connection (only skip transcoders); save it in its own format")
    out = {
        "architecture": name,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "hook_name": c.hook_name,
            "model_name": c.metadata.get("model_name"),
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": c.metadata.get("context_size"),
            "dataset_path": c.metadata.get("dataset_path"),
            "sae_lens_training_version": None,
        },
    }
    if c.architecture == "topk":
        out["k"], out["rescale_acts_by_decoder_norm"] = c.k, c.rescale_acts_by_decoder_norm
    if c.is_transcoder:
        out["d_out"] = c.d_out
        out["metadata"]["hook_name_out"] = c.hook_name_out
    return out


# --------------------------------------------------------------------------- sparsify
def _sparsify_hooks(name: str) -> tuple[str | None, str | None, bool]:
    """(read hook, write hook, reads the MLP input) for a sparsify hook point directory name."""
    name = re.sub(r"^(model\.|base_model\.|gpt_neox\.|transformer\.)+", "", name)
    m = re.fullmatch(r"(?:layers|h)\.(\d+)(\.(mlp|self_attn))?", name)
    if name in ("embed_tokens", "embed"):
        return "hook_embed", None, False
    if not m:
        return None, None, False
    i, part = m.group(1), m.group(3)
    if part is None:
        return f"blocks.{i}.hook_resid_post", None, False
    if part == "mlp":
        return f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out", True
    return None, f"blocks.{i}.hook_attn_out", False


def _module_to_hook(name: str | None, output: bool = True) -> str | None:
    """Our hook name for a Hugging Face module path (``model.layers.6`` → ``blocks.6.hook_resid_post``,
    ``model.layers.6.mlp`` → ``blocks.6.hook_mlp_out``, or its input when ``output`` is False);
    TransformerLens names pass through."""
    if not name or name.startswith(("blocks.", "hook_", "ln_final.")):
        return name
    read, write, _ = _sparsify_hooks(name)
    mapped = (write or read) if output else (read or write)
    return mapped or name


def _load_sparsify(root: Path, model: HookedLlama) -> SAE:
    f = _config(root / "cfg.json")
    where = root / "sae.safetensors"
    t = _read_safetensors(where)
    enc, enc_b = _dims(t, "encoder.weight", 2, where), _dims(t, "encoder.bias", 1, where)
    w_dec, b_dec = _dims(t, "W_dec", 2, where), _dims(t, "b_dec", 1, where)
    if f.str("activation", "topk") != "topk":
        raise LoadError(f"{root}: sparsify activation {f.data.get('activation')!r} is not supported; only topk is")
    d_sae, d_in = enc.shape
    d_out = w_dec.shape[1]
    k = f.int("k", minimum=1, maximum=int(d_sae))
    transcode = f.bool("transcode", False)
    for key, want in (("d_in", int(d_in)), ("num_latents", int(d_sae))):
        given = f.int(key, None, minimum=0)
        if given not in (None, 0, want):
            raise LoadError(f"{root / 'cfg.json'}: {key} is {given} but {where.name} holds {want}; {_FIX}")
    if f.bool("skip_connection", "W_skip" in t) != ("W_skip" in t):
        raise LoadError(f"{root / 'cfg.json'}: skip_connection disagrees with {where.name} (W_skip); {_FIX}")
    f.bool("multi_topk", False)
    f.bool("normalize_decoder", True)
    read, write, reads_mlp_input = _sparsify_hooks(root.name)
    if not transcode:  # an SAE reads the module's output
        hook_name, hook_name_out = (write or read), None
    else:
        hook_name, hook_name_out = read, write
    cfg = SAEConfig(
        architecture="topk",
        d_in=int(d_in),
        d_sae=int(d_sae),
        d_out=int(d_out),
        k=k,
        hook_name=hook_name,
        hook_name_out=hook_name_out,
        apply_b_dec_to_input=not transcode,
        skip_connection="W_skip" in t,
        source_format="sparsify",
        dtype=str(enc.dtype).removeprefix("torch."),
    )
    tensors = {"W_enc": enc.T, "b_enc": enc_b, "W_dec": w_dec, "b_dec": b_dec}
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    sae = _build(cfg, tensors, root / "sae.safetensors")
    if transcode and reads_mlp_input:
        # sparsify reads the MLP's input, the post-attention RMSNorm's output *with* its weight;
        # our hook point is before the weight, so the SAE multiplies it in (bit-identical maths).
        if model is None:
            raise LoadError(f"{root} is a transcoder reading the MLP input; pass the model: load_sae(path, model)")
        layer = int(re.search(r"\d+", hook_name).group())
        sae.input_scale = model.model.layers[layer].post_attention_layernorm.weight.detach().clone()
    return sae


def save_sparsify(sae: SAE, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a TopK MLP transcoder (reading ``blocks.{i}.ln2.hook_normalized`` times the norm weight, as
    ``load_sae`` gives sparsify's ``layers.{i}.mlp``) in sparsify's layout: ``path/layers.{i}.mlp/`` with
    ``cfg.json`` + ``sae.safetensors``, through the staged writer. Returns the hook point's directory,
    which ``load_sae(dir, model)`` reads back bit-identically. SAELens has no TopK transcoder."""
    c = sae.cfg
    m = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", c.hook_name or "")
    if (
        c.architecture != "topk"
        or m is None
        or c.hook_name_out != f"blocks.{m.group(1)}.hook_mlp_out"
        or sae.input_scale is None
    ):
        raise InputError(
            "sparsify's layout holds TopK MLP transcoders reading the MLP input with its norm weight; "
            "save this SAE with save_sae",
            param="sae",
        )
    sub = f"layers.{m.group(1)}.mlp"
    tensors = {
        "encoder.weight": sae.W_enc.detach().T,
        "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if c.skip_connection:
        tensors["W_skip"] = sae.W_skip.detach()
    tensors = {n: t.cpu().contiguous() for n, t in tensors.items()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise InputError(
                f"the SAE's {name} holds NaN or inf; an SAE is saved only with finite weights", param="sae"
            )
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.d_sae // c.d_in),
        "normalize_decoder": True,
        "num_latents": c.d_sae,
        "k": c.k,
        "multi_topk": False,
        "skip_connection": c.skip_connection,
        "transcode": True,
        "d_in": c.d_in,
    }
    with write_dir(path, kind="sae", overwrite=overwrite, param="path") as stage:
        stage.save_tensors(f"{sub}/sae.safetensors", tensors, metadata=WRITTEN_BY)
        stage.write_json(f"{sub}/cfg.json", cfg)
    return Path(path) / sub


# --------------------------------------------------------------------------- dictionary_learning
_DL_SUBMODULE = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


# dictionary_learning class -> (our architecture, {our tensor: (its key, transposed)})
_DL_CLASSES = {
    "AutoEncoder": (
        "standard",
        {
            "W_enc": ("encoder.weight", True),
            "b_enc": ("encoder.bias", False),
            "W_dec": ("decoder.weight", True),
            "b_dec": ("bias", False),
        },
    ),
    "AutoEncoderTopK": (
        "topk",
        {
            "W_enc": ("encoder.weight", True),
            "b_enc": ("encoder.bias", False),
            "W_dec": ("decoder.weight", True),
            "b_dec": ("b_dec", False),
        },
    ),
    "JumpReluAutoEncoder": (
        "jumprelu",
        {
            "W_enc": ("W_enc", False),
            "b_enc": ("b_enc", False),
            "W_dec": ("W_dec", False),
            "b_dec": ("b_dec", False),
            "threshold": ("threshold", False),
        },
    ),
    "GatedAutoEncoder": (
        "gated",
        {
            "W_enc": ("encoder.weight", True),
            "b_gate": ("gate_bias", False),
            "r_mag": ("r_mag", False),
            "b_mag": ("mag_bias", False),
            "W_dec": ("decoder.weight", True),
            "b_dec": ("decoder_bias", False),
        },
    ),
}


def _load_dictionary_learning(root: Path) -> SAE:
    where = root / "ae.pt"
    try:
        state = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads refused by weights_only, truncated files …
        raise LoadError(
            f"{where} cannot be read as plain tensors ({exc.__class__.__name__}); "
            "it must be a state dict saved with torch.save(ae.state_dict())"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise LoadError(f"{where} holds no state dict; it must be saved with torch.save(ae.state_dict())")
    check_weights({k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k != "k"}, str(where))
    conf = _config(root / "config.json") if (root / "config.json").is_file() else Fields({}, str(root / "config.json"))
    trainer = conf.mapping("trainer") if "trainer" in conf.data else conf
    cls = trainer.str("dict_class", None)
    if cls is None:
        cls = (
            "AutoEncoderTopK"
            if "k" in state
            else "JumpReluAutoEncoder"
            if "threshold" in state
            else "GatedAutoEncoder"
            if "r_mag" in state
            else "AutoEncoder"
        )
    if cls not in _DL_CLASSES:
        raise LoadError(
            f"{root / 'config.json'}: dictionary_learning class {cls!r} is not supported; supported: "
            f"{', '.join(_DL_CLASSES)}"
        )
    arch, keys = _DL_CLASSES[cls]
    tensors = {}
    for ours, (theirs, transposed) in keys.items():
        ndim = 2 if ours in ("W_enc", "W_dec") else 1
        t = _dims(state, theirs, ndim, where)
        tensors[ours] = t.T if transposed else t
    d_in, d_sae = tensors["W_enc"].shape
    k = None
    if arch == "topk":
        if "k" in state:
            value = state["k"]
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = int(value.item())
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= d_sae:
                raise LoadError(f"{where}: k is {value!r}, not an integer in 1..{d_sae}; the file is corrupt")
            k = value
        else:
            k = trainer.int("k", minimum=1, maximum=int(d_sae))
    cfg = SAEConfig(
        arch,
        int(d_in),
        int(d_sae),
        _dl_hook(trainer),
        k=k,
        apply_b_dec_to_input=arch != "jumprelu",
        source_format="dictionary_learning",
    )
    return _build(cfg, tensors, where)


def _dl_hook(trainer: Fields) -> str | None:
    layer = trainer.int("layer", None, minimum=0)
    sub = trainer.str("submodule_name", None) or ""
    m = re.match(r"(resid|mlp|attn)\w*?_?(\d+)?$", sub.replace("resid_post_layer_", "resid_"))
    if layer is None and m and m.group(2):
        layer = int(m.group(2))
    kind = m.group(1) if m else ("resid" if layer is not None else None)
    if layer is None or kind is None:
        return None
    return f"blocks.{int(layer)}.{_DL_SUBMODULE[kind]}"


def _sample_sae() -> dict[str, bytes]:
    """A valid SAELens-layout SAE (d_in 8, d_sae 16) for the loader registry's fuzz test."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    weights = {
        "W_enc": torch.randn(8, 16, generator=g),
        "W_dec": torch.randn(16, 8, generator=g),
        "b_enc": torch.zeros(16),
        "b_dec": torch.zeros(8),
    }
    cfg = b'{"architecture": "standard", "d_in": 8, "d_sae": 16, "dtype": "float32", "metadata": {"hook_name": "blocks.0.hook_resid_post"}}'
    return {"cfg.json": cfg, SAELENS_WEIGHTS: save(weights)}


register_loader("sae", load_sae, kind="dir", files=("cfg.json",), sample=_sample_sae)
