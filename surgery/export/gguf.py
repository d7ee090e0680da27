"""The GGUF file export: ``GGUFExport`` (stages 3–6 of ``stages``) for llama.cpp / ollama.

- **write**: ``gguf_format.write_gguf`` over the checkpoint's tensors read one at a time from the live
  model (``tensors.LazyState``), each converted (Q/K rows permuted for ``llama``, 2-D weights rounded for
  f16) and hashed as it is written.
- **compare**: one hash pass over the staged file (``hash_pass``): every tensor's bytes have the sha256 of
  the bytes written, and the file's own sha256 (the writer's record) comes from the same read; then
  the file is run by transformers' model class with every module's weights read from the file when the
  module runs (``gguf_logits``: transformers' GGUF name mapping and tensor processing, one module in
  memory at a time, through accelerate's offload hooks) and its logits on the probes must be within 1e-4
  of the in-memory model's with the same rounding (every 2-D weight through float16 for ``f16``, applied
  module by module as the probes run, so no rounded copy of the weights is kept).
- **seal**: a GGUF file marks itself (``llama_scalpel.exported_by`` in its metadata); no manifest; its
  sha256 is the one of the compare stage's hash pass.
- **commit**: the writer moves the file into place exclusively.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from _core.writer import write_file
from hooks import config as hooks_config
from hooks.model import check_model

from .._atomic import _quiet_transformers
from ..errors import ExportError, ParityError
from .hf import Matrix, sliced_logits
from .probes import FP32_TOLERANCE, max_diff, probe_logits, top5
from .stages import Export, GGUFResult
from .tensors import LazyState

if TYPE_CHECKING:
    from hooks import HookedLlama

GGUF_DTYPES = {"f32": torch.float32, "f16": torch.float16}


@contextlib.contextmanager
def rounded_weights(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, every module with a 2-D ``weight`` runs with that weight rounded through ``dtype`` (None: as
    is), the rounded copy made when the module runs and dropped after, so the model computes what a file
    of ``dtype`` weights computes while holding one rounded matrix at a time."""
    if dtype is None:
        yield
        return
    handles = []

    def before(module, args):
        w = module.weight
        module._scalpel_unrounded = w.data
        w.data = w.data.to(dtype).to(w.dtype)

    def after(module, args, output):
        module.weight.data = module.__dict__.pop("_scalpel_unrounded")

    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class GGUFExport(Export):
    """A verified GGUF file (stages in ``stages`` and this module's docstring)."""

    kind, param, function = "gguf", "path", "export_gguf"

    def __init__(self, model: HookedLlama, path, *, dtype: str = "f32", **kwargs) -> None:
        super().__init__(model, path, **kwargs)
        self.gguf_dtype = dtype

    def validate(self) -> None:
        check_model(self.model, "export_gguf")
        if self.gguf_dtype not in GGUF_DTYPES:
            raise ExportError(f"GGUF dtype must be 'f32' or 'f16', got {self.gguf_dtype!r}", param="dtype")
        if self.model.tokenizer is None:
            raise ExportError(
                "GGUF export needs the model's tokenizer (a GGUF file embeds its vocabulary); load the model with one",
                param="model",
            )
        super().validate()

    # ------------------------------------------------------------------- 2. state, GGUF's share
    def gguf_state(self) -> None:
        """The tensors GGUF carries: Qwen2's q/k/v biases belong to its architecture; every other bias must be
        zero and is dropped (its config flag turned off); a non-zero one is refused before writing."""
        qwen2 = hooks_config.family(self.config) == "qwen2"
        biases = [
            e
            for e in self.entries
            if e.name.endswith(".bias")
            and not (qwen2 and e.name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")))
        ]
        nonzero = sorted(e.name for e in biases if bool(e.read(self.model).any()))
        if nonzero:
            raise ExportError(
                f"GGUF cannot carry the non-zero bias {nonzero[0]}"
                f"{f' (and {len(nonzero) - 1} more)' if len(nonzero) > 1 else ''}, which an edit such "
                "as MeanAblateHeads or AddSteering introduces; export a Hugging Face checkpoint instead"
            )
        dropped = {e.name for e in biases}
        self.entries = [e for e in self.entries if e.name not in dropped]
        for part in ("attention", "mlp"):
            if hooks_config.bias_flag(self.config, part):
                setattr(self.config, hooks_config.bias_flag(self.config, part), False)
        rounding = None if self.gguf_dtype == "f32" else GGUF_DTYPES[self.gguf_dtype]
        self.unrounded = self.edited
        with rounded_weights(self.model, rounding):
            self.expected = probe_logits(self.model, self.probes)

    # ------------------------------------------------------------------- 3. write
    def write(self, path: Path) -> None:
        from .gguf_format import write_gguf_file

        self.digests: dict[str, str] = {}
        try:
            write_gguf_file(
                LazyState(self.model, self.entries),
                self.config,
                self.model.tokenizer,
                path,
                dtype=self.gguf_dtype,
                digests=self.digests,
            )
        except ValueError as exc:
            raise ExportError(f"GGUF export refused: {exc}") from None

    # ------------------------------------------------------------------- 4. compare
    def check_tensors(self, path: Path) -> str:
        """Every tensor in the file has the sha256 of the bytes written for it (one read of the file, which
        also gives the file's sha256, returned)."""
        file_sha, got = hash_pass(path)
        for name, sha in got.items():
            if self.digests.get(name) != sha:
                raise ParityError(
                    f"{name} as read back from the GGUF file differs from what was written; nothing was written"
                )
        if set(got) != set(self.digests):
            missing = sorted(set(self.digests) - set(got))
            raise ParityError(f"the GGUF file lacks {missing[0]} after writing; nothing was written")
        return file_sha

    def compare(self, path: Path) -> None:
        """The tensors by hash, then the logits of the file run module by module against the rounded model's."""
        self.sha256 = self.check_tensors(path)
        got = gguf_logits(path, self.probes)
        self.diff, self.diff_unrounded = max_diff(got, self.expected), max_diff(got, self.unrounded)
        if not self.diff <= FP32_TOLERANCE:
            raise ParityError(
                f"transformers' GGUF loader gives logits {self.diff:.3g} away from the in-memory model "
                f"(tolerance {FP32_TOLERANCE:g}); nothing was written"
            )

    # ------------------------------------------------------------------- 5. seal, 6. commit
    def seal(self, path: Path) -> str:
        """The file marks itself as ours (metadata written by ``write_gguf_file``); its sha256 (the compare
        stage's hash pass) is returned for the writer's record."""
        return self.sha256

    def commit(self) -> GGUFResult:
        return GGUFResult(
            path=self.absolute,
            dtype=self.gguf_dtype,
            sha256=self.sha256,
            max_abs_logit_diff=self.diff,
            max_abs_logit_diff_unrounded=self.diff_unrounded,
            tolerance=FP32_TOLERANCE,
            probes=[
                {"text": p.text, "input_ids": p.ids[0].tolist(), "top5": top5(e, self.model.tokenizer)}
                for p, e in zip(self.probes, self.expected)
            ],
        )

    def run(self) -> GGUFResult:
        self.validate()
        with self.state():
            self.gguf_state()

            def checked(path: Path) -> str:
                self.compare(path)
                return self.seal(path)

            write_file(
                self.absolute,
                self.write,
                verify=checked,
                kind=self.kind,
                overwrite=self.overwrite,
                param=self.param,
                shown=str(self.absolute),
            )
            return self.commit()


def hash_pass(path: Path, chunk: int = 1 << 22) -> tuple[str, dict[str, str]]:
    """One sequential read of the GGUF file ``path``: its sha256 and ``{tensor name: sha256 of its bytes}``
    (the tensors' offsets from gguf's reader, which maps the file without reading the data)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    spans = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in reader.tensors)
    del reader
    whole, per = hashlib.sha256(), {}

    def feed(f, n: int, *hashes) -> None:
        while n > 0:
            block = f.read(min(chunk, n))
            if not block:
                raise ParityError(f"{path.name} ends before its tensors do; nothing was written")
            for h in hashes:
                h.update(block)
            n -= len(block)

    with open(path, "rb") as f:
        pos = 0
        for offset, n, name in spans:
            feed(f, offset - pos, whole)
            h = hashlib.sha256()
            feed(f, n, whole, h)
            per[name], pos = h.hexdigest(), offset + n
        while block := f.read(chunk):
            whole.update(block)
    return whole.hexdigest(), per


class GGUFWeights(Mapping):
    """``{transformers parameter name: float32 CPU tensor}`` of a GGUF file, each read (de-quantised and
    processed as transformers' GGUF loader does: its name mapping, its Q/K un-permutation) when it is looked
    up; nothing is held. A tied ``lm_head.weight`` reads the embeddings."""

    def __init__(self, path: Path, hf_model: torch.nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        self.reader = GGUFReader(str(path))
        arch = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.parsed.get("config", {}))
        mapping = get_gguf_hf_weights_map(hf_model, self.processor)
        self.tensors = {mapping[t.name]: t for t in self.reader.tensors if t.name in mapping}
        self.aliases: dict[str, str] = {}
        head = getattr(hf_model, "lm_head", None)
        tied = head is not None and head.weight is hf_model.get_parameter("model.embed_tokens.weight")
        if tied and "lm_head.weight" not in self.tensors:
            self.aliases["lm_head.weight"] = "model.embed_tokens.weight"

    def __getitem__(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self.tensors[self.aliases.get(name, name)]
        weights = dequantize(t.data, t.tensor_type)
        weights = self.processor.process(
            weights=weights, name=t.name, tensor_key_mapping={}, parsed_parameters=self.parsed
        ).weights
        return torch.from_numpy(np.array(weights, dtype=np.float32, copy=True))

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the 2-D tensor ``name`` (an embedding or output matrix, which transformers' GGUF
        processing leaves as they are), de-quantised; only those rows are read."""
        from gguf import dequantize

        t = self.tensors[self.aliases.get(name, name)]
        return torch.from_numpy(np.array(dequantize(t.data[a:b], t.tensor_type), dtype=np.float32, copy=True))

    def matrix(self, name: str) -> Matrix:
        t = self.tensors[self.aliases.get(name, name)]
        rows, cols = int(t.shape[-1]), int(t.shape[0])  # GGUF lists dimensions innermost first
        return Matrix(rows, cols, torch.float32, lambda a, b: self.rows(name, a, b))

    def __iter__(self) -> Iterator[str]:
        return iter([*self.tensors, *self.aliases])

    def __len__(self) -> int:
        return len(self.tensors) + len(self.aliases)


def gguf_logits(path: Path, probes) -> list[torch.Tensor]:
    """The probes' logits of the GGUF file ``path`` run by transformers' model class (float32), each module's
    weights read from the file when the module runs (``GGUFWeights`` through accelerate's ``cpu_offload``),
    the embedding and output matrices a slice of rows at a time (``sliced_logits``): host memory holds one
    decoder layer's weights, not a second copy of the model nor a whole float32 embedding."""
    from accelerate import cpu_offload, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        with init_empty_weights():
            hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.tie_weights()
    weights = GGUFWeights(path, hf)
    names = {n for n, _ in hf.named_parameters(remove_duplicate=False)}
    missing = sorted(names - set(weights))
    if missing:
        raise ParityError(
            f"the GGUF file holds no tensor for {missing[0]}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; nothing was written"
        )
    cpu_offload(hf.eval(), execution_device=torch.device("cpu"), state_dict=weights)
    try:
        embed, head = weights.matrix("model.embed_tokens.weight"), weights.matrix("lm_head.weight")
        return sliced_logits(getattr(hf, hf.base_model_prefix), probes, embed, head)
    finally:
        del hf, weights
