"""llama.cpp-ready outputs: the f32/f16 GGUF that ``export_gguf`` writes, quantised by llama.cpp's own
quantiser into the files llama.cpp users publish (``Q8_0``, ``Q6_K``, ``Q5_K_M``, ``Q4_K_M`` …) and each
file run in llama.cpp before it counts as written.

llama.cpp comes from ``llama-cpp-py-sync`` (``pip install 'llama-scalpel[llamacpp]'``: llama.cpp's prebuilt
CPU library, ~5 MB, nothing compiles), whose C API is called directly: ``llama_model_quantize`` (what
``llama-quantize`` runs), the model/context/decode calls that read logits, ``llama_set_adapter_cvec`` (what
``--control-vector`` sets) and ggml's own GGUF reader. The prebuilt library is linked against glibc 2.38;
on an older glibc (Debian 12 has 2.36) a copy of it is made once under ``$SCALPEL_CACHE`` with its four
imports of glibc 2.38's C23 ``strtol``/``strtoul``/``strtoull``/``sscanf`` bound to the classic ones (they
differ only in reading ``0b…`` literals). Nothing here loads it before it is needed; without it,
``quantize_gguf`` stops before any work with a one-line ``ExportError`` naming the install.

``quantize_gguf(source, out_dir, types=("Q8_0", "Q4_K_M"), model=…)`` writes one directory through the
toolkit's staged writer: ``<stem>-<TYPE>.gguf`` per type (the names users publish under) and
``scalpel_manifest.json``. Before the directory is moved into place, llama.cpp runs the source file and
every quantised file on the probe prompts (``surgery.export.probe_inputs``, tokenised by the model's
tokenizer; llama.cpp's own tokenisation of them is compared too), and each is compared with the
reference — the in-memory ``model`` (with ``edits`` applied) when given, else the source file run in
llama.cpp — over every probe position:

- ``top1_agreement``: the fraction of positions whose most likely next token is the reference's;
- ``kl_mean`` / ``kl_max``: KL(reference ‖ file) of the next-token distributions (nats,
  ``analyses.divergence.kl_rows``), mean and worst over the positions.

The source must match the reference (``SOURCE_TOP1`` and ``SOURCE_KL``: llama.cpp reads the export as
transformers does), and each quantised file must keep ``top1_agreement >= min_top1`` (default 0.5: a
broken conversion agrees on almost nothing, a working 4-bit one on most positions); otherwise nothing is
written. The manifest records, per file, its type, size, sha256 and these numbers, with the source's hash,
the library's version (and llama.cpp commit) and the probes.

Example::

    g = surgery.export_gguf(model, "smol.f16.gguf", edits=plan, dtype="f16")
    q = surgery.quantize_gguf("smol.f16.gguf", "smol-gguf", ["Q8_0", "Q4_K_M"], model=model, edits=plan)
    q.files["Q4_K_M"].top1_agreement, q.files["Q4_K_M"].kl_mean
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from _core.writer import cache_root, register_kind, sha256_file, write_dir
from analyses.divergence import kl_rows

from .errors import ExportError, ParityError

if TYPE_CHECKING:
    from hooks import HookedLlama

# llama.cpp's llama_ftype values (include/llama.h) of the types people publish; the IQ types need an
# importance matrix and are not offered
QUANT_TYPES: dict[str, int] = {
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q5_K_S": 16,
    "Q5_0": 8,
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q4_0": 2,
    "Q3_K_L": 13,
    "Q3_K_M": 12,
    "Q3_K_S": 11,
    "Q2_K": 10,
}
SOURCE_TYPES = {0: "F32", 1: "F16", 32: "BF16"}  # general.file_type of a file llama.cpp quantises from
SOURCE_TOP1 = 0.99  # the source file in llama.cpp vs the reference: top-1 agreement at least …
SOURCE_KL = 1e-3  # … and mean KL at most (f16 rounding costs ~1e-5 on SmolLM2-135M)
MIN_TOP1 = 0.5
PACKAGE = "llama-cpp-py-sync"
INSTALL = "pip install 'llama-scalpel[llamacpp]' (llama-cpp-py-sync: llama.cpp's prebuilt CPU library, ~5 MB)"
# the C23 variants the prebuilt library was linked against (glibc >= 2.38); the older names have the same
# behaviour except that they do not read "0b…" binary literals, which llama.cpp's model loading never meets
C23_GLIBC = (2, 38)

register_kind("gguf-quants", directory=True, noun="set of quantised GGUF files")
register_kind("llamacpp-lib", directory=True, noun="copy of llama.cpp's library")


@dataclass
class LlamaCpp:
    """llama.cpp's C library, loaded once: ``lib`` (llama.h through cffi), ``ffi``, ``ggml`` (ggml's own
    library through ctypes, for its GGUF reader), ``directory`` it was loaded from and ``version``."""

    lib: Any
    ffi: Any
    ggml: Any
    directory: Path
    version: str
    commit: str


_LOADED: LlamaCpp | None = None
_LOG_SINK = None  # the cffi callback that silences llama.cpp's log (kept alive while the library is)


def _glibc() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def _elf_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def _bind_to_older_glibc(data: bytearray) -> bytearray:
    """A shared library (ELF64, little-endian) whose imports of glibc 2.38's ``__isoc23_strto*``/``sscanf``
    are rebound to the classic functions (``strtol``…, version GLIBC_2.2.5), so that it loads on glibc < 2.38:
    each such symbol's name is pointed at its own suffix, and the GLIBC_2.38 version requirement at GLIBC_2.2.5.
    Nothing else in the file changes."""
    if data[:6] != b"\x7fELF\x02\x01":
        raise ExportError("llama.cpp's library is not a 64-bit little-endian ELF file; reinstall " + PACKAGE)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynsym = next(s for s in secs if s[1] == 11)  # SHT_DYNSYM
    stroff, strsize = secs[dynsym[6]][4], secs[dynsym[6]][5]

    def name_at(off: int) -> bytes:
        return bytes(data[stroff + off : data.index(b"\0", stroff + off)])

    for i in range(dynsym[5] // 24):
        o = dynsym[4] + i * 24
        off = struct.unpack_from("<I", data, o)[0]
        if name_at(off).startswith(b"__isoc23_"):
            struct.pack_into("<I", data, o, off + len(b"__isoc23_"))
    old = data.find(b"\0GLIBC_2.2.5\0", stroff, stroff + strsize) + 1 - stroff
    verneed = next((s for s in secs if s[1] == 0x6FFFFFFE), None)  # SHT_GNU_verneed
    o = verneed[4] if verneed is not None else None
    while o is not None:
        _, count, _, aux, nxt = struct.unpack_from("<HHIII", data, o)
        a = o + aux
        for _ in range(count):
            _, flags, other, name, anxt = struct.unpack_from("<IHHII", data, a)
            if name_at(name) == b"GLIBC_2.38":
                if old <= 0:
                    raise ExportError(f"llama.cpp's library cannot be made to load on this glibc; {INSTALL}")
                struct.pack_into("<IHHII", data, a, _elf_hash(b"GLIBC_2.2.5"), flags, other, old, anxt)
            a += anxt
        o = o + nxt if nxt else None
    return data


def _loadable_directory(package_dir: Path, version: str) -> Path:
    """The package's own directory on glibc >= 2.38 (what the prebuilt library was linked against), else a copy
    of its libraries under ``$SCALPEL_CACHE`` rebound to the older glibc (``_bind_to_older_glibc``), made once."""
    glibc = _glibc()
    if glibc is None or glibc >= C23_GLIBC:
        return package_dir
    target = cache_root() / f"llamacpp-{version}-glibc{glibc[0]}.{glibc[1]}"
    if (target / "libllama.so").is_file():
        return target
    try:
        with write_dir(target, kind="llamacpp-lib", overwrite=True, param="SCALPEL_CACHE") as stage:
            for lib in sorted(package_dir.glob("lib*.so*")):
                (stage.path / lib.name).write_bytes(_bind_to_older_glibc(bytearray(lib.read_bytes())))
            stage.meta["llamacpp"] = {"package": PACKAGE, "version": version, "glibc": ".".join(map(str, glibc))}
    except OSError as exc:
        if (target / "libllama.so").is_file():
            return target  # another process made it meanwhile
        raise ExportError(f"could not prepare llama.cpp's library under {target} ({exc}); set SCALPEL_CACHE") from None
    return target


def require_llamacpp() -> LlamaCpp:
    """llama.cpp's library from ``llama-cpp-py-sync`` (loaded once, its log silenced), or a one-line
    ``ExportError`` naming the install."""
    global _LOADED, _LOG_SINK
    if _LOADED is not None:
        return _LOADED
    try:
        from llama_cpp_py_sync import _cffi_bindings as bindings
        from llama_cpp_py_sync import _version
    except ImportError:
        raise ExportError(f"llama.cpp is not installed; {INSTALL}") from None
    directory = _loadable_directory(Path(bindings.__file__).parent, _version.__version__)
    ffi = bindings.ffi
    try:
        lib = ffi.dlopen(str(directory / "libllama.so"))
        ggml = ctypes.CDLL(str(directory / "libggml-base.so.0"))
    except OSError as exc:
        raise ExportError(f"llama.cpp's library does not load ({exc}); reinstall: {INSTALL}") from None

    @ffi.callback("void(enum ggml_log_level, const char *, void *)")
    def sink(level, text, user_data) -> None:  # failures show as return codes, which are checked
        return None

    _LOG_SINK = sink
    lib.llama_log_set(sink, ffi.NULL)
    lib.llama_backend_init()
    _LOADED = LlamaCpp(lib, ffi, ggml, directory, _version.__version__, _version.__llama_cpp_commit__)
    return _LOADED


# --------------------------------------------------------------------------- reading a GGUF with ggml's reader
def read_gguf_f32(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A GGUF file as llama.cpp's own parser (ggml's ``gguf_init_from_file``) reads it: its string metadata
    and its tensors, which must all be float32 (what a control-vector file holds)."""
    g = require_llamacpp().ggml
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in (
        ("gguf_init_from_file", vp, [cp, ctypes.c_void_p * 0]),
        ("gguf_get_n_kv", ctypes.c_int64, [vp]),
        ("gguf_get_key", cp, [vp, ctypes.c_int64]),
        ("gguf_get_kv_type", ctypes.c_int, [vp, ctypes.c_int64]),
        ("gguf_get_val_str", cp, [vp, ctypes.c_int64]),
        ("gguf_free", None, [vp]),
        ("gguf_get_n_tensors", ctypes.c_int64, [vp]),
        ("gguf_get_tensor_name", cp, [vp, ctypes.c_int64]),
        ("gguf_get_tensor_type", ctypes.c_int, [vp, ctypes.c_int64]),
        ("ggml_get_tensor", vp, [vp, cp]),
        ("ggml_nelements", ctypes.c_int64, [vp]),
        ("ggml_get_data_f32", ctypes.POINTER(ctypes.c_float), [vp]),
        ("ggml_free", None, [vp]),
    ):
        fn = getattr(g, name)
        fn.restype = res
        if name != "gguf_init_from_file":
            fn.argtypes = args

    class InitParams(ctypes.Structure):  # struct gguf_init_params
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    ctx = ctypes.c_void_p()
    g.gguf_init_from_file.argtypes = [cp, InitParams]
    gctx = g.gguf_init_from_file(str(path).encode(), InitParams(False, ctypes.pointer(ctx)))
    if not gctx:
        raise ExportError(f"llama.cpp cannot read {path} as a GGUF file")
    try:
        meta = {}
        for i in range(g.gguf_get_n_kv(gctx)):
            if g.gguf_get_kv_type(gctx, i) == 8:  # GGUF_TYPE_STRING
                meta[g.gguf_get_key(gctx, i).decode()] = g.gguf_get_val_str(gctx, i).decode()
        tensors = {}
        for i in range(g.gguf_get_n_tensors(gctx)):
            name = g.gguf_get_tensor_name(gctx, i)
            if g.gguf_get_tensor_type(gctx, i) != 0:  # GGML_TYPE_F32
                raise ExportError(f"{path}: tensor {name.decode()} is not float32")
            t = g.ggml_get_tensor(ctx, name)
            n = g.ggml_nelements(t)
            tensors[name.decode()] = torch.tensor(g.ggml_get_data_f32(t)[:n], dtype=torch.float32)
        return meta, tensors
    finally:
        g.gguf_free(gctx)
        if ctx:
            g.ggml_free(ctx)


