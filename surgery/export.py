"""Verified export: an edited ``HookedLlama`` as a plain Hugging Face directory of its own class
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``)
(or a GGUF file), reloaded with plain transformers and checked against the in-memory model.

``export(model, out_dir, edits=plan)`` applies ``plan`` to ``model`` for the export and restores
the model afterwards (so the unedited logits, the base hash and the edited weights all come from one
call); edits applied before the call are recorded too (``model.scalpel_history``).

Atomicity: everything is written into ``.scalpel-tmp-<name>-<pid>-<random>`` beside ``out_dir``,
reloaded and compared there, and only then renamed to ``out_dir`` (exclusively: an ``out_dir`` that
appeared meanwhile is never replaced). ``overwrite=True`` replaces only a previous export of
llama-scalpel or an empty directory (see ``_atomic``). A handled failure removes the
temporary directory; after a SIGKILL it may remain, and the next export to the same target removes
stale ones whose process is gone. ``out_dir`` is never half-written. A filesystem failure (read-only
directory, disk full) is an ``ExportWriteError`` naming the directory and the fix.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from hooks import config as hooks_config
from hooks.errors import ScalpelError
from hooks.loading import plain_config, sha256_file
from hooks.model import takes_model

from . import _state
from ._atomic import (
    MANIFEST,
    MANIFEST_FORMAT,
    OLD_PREFIX,
    TMP_PREFIX,
    _clean_stale,
    _fsync,
    _new_file_mode,
    _quiet_transformers,
    _writing,
    move_into_place,
    remove,
    replace_refusal,
)
from ._manifest import MANIFEST_VERSION, PROBE_LOGITS, first_line, read_manifest, seal
from .errors import ExportError, IntegrityError, ParityError
from .plan import EditPlan, as_plan

FP32_TOLERANCE = 1e-4
PROBE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "In 1969, the first person to walk on the Moon was",
)
N_RANDOM_PROBES, RANDOM_PROBE_LEN, RANDOM_PROBE_SEED = 3, 8, 0


# --------------------------------------------------------------------------- results
@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    out_dir: Path
    files: dict[str, str]  # file name -> sha256
    max_abs_logit_diff: float  # reloaded transformers model vs in-memory edited model, all probe positions
    tolerance: float
    kl_to_base: float | None  # mean over probes of KL(base ‖ edited) at the last position
    manifest: dict[str, Any] = field(repr=False)

    def __getitem__(self, key):
        return getattr(self, key)


@dataclass
class GGUFResult:
    path: Path
    dtype: str
    sha256: str
    max_abs_logit_diff: float  # transformers' GGUF loader vs the in-memory model with the file's rounding
    max_abs_logit_diff_unrounded: float  # … vs the in-memory model itself (f16 rounding shows here)
    tolerance: float
    probes: list = field(repr=False, default_factory=list)

    def __getitem__(self, key):
        return getattr(self, key)


# --------------------------------------------------------------------------- small helpers
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.I)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value) -> int:
    """``"2GB"`` → 2·10⁹ bytes (``GiB`` = 2³⁰), as transformers reads ``max_shard_size``; ints pass."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ExportError(f"max_shard_size {value!r} is not a size; use e.g. '2GB', '500MB' or a byte count")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise ExportError(f"max_shard_size {value!r} must be positive")
    return n


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "safetensors", "gguf", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        out["llama-scalpel"] = md.version("llama-scalpel")
    except md.PackageNotFoundError:
        out["llama-scalpel"] = "dev"
    return out


# --------------------------------------------------------------------------- probes
@dataclass
class Probe:
    text: str | None
    ids: torch.Tensor  # [1, P]


def probe_inputs(model, prompts: Sequence[str] | None = None) -> list[Probe]:
    """Fixed short prompts (with a tokenizer) or fixed random token ids (without one)."""
    if model.tokenizer is not None:
        texts = list(prompts) if prompts is not None else list(PROBE_PROMPTS)
        return [Probe(t, model.to_tokens(t).cpu()) for t in texts]
    if prompts is not None:
        raise ExportError("probe_prompts need a tokenizer and this model has none; leave probe_prompts unset")
    g = torch.Generator().manual_seed(RANDOM_PROBE_SEED)
    return [
        Probe(None, torch.randint(0, model.d_vocab, (1, RANDOM_PROBE_LEN), generator=g)) for _ in range(N_RANDOM_PROBES)
    ]


