"""The Hugging Face directory export: ``HFExport`` (stages 3–6 of ``stages``) and ``export``.

- **write**: safetensors shards streamed tensor by tensor (``write_shard``: header first, then each tensor's
  bytes read from the live model and hashed as they are written; host memory is one tensor), the index when
  there is more than one shard, config, generation config, tokenizer and the probe logits.
- **compare**: every shard's sha256 as read back from disk (the writer's one hash pass, when it seals)
  equals the sha256 of the live bytes written; the directory reloaded by plain transformers with every
  module offloaded to disk (accelerate's device map ``{"": "disk"}``: the weights are read from the
  written shards one module at a time as the probes run; the embedding and output matrices a slice of rows
  at a time), its logits on every probe position within the tolerance of the in-memory edited model's.
- **seal**: the manifest (``ExportManifest``) given to the writer, which adds the files' hashes and its own.
- **commit**: the writer moves the directory into place exclusively.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch

from _core.writer import MANIFEST, write_dir

from .._atomic import _quiet_transformers
from .._manifest import PROBE_LOGITS
from ..errors import ExportError, ParityError
from .manifest import ExportManifest, library_versions, probe_records
from .probes import _batch, hf_logits, kl_last, max_diff, tolerance
from .stages import Export, ExportResult, parse_size, source_dir

if TYPE_CHECKING:
    from hooks import HookedLlama

    from .tensors import TensorEntry

INDEX = "model.safetensors.index.json"
# torch dtype -> safetensors dtype name
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def shard_plan(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Entries in order, cut into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else transformers' ``model-0000i-of-0000n.safetensors``."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(entries: list[TensorEntry]) -> bytes:
    """The safetensors header of ``entries`` written in order: 8-byte little-endian length, then the JSON
    (padded with spaces to a multiple of 8 bytes, as the format's reference writer does)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise ExportError(f"{e.name} has dtype {e.dtype}, which safetensors cannot store")
        meta[e.name] = {
            "dtype": _ST_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's raw bytes, without a copy when it is contiguous."""
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class HFExport(Export):
    """A verified Hugging Face checkpoint (stages in ``stages`` and this module's docstring)."""

    kind, param = "export", "out_dir"

    def __init__(self, model: HookedLlama, out_dir, *, max_shard_size="2GB", **kwargs) -> None:
        super().__init__(model, out_dir, **kwargs)
        self.max_shard_size = max_shard_size

    def validate(self) -> None:
        super().validate()
        self.max_bytes = parse_size(self.max_shard_size)

    # ------------------------------------------------------------------- 3. write
    def write_shard(self, path: Path, entries: list[TensorEntry]) -> str:
        """One safetensors file of ``entries``, each read from the model when it is written; returns the
        sha256 of the bytes written (header and tensors, in file order)."""
        h = hashlib.sha256()
        header = _header(entries)
        with open(path, "xb") as f:
            f.write(header)
            h.update(header)
            for e in entries:
                t = e.read(self.model)
                if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                    raise ExportError(f"{e.name} changed while it was written ({tuple(t.shape)}, {t.dtype})")
                data = _bytes(t)
                f.write(data)
                h.update(data)
                del t, data
        return h.hexdigest()

    def write(self, directory: Path) -> None:
        """Shards (and their index), config, generation config, tokenizer, probe logits."""
        from safetensors.torch import save_file

        shards = shard_plan(self.entries, self.max_bytes)
        names = shard_names(len(shards))
        self.written: dict[str, str] = {}  # file -> sha256 of the live bytes written
        for name, shard in zip(names, shards):
            self.written[name] = self.write_shard(directory / name, shard)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in self.entries)},
                "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard},
            }
            (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        with _quiet_transformers():
            self.config.save_pretrained(directory)
        self.write_generation_config(directory)
        if self.model.tokenizer is not None:
            with _quiet_transformers():
                self.model.tokenizer.save_pretrained(directory)
        save_file(
            {f"probe_{i}": e.contiguous() for i, e in enumerate(self.edited)},
            str(directory / PROBE_LOGITS),
            metadata={"format": "pt"},
        )

    def write_generation_config(self, directory: Path) -> None:
        """The source directory's generation config, else one derived from the config."""
        from transformers import GenerationConfig

        src = source_dir(self.model)
        gen = None
        if src is not None and (src / "generation_config.json").is_file():
            with contextlib.suppress(Exception):
                gen = GenerationConfig.from_pretrained(src)
        if gen is None:
            gen = GenerationConfig.from_model_config(self.config)
        with _quiet_transformers():
            gen.save_pretrained(directory)

    # ------------------------------------------------------------------- 4. compare
    def compare(self, directory: Path) -> None:
        """Reload with plain transformers, weights read module by module from the written shards; logits
        within the tolerance of the in-memory edited model's (``ParityError`` otherwise)."""
        got = reload_logits(directory, self.dtype, self.probes)
        self.diff, self.tol = max_diff(got, self.edited), tolerance(self.dtype, self.edited)
        if not self.diff <= self.tol:
            raise ParityError(
                f"the reloaded checkpoint's logits differ from the in-memory model by {self.diff:.3g} "
                f"(tolerance {self.tol:.1g}); nothing was written"
            )

    def check_hashes(self, directory: Path) -> None:
        """Every shard as read back from disk (the sealed manifest's sha256) is the live bytes written."""
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
        for name, sha in self.written.items():
            if files.get(name) != sha:
                raise ParityError(
                    f"{name} as read back from disk differs from the model's tensors written into it "
                    f"(sha256 {str(files.get(name))[:12]}…, written {sha[:12]}…); nothing was written"
                )

    # ------------------------------------------------------------------- 5. seal
    def manifest(self) -> ExportManifest:
        base, tok = self.base, self.model.tokenizer
        return ExportManifest(
            base={"source": getattr(self.model, "source", None), "sha256": base.sha256, "sha256_of": base.sha256_of},
            edits=self.history,
            edits_applied_before_export=len(self.prior),
            config_changes=self.config_changes,
            layer_map=self.layer_map,
            provenance=self.provenance,
            dtype=str(self.dtype).replace("torch.", ""),
            libraries=library_versions(),
            probes=probe_records(self.probes, self.edited, base.logits, tok),
            kl_to_base=(
                sum(kl_last(b, e) for b, e in zip(base.logits, self.edited)) / len(self.probes)
                if base.logits is not None
                else None
            ),
            verification={
                "reloaded_with": "transformers.AutoModelForCausalLM.from_pretrained",
                "device_map": "every module offloaded to disk, read from the written shards",
                "max_abs_logit_diff": self.diff,
                "tolerance": self.tol,
                "compared": "all probe positions",
                "tensors": "sha256 of every shard as read back equals that of the live tensors written",
            },
        )

    def seal(self, stage) -> None:
        stage.meta.update(self.manifest().to_dict())
        stage.verify(self.check_hashes)  # after the writer hashed every file, before the move

    # ------------------------------------------------------------------- 6. commit, and the whole run
    def commit(self, stage) -> ExportResult:
        manifest = stage.result.manifest
        v = manifest["verification"]
        return ExportResult(
            out_dir=self.target,
            files=manifest["files"],
            max_abs_logit_diff=v["max_abs_logit_diff"],
            tolerance=v["tolerance"],
            kl_to_base=manifest["kl_to_base"],
            manifest=manifest,
        )

    def run(self) -> ExportResult:
        self.validate()
        with self.state():
            needed = sum(e.nbytes for e in self.entries)
            with write_dir(
                self.target, kind=self.kind, overwrite=self.overwrite, param=self.param, shown=self.shown, needed=needed
            ) as stage:
                self.write(stage.path)
                self.compare(stage.path)
                self.seal(stage)
            return self.commit(stage)


def reload_hf(directory: Path, dtype: torch.dtype, **kwargs):
    """``directory`` loaded by ``transformers.AutoModelForCausalLM`` (missing, unexpected or mismatched keys
    are a ``ParityError``); ``kwargs`` go to ``from_pretrained`` (a ``device_map``)."""
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


def reload_logits(directory: Path, dtype: torch.dtype, probes: Sequence) -> list[torch.Tensor]:
    """The probes' logits of ``directory`` reloaded by plain transformers with every module offloaded to disk:
    accelerate reads each module's weights from the checkpoint's own shards when the module runs (nothing is
    copied into the offload folder), so host memory holds one module at a time — and the two largest, the
    embeddings and the output matrix, not even that (``streamed_logits``)."""
    quiet = logging.getLogger("accelerate.big_modeling")  # "some parameters are on the meta device": meant so
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # the folder holds what cannot be read from the shards as is (converted dtypes); usually nothing
        with tempfile.TemporaryDirectory(prefix="scalpel-offload-") as offload:
            hf = reload_hf(directory, dtype, device_map={"": "disk"}, offload_folder=offload)
            try:
                return streamed_logits(hf, directory, probes)
            finally:
                del hf
    finally:
        quiet.setLevel(level)


ROWS_PER_SLICE = 8192


class Matrix(NamedTuple):
    """A [rows, cols] matrix read ``ROWS_PER_SLICE`` rows at a time: ``read(a, b)`` gives rows ``a:b`` in
    ``dtype`` (the embedding or output matrix of a checkpoint being verified)."""

    rows: int
    cols: int
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]