# --------------------------------------------------------------------------- running a GGUF in llama.cpp
class LlamaCppModel:
    """A GGUF file loaded by llama.cpp for reading logits (``logits(ids)``), tokenising (``tokenize``), greedy
    decoding (``greedy``) and steering with a control vector (``set_control_vector``). Use it as a context
    manager."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 128, threads: int | None = None) -> None:
        self._lc = lc = require_llamacpp()
        lib, ffi = lc.lib, lc.ffi
        threads = threads or max(1, torch.get_num_threads())
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise ExportError(f"llama.cpp cannot load {path}")
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            self.model = None
            raise ExportError(f"llama.cpp cannot make a context for {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_layer = lib.llama_model_n_layer(self.model)
        self._cvec: object = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        lib = self._lc.lib
        if getattr(self, "ctx", None) is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None) is not None:
            lib.llama_model_free(self.model)
            self.model = None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenisation of ``text`` (with the special tokens the file says to add)."""
        lib, ffi = self._lc.lib, self._lc.ffi
        raw = text.encode("utf-8")
        buf = ffi.new("llama_token[]", len(raw) + 8)
        n = lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(raw) + 8, True, False)
        if n < 0:
            raise ExportError(f"llama.cpp could not tokenise {text[:40]!r}")
        return list(buf[0:n])

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits of one sequence, every position (a fresh context each call)."""
        lib, ffi = self._lc.lib, self._lc.ffi
        ids = [int(i) for i in ids]
        if not ids or len(ids) > self.n_ctx:
            raise ExportError(f"a sequence of {len(ids)} tokens does not fit llama.cpp's context of {self.n_ctx}")
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise ExportError(f"llama.cpp could not run the sequence (llama_decode returned {rc})")
            out = lib.llama_get_logits(self.ctx)
            data = ffi.buffer(out, 4 * len(ids) * self.n_vocab)
            return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(len(ids), self.n_vocab)
        finally:
            lib.llama_batch_free(batch)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """``max_new_tokens`` tokens by greedy decoding after ``ids`` (llama.cpp's logits, arg-max each step)."""
        out = [int(i) for i in ids]
        for _ in range(max_new_tokens):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(ids) :]

    def set_control_vector(self, vectors: dict[int, torch.Tensor] | None, scale: float = 1.0) -> None:
        """Add ``scale × vectors[l]`` after layer ``l`` (llama.cpp's control-vector slot, layers 1 … n−1), as
        ``--control-vector`` does; ``None`` removes it."""
        lib, ffi = self._lc.lib, self._lc.ffi
        if not vectors:
            lib.llama_set_adapter_cvec(self.ctx, ffi.NULL, 0, self.n_embd, -1, -1)
            self._cvec = None
            return
        top = max(vectors)
        buf = torch.zeros(top, self.n_embd, dtype=torch.float32)  # row l-1 holds layer l (layer 0 has none)
        for layer, v in vectors.items():
            buf[layer - 1] += scale * v.float()
        arr = buf.numpy()
        rc = lib.llama_set_adapter_cvec(
            self.ctx, ffi.cast("float *", arr.ctypes.data), arr.size, self.n_embd, 1, self.n_layer
        )
        if rc != 0:
            raise ExportError(f"llama.cpp refused the control vector (code {rc})")
        self._cvec = arr  # kept alive while llama.cpp may read it