@torch.no_grad()
def _logits(model, probes: list[Probe]) -> list[torch.Tensor]:
    return [model(p.ids.to(model.device))[0].float().cpu() for p in probes]


@torch.no_grad()
def _hf_logits(hf, probes: list[Probe]) -> list[torch.Tensor]:
    device = next(hf.parameters()).device
    return [hf(p.ids.to(device)).logits[0].float().cpu() for p in probes]


def _kl(base: torch.Tensor, edited: torch.Tensor) -> float:
    """KL(base ‖ edited) at the last position, in nats."""
    p = base[-1].double().log_softmax(-1)
    q = edited[-1].double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _top5(logits: torch.Tensor, tokenizer) -> list[dict]:
    probs = logits[-1].double().softmax(-1)
    top = probs.topk(min(5, probs.shape[0]))
    out = []
    for pr, i in zip(top.values.tolist(), top.indices.tolist()):
        entry = {"id": i, "prob": float(f"{pr:.6g}")}
        if tokenizer is not None:
            entry["token"] = tokenizer.decode([i])
        out.append(entry)
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _tolerance(dtype: torch.dtype, logits: list[torch.Tensor]) -> float:
    if dtype == torch.float32:
        return FP32_TOLERANCE
    scale = max(float(x.abs().max()) for x in logits)
    return max(FP32_TOLERANCE, 8 * torch.finfo(dtype).eps * scale)


# --------------------------------------------------------------------------- what is written
def export_config(model):
    """The model's config as it must be saved: layer count, bias flags and tying from the weights;
    every other field kept (loader-only fields such as a GGUF quantization_config dropped)."""
    config = plain_config(model.config)
    layers = list(model.model.layers)
    config.num_hidden_layers = len(layers)
    for part, owner, names in (
        ("attention", "self_attn", _state.ATTENTION_BIAS_MODULES),
        ("mlp", "mlp", _state.MLP_BIAS_MODULES),
    ):
        flag = hooks_config.bias_flag(config, part)  # None: the family's class fixes its biases
        if flag is not None:
            setattr(config, flag, any(getattr(getattr(l, owner), n).bias is not None for l in layers for n in names))
    config.tie_word_embeddings = model.lm_head.weight is model.model.embed_tokens.weight
    config.architectures = [hooks_config.family_class_name(config)]
    config.dtype = model.dtype
    return config


def export_state(model, config) -> dict[str, torch.Tensor]:
    """CPU tensors under HF names; zero biases filled in where the config's class has them; tied lm_head
    dropped. A bias the class cannot carry is an ``ExportError`` (edits refuse to create one)."""
    state = {}
    for name, t in model.state_dict().items():
        state[name] = t.detach().to("cpu").contiguous()
    expected = {
        **hooks_config.attention_biases(config),
        **dict.fromkeys(_state.MLP_BIAS_MODULES, hooks_config.mlp_bias(config)),
    }
    for i, layer in enumerate(model.model.layers):
        for part, names in (("self_attn", _state.ATTENTION_BIAS_MODULES), ("mlp", _state.MLP_BIAS_MODULES)):
            for n in names:
                key = f"model.layers.{i}.{part}.{n}.bias"
                if key not in state and expected[n]:
                    w = state[f"model.layers.{i}.{part}.{n}.weight"]
                    state[key] = torch.zeros(w.shape[0], dtype=w.dtype)
                elif key in state and not expected[n]:
                    raise ExportError(
                        f"{key} cannot be saved: {hooks_config.family_class_name(config)} has no "
                        f"{n} bias; undo the edit that added it"
                    )
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # tensors sharing storage cannot go to safetensors: give each its own copy
    seen: set[int] = set()
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            state[name] = t.clone()
        elif ptr is not None:
            seen.add(ptr)
    return state