@torch.no_grad()
def sliced_logits(body: Any, probes: Sequence, embed: Matrix, head: Matrix) -> list[torch.Tensor]:
    """``hf_logits`` of a transformers model whose base model is ``body``, with its embedding and output
    matrices read a slice of rows at a time: the probes' embedding rows are gathered slice by slice, the body
    runs on those embeddings (``inputs_embeds``), and the logits are its final hidden states times each slice
    of the output matrix. Host memory holds one slice of either, never the matrix."""
    ids, mask = _batch(list(probes), torch.device("cpu"))
    x = torch.zeros(*ids.shape, embed.cols, dtype=embed.dtype)
    for a in range(0, embed.rows, ROWS_PER_SLICE):
        b = min(a + ROWS_PER_SLICE, embed.rows)
        here = (ids >= a) & (ids < b)
        if here.any():
            x[here] = embed.read(a, b)[ids[here] - a]
    hidden = body(inputs_embeds=x, attention_mask=mask).last_hidden_state
    logits = torch.empty(*ids.shape, head.rows, dtype=torch.float32)
    for a in range(0, head.rows, ROWS_PER_SLICE):
        b = min(a + ROWS_PER_SLICE, head.rows)
        logits[..., a:b] = torch.nn.functional.linear(hidden, head.read(a, b)).float()
    return [logits[i, : p.ids.shape[1]] for i, p in enumerate(probes)]