# --------------------------------------------------------------------------- comparing logits
@dataclass
class Agreement:
    """How a file's next-token distributions compare with a reference over ``n_positions`` positions."""

    top1_agreement: float
    kl_mean: float
    kl_max: float
    max_abs_logit_diff: float
    n_positions: int

    def to_dict(self) -> dict:
        return {
            "top1_agreement": self.top1_agreement,
            "kl_mean": self.kl_mean,
            "kl_max": self.kl_max,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "n_positions": self.n_positions,
        }


def agreement(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> Agreement:
    """Top-1 agreement and KL(reference ‖ other) over every position of every probe ([P, V] logits each)."""
    ref, oth = torch.cat([r.float() for r in reference]), torch.cat([o.float() for o in other])
    kl = kl_rows(ref, oth)
    return Agreement(
        top1_agreement=float((ref.argmax(-1) == oth.argmax(-1)).double().mean()),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        max_abs_logit_diff=float((ref - oth).abs().max()),
        n_positions=int(ref.shape[0]),
    )


# --------------------------------------------------------------------------- quantising
@dataclass
class QuantizedFile:
    """One quantised file of a ``quantize_gguf`` directory and how llama.cpp's run of it compares."""

    type: str
    path: Path
    bytes: int
    sha256: str
    check: Agreement

    @property
    def top1_agreement(self) -> float:
        return self.check.top1_agreement

    @property
    def kl_mean(self) -> float:
        return self.check.kl_mean


@dataclass
class QuantizeResult:
    """What ``quantize_gguf`` wrote: ``files`` by type, the source's own check in llama.cpp and the manifest."""

    out_dir: Path
    files: dict[str, QuantizedFile]
    source_check: Agreement
    reference: str  # "model" or "source"
    manifest: dict = field(repr=False, default_factory=dict)

    def rows(self) -> list[dict]:
        rows = [{"file": "source (llama.cpp)", **self.source_check.to_dict()}]
        return rows + [{"file": f.path.name, "bytes": f.bytes, **f.check.to_dict()} for f in self.files.values()]


def check_quant_types(types) -> list[str]:
    """The quantisation type names, upper-cased and checked (a one-line ``ExportError`` lists the known ones)."""
    names = [types] if isinstance(types, str) else list(types)
    out = []
    for t in names:
        t = str(t).strip().upper()
        if t not in QUANT_TYPES:
            raise ExportError(
                f"unknown quantisation type {t!r}; use one of {', '.join(QUANT_TYPES)} (llama.cpp's names)",
                param="types",
            )
        if t not in out:
            out.append(t)
    if not out:
        raise ExportError(f"name at least one quantisation type, e.g. Q4_K_M (one of {', '.join(QUANT_TYPES)})")
    return out


def _source_type(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one cause: not a GGUF file
        raise ExportError(f"{path} is not a readable GGUF file ({exc}); pass the file export_gguf wrote") from None
    field_ = reader.fields.get("general.file_type")
    ftype = int(field_.parts[field_.data[0]][0]) if field_ is not None else 0
    if ftype not in SOURCE_TYPES:
        raise ExportError(
            f"{path} is already quantised (llama.cpp file type {ftype}); quantise from the f32 or f16 file "
            "export_gguf writes",
            param="source",
        )
    return SOURCE_TYPES[ftype]


@contextlib.contextmanager
def _edited(model: HookedLlama, edits) -> Iterator[None]:
    if edits is None:
        yield
        return
    from .plan import as_plan

    with as_plan(edits).applied(model):
        yield


def quantize_gguf(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    types: Sequence[str] | str = ("Q8_0", "Q4_K_M"),
    *,
    model: HookedLlama | None = None,
    edits=None,
    probe_prompts: Sequence[str] | None = None,
    min_top1: float = MIN_TOP1,
    threads: int | None = None,
    overwrite: bool = False,
) -> QuantizeResult:
    """Quantise the f32/f16 GGUF ``source`` with llama.cpp into ``out_dir`` (one file per type), each file
    run in llama.cpp and compared with the reference before the directory is written (module docstring).

    Args:
        source: a GGUF written by ``export_gguf`` (f32 or f16; an already quantised file is refused).
        out_dir: the directory to write (``<stem>-<TYPE>.gguf`` per type + ``scalpel_manifest.json``).
        types: llama.cpp type names (``QUANT_TYPES``), e.g. ``["Q8_0", "Q4_K_M"]``.
        model: the model the file was exported from (the reference; with ``edits`` applied for the check),
            and the tokenizer of the probes. Without it the source run in llama.cpp is the reference.
        min_top1: the least top-1 agreement a quantised file must keep.
        threads: llama.cpp's threads (default: torch's).

    Example: ``quantize_gguf("smol.f16.gguf", "smol-gguf", "Q4_K_M", model=model).files["Q4_K_M"].kl_mean``.
    """
    from .export.probes import probe_inputs, probe_logits

    source = Path(source)
    kinds = check_quant_types(types)
    if isinstance(min_top1, bool) or not isinstance(min_top1, (int, float)) or not 0 <= min_top1 <= 1:
        raise ExportError(f"min_top1 must be a fraction in [0, 1], got {min_top1!r}", param="min_top1")
    if not source.is_file():
        raise ExportError(f"{source} does not exist; pass the GGUF file export_gguf wrote", param="source")
    source_type = _source_type(source)
    if edits is not None and model is None:
        raise ExportError("edits= needs model= (the reference the edits are applied to)", param="edits")
    lc = require_llamacpp()
    stem = source.name.removesuffix(".gguf")
    for suffix in (".f32", ".f16", ".bf16", "-F32", "-F16", "-BF16"):
        stem = stem.removesuffix(suffix)
    names = {t: f"{stem}-{t}.gguf" for t in kinds}

    with LlamaCppModel(source, threads=threads) as src:
        if model is not None:
            probes = probe_inputs(model, probe_prompts)
            with _edited(model, edits):
                reference = probe_logits(model, probes)
            ids = [p.ids[0].tolist() for p in probes]
            pairs = [(p.text, i) for p, i in zip(probes, ids) if p.text is not None]
            tokenizer_match = all(src.tokenize(t) == i for t, i in pairs) if pairs else None
        else:
            texts = list(probe_prompts) if probe_prompts is not None else None
            if texts is None:
                from .export.probes import PROBE_PROMPTS

                texts = list(PROBE_PROMPTS)
            ids = [src.tokenize(t) for t in texts]
            reference = None
            tokenizer_match = None
        source_logits = [src.logits(i) for i in ids]
    if reference is None:
        reference = source_logits
    source_check = agreement(reference, source_logits)
    if model is not None and (source_check.top1_agreement < SOURCE_TOP1 or not source_check.kl_mean <= SOURCE_KL):
        raise ParityError(
            f"llama.cpp runs {source.name} differently from the model (top-1 agreement "
            f"{source_check.top1_agreement:.3f}, KL {source_check.kl_mean:.3g}; need >= {SOURCE_TOP1} and <= "
            f"{SOURCE_KL}); nothing was written. Pass the file export_gguf wrote from this model (and its edits)"
        )
    files: dict[str, QuantizedFile] = {}
    with write_dir(out_dir, kind="gguf-quants", overwrite=overwrite, param="out_dir") as stage:
        for t in kinds:
            staged = stage.file(names[t])
            params = lc.lib.llama_model_quantize_default_params()
            params.ftype = QUANT_TYPES[t]
            params.nthread = threads or max(1, torch.get_num_threads())
            rc = lc.lib.llama_model_quantize(str(source).encode(), str(staged).encode(), lc.ffi.addressof(params))
            if rc != 0 or not staged.is_file():
                raise ExportError(f"llama.cpp could not quantise {source.name} to {t} (code {rc}); nothing was written")
            with LlamaCppModel(staged, threads=threads) as q:
                check = agreement(reference, [q.logits(i) for i in ids])
            if not check.top1_agreement >= min_top1:
                raise ParityError(
                    f"the {t} file agrees with the reference on the top token at only {check.top1_agreement:.2f} of "
                    f"{check.n_positions} probe positions (need {min_top1}); nothing was written. Use a larger "
                    f"type (Q8_0, Q6_K) or lower min_top1"
                )
            files[t] = QuantizedFile(t, Path(out_dir) / names[t], staged.stat().st_size, sha256_file(staged), check)
        stage.meta["llamacpp"] = {
            "library": {"package": PACKAGE, "version": lc.version, "llama_cpp_commit": lc.commit},
            "source": {"file": source.name, "sha256": sha256_file(source), "type": source_type},
            "reference": "model" if model is not None else "source",
            "source_check": source_check.to_dict(),
            "tokenizer_match": tokenizer_match,
            "probes": [{"input_ids": i} for i in ids],
            "quantized": {
                t: {"file": f.path.name, "bytes": f.bytes, "sha256": f.sha256, **f.check.to_dict()}
                for t, f in files.items()
            },
            "min_top1": float(min_top1),
        }
    return QuantizeResult(
        Path(out_dir), files, source_check, "model" if model is not None else "source", stage.result.manifest
    )
