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

import json
import os
import re
from pathlib import Path

import torch

from hooks import HookError, InputError, LoadError

from .sae import SAE, SAEConfig

SAELENS_WEIGHTS = "sae_weights.safetensors"


def load_sae(
    path: str | os.PathLike, model=None, *, hook_name: str | None = None, device=None, dtype: torch.dtype | None = None
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


def check_fits(sae: SAE, model) -> None:
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


def _hook_widths(model) -> dict[str, int]:
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
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path} is not valid JSON ({exc.__class__.__name__}); re-save the SAE's config") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path} does not hold a JSON object; re-save the SAE's config")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise LoadError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save it") from exc


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
    c = _read_json(root / "cfg.json")
    tensors = _read_safetensors(root / SAELENS_WEIGHTS)
    name = c.get("architecture", "standard")
    if name == "batchtopk" and "threshold" in tensors:  # saved after training: runs as jumprelu
        name = "jumprelu"
    if name not in _SAELENS_ARCH:
        raise LoadError(
            f"{root / 'cfg.json'}: SAELens architecture {name!r} is not supported; supported: "
            f"{', '.join(_SAELENS_ARCH)}"
        )
    arch, transcoder, skip = _SAELENS_ARCH[name]
    for key in ("d_in", "d_sae"):
        if key not in c:
            raise LoadError(f"{root / 'cfg.json'} has no {key!r}; it is not a SAELens config")
    meta = c.get("metadata") or {}
    hook_name = _module_to_hook(c.get("hook_name") or meta.get("hook_name"), output=not transcoder)
    hook_name_out = _module_to_hook(c.get("hook_name_out") or meta.get("hook_name_out")) if transcoder else None
    if transcoder and not hook_name_out:
        raise LoadError(f"{root / 'cfg.json'} is a transcoder without hook_name_out; add it to the config's metadata")
    k = c.get("k")
    cfg = SAEConfig(
        architecture=arch,
        d_in=int(c["d_in"]),
        d_sae=int(c["d_sae"]),
        hook_name=hook_name,
        hook_name_out=hook_name_out,
        d_out=c.get("d_out") if transcoder else None,
        k=int(k) if k is not None and arch == "topk" else None,
        apply_b_dec_to_input=bool(c.get("apply_b_dec_to_input", True)) and not transcoder,
        normalize_activations=c.get("normalize_activations") or "none",
        skip_connection=skip,
        rescale_acts_by_decoder_norm=bool(c.get("rescale_acts_by_decoder_norm", False)),
        dtype=str(c.get("dtype", "float32")).removeprefix("torch."),
        source_format="saelens",
        metadata={key: meta.get(key, c.get(key)) for key in ("model_name", "context_size", "dataset_path")},
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
_OUR_FILES = {"cfg.json", SAELENS_WEIGHTS, "checkpoint.pt"}


def replace_refusal(target: Path) -> str | None:
    """Why ``target`` may not be replaced (``None``: it may): only an empty directory, or one holding
    nothing but an SAE this toolkit wrote (its weights carry ``WRITTEN_BY``) and/or a training
    checkpoint of ``train_sae``, is ever replaced."""
    from safetensors import safe_open

    if target.is_symlink() or not target.is_dir():
        return f"{target} is not a directory llama-scalpel wrote"
    names = {p.name for p in target.iterdir()}
    others = sorted(names - _OUR_FILES)
    if others:
        return f"{target} holds files llama-scalpel did not write ({', '.join(others[:3])})"
    if SAELENS_WEIGHTS in names:
        try:
            with safe_open(str(target / SAELENS_WEIGHTS), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - unreadable weights are not ours
            meta = {}
        if meta.get("written_by") != WRITTEN_BY["written_by"]:
            return f"{target / SAELENS_WEIGHTS} was not written by llama-scalpel"
    if "checkpoint.pt" in names:
        try:
            state = torch.load(target / "checkpoint.pt", map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            state = None
        if not (isinstance(state, dict) and {"sae", "opt", "step", "config"} <= set(state)):
            return f"{target / 'checkpoint.pt'} is not a train_sae checkpoint"
    return None


def replace_dir(new: Path, target: Path) -> None:
    """Move the directory ``new`` to ``target``; an existing ``target`` must pass ``replace_refusal``
    (checked by the caller) and is moved aside first, then removed, so nothing else is ever deleted."""
    import shutil
    import tempfile

    old = None
    if target.exists():
        why = replace_refusal(target)
        if why:
            raise InputError(f"{why}; it is not replaced: choose another path")
        old = Path(tempfile.mkdtemp(prefix=".scalpel-old-", dir=target.parent))
        os.rename(target, old / "old")
    if target.exists():  # appeared while we worked: never replace it
        raise InputError(f"{target} appeared while this was written; nothing was replaced, choose another path")
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_sae(sae: SAE, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sae`` in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``), atomically.
    ``overwrite=True`` replaces only an empty directory or an SAE this toolkit wrote."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists; pass overwrite=True or choose another path")
    if target.exists() and (why := replace_refusal(target)):
        raise InputError(
            f"{why}; overwrite=True replaces only an SAE llama-scalpel wrote or an empty directory: choose another path"
        )
    if sae.input_scale is not None:
        raise InputError(
            "this SAE reads a norm output with its weight folded in at load time; it has no "
            "SAELens equivalent, save it in its own format"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".scalpel-tmp-", dir=target.parent))
    try:
        tensors = {n: p.detach().contiguous().cpu() for n, p in sae.named_parameters()}
        save_file(tensors, str(tmp / SAELENS_WEIGHTS), metadata=WRITTEN_BY)
        (tmp / "cfg.json").write_text(json.dumps(saelens_cfg(sae), indent=1))
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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


def _load_sparsify(root: Path, model) -> SAE:
    c = _read_json(root / "cfg.json")
    t = _read_safetensors(root / "sae.safetensors")
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in t:
            raise LoadError(f"{root / 'sae.safetensors'} has no {key!r}; it is not a sparsify SAE")
    if c.get("activation", "topk") != "topk":
        raise LoadError(f"{root}: sparsify activation {c.get('activation')!r} is not supported; only topk is")
    d_sae, d_in = t["encoder.weight"].shape
    d_out = t["W_dec"].shape[1]
    transcode = bool(c.get("transcode", False))
    read, write, reads_mlp_input = _sparsify_hooks(root.name)
    if not transcode:  # an SAE reads the module's output
        hook_name, hook_name_out = (write or read), None
    else:
        hook_name, hook_name_out = read, write
        if write is None:
            hook_name_out = None
    cfg = SAEConfig(
        architecture="topk",
        d_in=int(d_in),
        d_sae=int(d_sae),
        d_out=int(d_out),
        k=int(c["k"]),
        hook_name=hook_name,
        hook_name_out=hook_name_out,
        apply_b_dec_to_input=not transcode,
        skip_connection="W_skip" in t,
        source_format="sparsify",
        dtype=str(t["encoder.weight"].dtype).removeprefix("torch."),
    )
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
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


# --------------------------------------------------------------------------- dictionary_learning
_DL_SUBMODULE = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def _load_dictionary_learning(root: Path) -> SAE:
    try:
        state = torch.load(root / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads refused by weights_only, truncated files …
        raise LoadError(
            f"{root / 'ae.pt'} cannot be read as plain tensors ({exc.__class__.__name__}); "
            "it must be a state dict saved with torch.save(ae.state_dict())"
        ) from exc
    if not isinstance(state, dict):
        raise LoadError(f"{root / 'ae.pt'} holds no state dict; it must be saved with torch.save(ae.state_dict())")
    conf = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
    trainer = conf.get("trainer", conf)
    cls = trainer.get("dict_class")
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
    hook_name = _dl_hook(trainer)
    if cls == "AutoEncoder":
        d_sae, d_in = state["encoder.weight"].shape
        cfg = SAEConfig("standard", int(d_in), int(d_sae), hook_name, source_format="dictionary_learning")
        tensors = {
            "W_enc": state["encoder.weight"].T,
            "b_enc": state["encoder.bias"],
            "W_dec": state["decoder.weight"].T,
            "b_dec": state["bias"],
        }
    elif cls == "AutoEncoderTopK":
        d_sae, d_in = state["encoder.weight"].shape
        k = int(state["k"]) if "k" in state else int(trainer["k"])
        cfg = SAEConfig("topk", int(d_in), int(d_sae), hook_name, k=k, source_format="dictionary_learning")
        tensors = {
            "W_enc": state["encoder.weight"].T,
            "b_enc": state["encoder.bias"],
            "W_dec": state["decoder.weight"].T,
            "b_dec": state["b_dec"],
        }
    elif cls == "JumpReluAutoEncoder":
        d_in, d_sae = state["W_enc"].shape
        cfg = SAEConfig(
            "jumprelu",
            int(d_in),
            int(d_sae),
            hook_name,
            apply_b_dec_to_input=False,
            source_format="dictionary_learning",
        )
        tensors = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    elif cls == "GatedAutoEncoder":
        d_sae, d_in = state["encoder.weight"].shape
        cfg = SAEConfig("gated", int(d_in), int(d_sae), hook_name, source_format="dictionary_learning")
        tensors = {
            "W_enc": state["encoder.weight"].T,
            "b_gate": state["gate_bias"],
            "r_mag": state["r_mag"],
            "b_mag": state["mag_bias"],
            "W_dec": state["decoder.weight"].T,
            "b_dec": state["decoder_bias"],
        }
    else:
        raise LoadError(
            f"{root / 'config.json'}: dictionary_learning class {cls!r} is not supported; supported: "
            "AutoEncoder, AutoEncoderTopK, JumpReluAutoEncoder, GatedAutoEncoder"
        )
    return _build(cfg, tensors, root / "ae.pt")


def _dl_hook(trainer: dict) -> str | None:
    layer, sub = trainer.get("layer"), str(trainer.get("submodule_name") or "")
    m = re.match(r"(resid|mlp|attn)\w*?_?(\d+)?$", sub.replace("resid_post_layer_", "resid_"))
    if layer is None and m and m.group(2):
        layer = int(m.group(2))
    kind = m.group(1) if m else ("resid" if layer is not None else None)
    if layer is None or kind is None:
        return None
    return f"blocks.{int(layer)}.{_DL_SUBMODULE[kind]}"