TEST_BARRIER_ENV = "SCALPEL_TEST_EXPORT_BARRIER"


def _test_barrier(what: str) -> None:
    """Test-only: when ``$SCALPEL_TEST_EXPORT_BARRIER`` names a file (a pipe), write ``what`` and a
    newline to it, then wait 60 s, so that a test can interrupt an export at a known point of the
    write (after its first shard) without watching the filesystem. Unset (always, outside tests):
    nothing happens."""
    path = os.environ.get(TEST_BARRIER_ENV)
    if not path:
        return
    import time

    with open(path, "w", encoding="utf-8") as barrier:
        barrier.write(what + "\n")
    time.sleep(60)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def write_shards(state: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> list[str]:
    """``model.safetensors`` when it fits in one shard, else ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (transformers' layout)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        _save_shard(shards[0], directory / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (shard_name, shard) in enumerate(zip(names, shards)):
        _save_shard(shard, directory / shard_name)
        weight_map.update({k: shard_name for k in shard})
        if i == 0:
            _test_barrier(f"wrote {shard_name} of {len(names)}")
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _source_dir(model) -> Path | None:
    source = getattr(model, "source", None)
    if source and Path(str(source)).is_dir():
        return Path(str(source))
    return None


def _write_generation_config(model, config, directory: Path) -> None:
    from transformers import GenerationConfig

    src = _source_dir(model)
    gen = None
    if src is not None and (src / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            gen = GenerationConfig.from_pretrained(src)
    if gen is None:
        gen = GenerationConfig.from_model_config(config)
    with _quiet_transformers():
        gen.save_pretrained(directory)


def _sha_dir(directory: Path, skip: Sequence[str] = ()) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


def _config_changes(before: dict, after: dict) -> dict[str, list]:
    ignore = {"transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype", "architectures"}
    keys = sorted((set(before) | set(after)) - ignore)
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}


def _reload_hf(directory: Path, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        hf, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        k, v = next(iter(bad.items()))
        v = sorted(map(str, v))
        raise ParityError(
            f"transformers reloaded the checkpoint with {len(v)} {k.replace('_', ' ')} "
            f"({', '.join(v[:3])}{', …' if len(v) > 3 else ''}); it is not a complete {type(hf).__name__}"
        )
    return hf.eval()


# --------------------------------------------------------------------------- export
@takes_model
def export(
    model,
    out_dir,
    *,
    edits=None,
    overwrite: bool = False,
    max_shard_size="2GB",
    probe_prompts: Sequence[str] | None = None,
    base_sha256: str | None = None,
    base_logits: Sequence[torch.Tensor] | None = None,
    provenance: dict | None = None,
) -> ExportResult:
    """Write ``model`` (with ``edits`` applied) as a verified Hugging Face checkpoint in ``out_dir``.

    ``edits``: an ``EditPlan``, a list of edits/records, one edit, or a plan file; applied to
    ``model`` for the export only (the model is restored after). Edits applied earlier by the caller
    are recorded from ``model.scalpel_history``; for those the unedited logits are unknown unless
    ``base_logits`` (one ``[P, V]`` tensor per probe) is given.

    Writes safetensors (sharded at ``max_shard_size``), config.json, generation_config.json,
    tokenizer files, ``scalpel_probe_logits.safetensors`` and ``scalpel_manifest.json``; reloads the
    directory with ``transformers.AutoModelForCausalLM`` and requires its logits on the probe
    prompts to match the in-memory edited model (≤ 1e-4 in fp32) before renaming it into place.
    Refuses an existing ``out_dir`` unless ``overwrite=True``. ``provenance`` (a JSON-ready dict, e.g.
    a search's prompt hashes, seed and chosen parameters) is stored in the manifest as is.
    """
    if provenance is not None:
        try:
            json.dumps(provenance, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"provenance must be a JSON-ready dict ({exc})") from None
    out_dir = _target(out_dir, "out_dir")
    out_abs = Path(os.path.abspath(out_dir))
    _check_target(out_abs, str(out_dir), overwrite, gguf=False)
    max_bytes = parse_size(max_shard_size)
    if any(p.is_meta for p in model.parameters()):
        raise ExportError("the model has weights on the meta device; load real weights before exporting")
    plan = as_plan(edits)
    probes = probe_inputs(model, probe_prompts)
    prior = list(getattr(model, "scalpel_history", []))

    base_config = plain_config(model.config).to_dict()
    if base_sha256 is None:
        base_sha256 = getattr(model, "source_sha256", None)
        base_hash_of = "source file" if base_sha256 else None
        if base_sha256 is None and not prior:
            base_sha256, base_hash_of = _state.state_sha256(model), "state dict tensors"
    else:
        base_hash_of = "given by the caller"
    if base_logits is None and not prior:
        base_logits = _logits(model, probes)
    elif base_logits is not None:
        base_logits = [torch.as_tensor(t).float().cpu() for t in base_logits]
        if len(base_logits) != len(probes) or any(
            b.shape != (p.ids.shape[1], model.d_vocab) for b, p in zip(base_logits, probes)
        ):
            raise ExportError(f"base_logits must hold one [positions, {model.d_vocab}] tensor per probe prompt")

    n_original = model.n_layers + sum(len(r.get("layers", ())) for r in prior if r.get("edit") == "RemoveLayers")
    with _state.journal(model):
        plan.apply(model, atomic=False)  # validates each edit first; raises before anything is written
        edited = _logits(model, probes)
        if not all(torch.isfinite(e).all() for e in edited):
            raise ExportError("the edited model gives NaN or inf logits on the probe prompts; nothing was written")
        config = export_config(model)
        state = export_state(model, config)
        dtype = model.dtype
        history = list(getattr(model, "scalpel_history", []))
        layer_map = _layer_map(prior, plan, n_original)
        tokenizer = model.tokenizer
        tmp = _write_verified(
            model,
            out_dir,
            config,
            state,
            dtype,
            probes,
            edited,
            max_bytes,
            lambda files, diff, tol: {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "base": {"source": getattr(model, "source", None), "sha256": base_sha256, "sha256_of": base_hash_of},
                "edits": history,
                "edits_applied_before_export": len(prior),
                "config_changes": _config_changes(base_config, config.to_dict()),
                "layer_map": layer_map,
                "provenance": provenance,
                "dtype": str(dtype).replace("torch.", ""),
                "files": files,
                "libraries": library_versions(),
                "probes": [
                    {
                        "text": p.text,
                        "input_ids": p.ids[0].tolist(),
                        "top5": _top5(e, tokenizer),
                        "base_top5": _top5(b, tokenizer) if base_logits is not None else None,
                        "kl_to_base": _kl(b, e) if base_logits is not None else None,
                    }
                    for p, e, b in zip(probes, edited, base_logits or [None] * len(probes))
                ],
                "kl_to_base": (
                    sum(_kl(b, e) for b, e in zip(base_logits, edited)) / len(probes)
                    if base_logits is not None
                    else None
                ),
                "verification": {
                    "reloaded_with": "transformers.AutoModelForCausalLM.from_pretrained",
                    "max_abs_logit_diff": diff,
                    "tolerance": tol,
                    "compared": "all probe positions",
                },
            },
        )
    try:
        with _writing(out_dir):
            move_into_place(tmp, out_abs, str(out_dir), overwrite=overwrite)
    except BaseException:
        remove(tmp)
        raise
    manifest = json.loads((out_abs / MANIFEST).read_text())
    return ExportResult(
        out_dir=out_dir,
        files=manifest["files"],
        max_abs_logit_diff=manifest["verification"]["max_abs_logit_diff"],
        tolerance=manifest["verification"]["tolerance"],
        kl_to_base=manifest["kl_to_base"],
        manifest=manifest,
    )


def _layer_map(prior: list[dict], plan: EditPlan, n_original: int) -> list[int] | None:
    """Original layer index of each exported layer, when layers were removed (None otherwise)."""
    layers = list(range(n_original))
    removed = False
    for record in prior + [e.to_dict() for e in plan]:
        if record.get("edit") == "RemoveLayers":
            gone = set(record["layers"])
            layers = [orig for i, orig in enumerate(layers) if i not in gone]
            removed = True
    return layers if removed else None


def _write_verified(model, out_dir: Path, config, state, dtype, probes, edited, max_bytes, make_manifest) -> Path:
    """Write everything into a fresh temp dir beside ``out_dir``, reload, compare; return the temp dir.

    Any failure removes the temp dir and re-raises; a filesystem failure as ``ExportWriteError``.
    """
    from safetensors.torch import save_file

    out_abs = Path(os.path.abspath(out_dir))
    parent = out_abs.parent
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with _writing(out_dir, needed):
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(parent, out_abs.name)
        tmp = parent / f"{TMP_PREFIX}{out_abs.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    try:
        with _writing(out_dir, needed):
            write_shards(state, tmp, max_bytes)
            with _quiet_transformers():
                config.save_pretrained(tmp)
            _write_generation_config(model, config, tmp)
            if model.tokenizer is not None:
                with _quiet_transformers():
                    model.tokenizer.save_pretrained(tmp)
            save_file(
                {f"probe_{i}": e.contiguous() for i, e in enumerate(edited)},
                str(tmp / PROBE_LOGITS),
                metadata={"format": "pt"},
            )
        # reload with plain transformers and compare with the in-memory edited model
        hf = _reload_hf(tmp, dtype)
        got = _hf_logits(hf, probes)
        del hf
        diff = _max_diff(got, edited)
        tol = _tolerance(dtype, edited)
        if not diff <= tol:
            raise ParityError(
                f"the reloaded checkpoint's logits differ from the in-memory model by {diff:.3g} "
                f"(tolerance {tol:.1g}); nothing was written"
            )
        with _writing(out_dir, needed):
            files = _sha_dir(tmp)
            manifest = seal(make_manifest(files, diff, tol))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
            mode = _new_file_mode()
            for p in tmp.iterdir():
                os.chmod(p, mode)  # some writers create 0600 files; a shipped checkpoint is readable as usual
                _fsync(p)
            _fsync(tmp)
    except BaseException:
        remove(tmp)
        raise
    return tmp


def _target(value, name: str) -> Path:
    """``out_dir`` / ``path`` as a ``Path``: a non-empty string or path-like, else ``ExportError``."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise ExportError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__}")
    if not str(value).strip():
        raise ExportError(f"{name} is empty; name the file or directory to write")
    return Path(value).expanduser()


def _check_target(target: Path, shown: str, overwrite: bool, *, gguf: bool) -> None:
    """Refuse an existing target unless ``overwrite`` and it is ours to replace (before any work)."""
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise ExportError(f"{shown} already exists; pass overwrite=True to replace it")
    problem = replace_refusal(target, shown, gguf=gguf)
    if problem:
        raise ExportError(problem)


# --------------------------------------------------------------------------- verify
def verify(out_dir, *, reload: bool = True, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Re-check an exported directory: the manifest's own hash (version 2: any change to its edit list,
    probe records or file hashes), every file's sha256 against the manifest, no file the manifest does
    not list (each an ``IntegrityError`` naming what changed), then reload with plain transformers and
    compare the probe logits with those recorded at export (``ParityError`` past the recorded tolerance).

    Returns ``{"ok": True, "manifest_version", "note", "files_checked", "unlisted_files",
    "max_abs_logit_diff", "tolerance", "top5_match"}``; ``note`` says what a version 1 manifest cannot
    vouch for.
    """
    if isinstance(out_dir, bytes) or not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise IntegrityError(
            f"verify takes the directory surgery.export wrote (a str or pathlib.Path), got {out_dir!r:.40}"
        )
    out_dir = Path(out_dir).expanduser()
    manifest, note = read_manifest(out_dir)
    files: dict[str, str] = manifest["files"]
    for name, want in files.items():
        path = out_dir / name
        if not path.is_file():
            raise IntegrityError(f"{name} is missing from {out_dir} (listed in {MANIFEST}); restore it or re-export")
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise IntegrityError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions") from None
        if got != want:
            raise IntegrityError(
                f"{name}: sha256 mismatch (manifest {want[:12]}…, file {got[:12]}…); the file was modified or corrupted"
            )
    unlisted = sorted(p.name for p in out_dir.iterdir() if p.name not in files and p.name != MANIFEST)
    if unlisted:
        raise IntegrityError(
            f"{unlisted[0]} is in {out_dir} but not in its {MANIFEST}"
            f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}; "
            "it was added after export, remove it or re-export"
        )
    result: dict[str, Any] = {
        "ok": True,
        "out_dir": str(out_dir),
        "manifest_version": manifest["version"],
        "note": note,
        "files_checked": len(files),
        "unlisted_files": [],
    }
    if not reload:
        return result
    recorded = getattr(torch, manifest.get("dtype", "float32"))
    dtype = recorded if dtype is None else dtype
    probes = [Probe(p.get("text"), torch.tensor([p["input_ids"]], dtype=torch.long)) for p in manifest["probes"]]
    expected = _recorded_logits(out_dir, probes, manifest)
    try:
        hf = _reload_hf(out_dir, dtype)
        got = _hf_logits(hf, probes)
    except ScalpelError:
        raise
    except Exception as exc:  # the files match their hashes, so this is the environment: say so in one line
        raise ParityError(
            f"{out_dir}: transformers could not reload and run it ({first_line(exc)}); check the "
            'transformers version (the manifest\'s "libraries" lists the one that wrote it)'
        ) from exc
    diff = _max_diff(got, expected)
    tol = float(manifest.get("verification", {}).get("tolerance", FP32_TOLERANCE))
    if dtype != recorded:
        tol = max(tol, _tolerance(dtype, expected))
    top5 = all(g[-1].topk(5).indices.tolist() == [t["id"] for t in p["top5"]] for g, p in zip(got, manifest["probes"]))
    if not diff <= tol:
        raise ParityError(
            f"{out_dir}: reloaded logits differ from those recorded at export by {diff:.3g} (tolerance {tol:.1g})"
        )
    result.update(max_abs_logit_diff=diff, tolerance=tol, top5_match=top5)
    return result


def _recorded_logits(out_dir: Path, probes: list[Probe], manifest: dict) -> list[torch.Tensor]:
    """The probe logits stored at export, one [positions, vocab] tensor per manifest probe."""
    from safetensors.torch import load_file

    try:
        stored = load_file(str(out_dir / PROBE_LOGITS))
    except Exception as exc:  # noqa: BLE001 - hashed, so only a foreign writer gets here
        raise IntegrityError(f"{PROBE_LOGITS} in {out_dir} cannot be read ({first_line(exc)}); re-export") from None
    vocab = None
    out = []
    for i, p in enumerate(probes):
        t = stored.get(f"probe_{i}")
        if t is None or t.dim() != 2 or t.shape[0] != p.ids.shape[1] or (vocab is not None and t.shape[1] != vocab):
            shape = None if t is None else tuple(t.shape)
            raise IntegrityError(
                f"{PROBE_LOGITS}: probe_{i} is {shape}, but the manifest's probe {i} has "
                f"{p.ids.shape[1]} tokens; the logits and the manifest do not belong together, "
                "re-export"
            )
        vocab = t.shape[1]
        out.append(t)
    if len(stored) != len(probes):
        raise IntegrityError(
            f"{PROBE_LOGITS} holds {len(stored)} probes but the manifest lists {len(probes)}; "
            "the logits and the manifest do not belong together, re-export"
        )
    return out


# --------------------------------------------------------------------------- GGUF
@takes_model
def export_gguf(
    model, path, *, edits=None, dtype: str = "f32", overwrite: bool = False, probe_prompts: Sequence[str] | None = None
) -> GGUFResult:
    """Write ``model`` (with ``edits`` applied, restored after) as a GGUF file for llama.cpp / ollama,
    then read it back with transformers' GGUF loader and compare logits on the probe prompts.

    ``dtype``: ``"f32"`` or ``"f16"`` (2-D weights; norms stay f32). The comparison is against the
    in-memory model with the same rounding applied (≤ 1e-4); the diff to the unrounded model is
    reported too. Llama and Mistral are written as GGUF ``llama``, Qwen2 as ``qwen2`` (with its q/k/v
    biases), Qwen3 as ``qwen3``. GGUF carries no other biases: exactly-zero biases are dropped, an edit
    that needs a non-zero bias (MeanAblateHeads, AddSteering) is refused — export those as a HF checkpoint.
    """
    from .gguf_export import write_gguf

    path = Path(os.path.abspath(_target(path, "path")))
    _check_target(path, str(path), overwrite, gguf=True)
    if dtype not in ("f32", "f16"):
        raise ExportError(f"GGUF dtype must be 'f32' or 'f16', got {dtype!r}")
    if model.tokenizer is None:
        raise ExportError(
            "GGUF export needs the model's tokenizer (a GGUF file embeds its vocabulary); load the model with one"
        )
    plan = as_plan(edits)
    probes = probe_inputs(model, probe_prompts)
    with _state.journal(model):
        plan.apply(model, atomic=False)
        config = export_config(model)
        state = export_state(model, config)
        # Qwen2's q/k/v biases belong to its GGUF architecture; every other bias must be zero and is dropped
        qwen2 = hooks_config.family(config) == "qwen2"
        dropped = [
            k
            for k in state
            if k.endswith(".bias") and not (qwen2 and k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")))
        ]
        nonzero = sorted(k for k in dropped if bool(state[k].any()))
        if nonzero:
            raise ExportError(
                f"GGUF cannot carry the non-zero bias {nonzero[0]}"
                f"{f' (and {len(nonzero) - 1} more)' if len(nonzero) > 1 else ''}, which an edit such "
                "as MeanAblateHeads or AddSteering introduces; export a Hugging Face checkpoint instead"
            )
        state = {k: v for k, v in state.items() if k not in set(dropped)}
        for part in ("attention", "mlp"):
            if hooks_config.bias_flag(config, part):
                setattr(config, hooks_config.bias_flag(config, part), False)
        unrounded = _logits(model, probes)
        if dtype == "f16":
            for p in model.parameters():
                if p.dim() == 2:
                    w = _state.writable(model, p)
                    w.copy_(w.to(torch.float16).to(w.dtype))
        expected = _logits(model, probes)
        tokenizer = model.tokenizer
        # still inside the journal: ``state`` shares storage with the edited weights
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale(path.parent, path.name)
        tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}.gguf"
        try:
            try:
                with _writing(path):
                    write_gguf(state, config, tokenizer, tmp, dtype=dtype)
            except ValueError as exc:
                raise ExportError(f"GGUF export refused: {exc}") from None
            del state
            from transformers import AutoModelForCausalLM

            with _quiet_transformers():
                hf = AutoModelForCausalLM.from_pretrained(
                    str(tmp.parent), gguf_file=tmp.name, dtype=torch.float32
                ).eval()
            got = _hf_logits(hf, probes)
            del hf
            diff, diff_unrounded = _max_diff(got, expected), _max_diff(got, unrounded)
            if not diff <= FP32_TOLERANCE:
                raise ParityError(
                    f"transformers' GGUF loader gives logits {diff:.3g} away from the in-memory model "
                    f"(tolerance {FP32_TOLERANCE:g}); nothing was written"
                )
            digest = sha256_file(tmp)
            with _writing(path):
                os.chmod(tmp, _new_file_mode())
                _fsync(tmp)
                move_into_place(tmp, path, str(path), overwrite=overwrite, gguf=True)
        except BaseException:
            remove(tmp)
            raise
    return GGUFResult(
        path=path,
        dtype=dtype,
        sha256=digest,
        max_abs_logit_diff=diff,
        max_abs_logit_diff_unrounded=diff_unrounded,
        tolerance=FP32_TOLERANCE,
        probes=[
            {"text": p.text, "input_ids": p.ids[0].tolist(), "top5": _top5(e, tokenizer)}
            for p, e in zip(probes, expected)
        ],
    )