def streamed_logits(hf: Any, directory: Path, probes: Sequence) -> list[torch.Tensor]:
    """``hf_logits`` of a disk-offloaded transformers model (``sliced_logits``), its embedding and output
    matrices read from the very file and tensor accelerate's offload index names for them (so a tied output
    matrix is the embeddings, as transformers tied it). Host memory beyond the live model is one decoder
    layer plus one slice, where reading the two matrices whole would add up to 21 % of a 1B model's weights.
    Falls back to ``hf_logits`` when a matrix is not in the checkpoint's shards as is."""
    from hooks.checkpoint import Checkpoint, read_header

    def matrix(module) -> Matrix | None:
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)  # accelerate's
        index = getattr(getattr(weights_map, "dataset", None), "index", None) or {}
        info = index.get(f"{getattr(weights_map, 'prefix', '')}weight")
        if not info or "safetensors_file" not in info:
            return None
        ckpt, name, dtype = (
            Checkpoint(directory, read_header(Path(info["safetensors_file"]))),
            info["weight_name"],
            getattr(torch, info["dtype"]),
        )
        rows, cols = ckpt.entries[name].shape
        return Matrix(rows, cols, dtype, lambda a, b: ckpt.read(name, rows=(a, b)).to(dtype))

    embed, head = matrix(hf.get_input_embeddings()), matrix(hf.get_output_embeddings())
    if embed is None or head is None:
        return hf_logits(hf, probes)
    return sliced_logits(getattr(hf, hf.base_model_prefix), probes, embed, head)
