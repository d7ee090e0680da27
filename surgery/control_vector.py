"""llama.cpp control vectors: steering and refusal directions as the GGUF files ``llama-cli
--control-vector FILE`` / ``--control-vector-scaled FILE:SCALE`` read.

The layout is llama.cpp's own (``common_control_vector_load`` in ``common/common.cpp``, and what its
``cvector-generator`` writes): metadata ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the model's GGUF architecture) and ``controlvector.layer_count``; one
1-D float32 tensor ``direction.{l}`` [n_embd] per steered layer ``l``. llama.cpp adds
``scale × direction.{l}`` to the residual stream after layer ``l``'s MLP (its ``l_out``, our
``blocks.{l}.hook_resid_post``) at every position, for ``l`` = 1 … n_layers − 1: there is no slot for
layer 0 (a direction for it is refused, with the fix).

``ControlVector`` holds ``vectors`` ({layer: tensor [d_model]}, already scaled) and is built from

- a steering direction: ``ControlVector.from_steering(direction, strength=… | scale=…)`` (a
  ``SteeringDirection`` read at ``resid_post``, or ``resid_pre`` of layer L > 0 = ``resid_post`` of L − 1,
  or ``mlp_out``), a ``Steering`` (what ``steer()`` returns, without ``positions``: a control vector acts at
  every position) or an ``AddSteering`` edit;
- a refusal direction: ``ControlVector.from_refusal(directions, layer)``: Arditi et al.'s activation
  subtraction at one layer, ``−((μ_harmful − μ_harmless)·r̂) r̂`` (the difference of the two sets' mean
  projections on the unit direction ``r̂``), which moves the mean harmful activation's component along
  the direction to the harmless one's; ``scale`` multiplies it.

``cv.hooks()`` is the run-time form (the same additions as hooks on ``blocks.{l}.hook_resid_post``);
``cv.save(path, model=model)`` writes the file through the toolkit's staged writer and reads it back by
llama.cpp's rules (``load_control_vector``) before it is moved into place; ``check_control_vector``
runs a GGUF model in llama.cpp with the file applied and compares its logits with ours under the hooks.

Example::

    d = steering_direction(model, joyful, gloomy, layer=10)
    cv = ControlVector.from_steering(d, strength=0.1)
    cv.save("joyful.cvec.gguf", model=model)      # llama-cli -m smol.gguf --control-vector joyful.cvec.gguf
    with model.hooks(fwd_hooks=cv.hooks()):
        model.generate("Write one sentence about the park.", max_new_tokens=20)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from _core.writer import GGUF_MARK, GGUF_MARK_VALUE, write_file
from hooks import act_name

from .errors import EditError, ExportError

if TYPE_CHECKING:
    from hooks import HookedLlama

ARCH = "controlvector"


@dataclass
class ControlVector:
    """Per-layer additions to the residual stream after each layer (``vectors``: {layer: [d_model]}, as
    llama.cpp adds them at scale 1), for a model of GGUF architecture ``model_hint``."""

    vectors: dict[int, torch.Tensor]
    model_hint: str = "llama"
    source: dict = field(default_factory=dict)  # what it was built from (for the record)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise EditError("a control vector needs at least one layer's vector", param="vectors")
        clean = {}
        for layer, v in self.vectors.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise EditError(f"control-vector layers are integers, got {layer!r}", param="vectors")
            if layer < 1:
                raise EditError(
                    f"llama.cpp has no control-vector slot for layer {layer} (it steers after layers 1 … n−1); "
                    "read the direction after a later layer",
                    param="layer",
                )
            v = torch.as_tensor(v).detach().reshape(-1).float().cpu()
            if not bool(torch.isfinite(v).all()):
                raise EditError(f"the layer-{layer} vector holds NaN or inf", param="vectors")
            clean[layer] = v
        sizes = {v.shape[0] for v in clean.values()}
        if len(sizes) != 1:
            raise EditError(f"the layers' vectors differ in size ({sorted(sizes)})", param="vectors")
        self.vectors = dict(sorted(clean.items()))

    @property
    def d_model(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_steering(
        cls, steering, *, scale: float | None = None, strength: float | None = None, model_hint: str = "llama"
    ) -> ControlVector:
        """From a ``SteeringDirection`` (``scale`` or ``strength`` × its ``resid_norm``, as ``steer``), a
        ``Steering`` (its own scale) or an ``AddSteering`` edit."""
        from analyses.steering import Steering, SteeringDirection

        from .edits import AddSteering

        if isinstance(steering, SteeringDirection):
            args = steering.add_steering_args(scale, strength=strength)
            layer, vec = args["layer"], args["scale"] * args["vector"]
            src = {"kind": "steering_direction", "at": steering.at, "layer": steering.layer, "scale": args["scale"]}
        elif isinstance(steering, Steering):
            if steering.positions is not None:
                raise EditError(
                    "a control vector acts at every position; build it from a steer() without positions=",
                    param="positions",
                )
            layer = steering.layer
            if steering.at == "resid_pre" and layer > 0:
                layer -= 1
            elif steering.at not in ("resid_post", "mlp_out"):
                raise EditError(
                    f"llama.cpp adds control vectors after a layer (resid_post); this steering acts at {steering.at}",
                    param="at",
                )
            vec = steering.scale * steering.vector.reshape(-1)
            src = {"kind": "steer", "at": steering.at, "layer": steering.layer, "scale": steering.scale}
        elif isinstance(steering, AddSteering):
            layer, vec = steering.layer, steering.scale * torch.as_tensor(steering.vector).float()
            src = {"kind": "AddSteering", "layer": steering.layer, "scale": steering.scale}
        else:
            raise EditError(
                f"from_steering takes a SteeringDirection, a Steering or an AddSteering, got {type(steering).__name__}"
            )
        if scale is not None and not isinstance(steering, SteeringDirection):
            vec = vec * float(scale)
        return cls({int(layer): vec}, model_hint, src)

    @classmethod
    def from_refusal(
        cls, directions, layer: int | None = None, *, scale: float = 1.0, model_hint: str = "llama"
    ) -> ControlVector:
        """Activation subtraction of a refusal direction at one layer (module docstring): ``directions`` a
        ``RefusalDirections`` (``layer`` required) or a ``DirectionSelection`` (its chosen layer)."""
        from analyses.refusal import DirectionSelection

        if isinstance(directions, DirectionSelection):
            layer = directions.chosen if layer is None else layer
            directions = directions.directions
        if layer is None:
            raise EditError("from_refusal needs layer= (e.g. the layer select_direction chose)", param="layer")
        n = directions.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise EditError(f"layer {layer!r} is out of range 0..{n - 1}", param="layer")
        layer %= n
        r = directions.directions[layer].double()
        r = r / r.norm()
        gap = float((directions.harmful_mean[layer].double() - directions.harmless_mean[layer].double()) @ r)
        vec = (-float(scale) * gap * r).float()
        return cls({layer: vec}, model_hint, {"kind": "refusal", "layer": layer, "projection_gap": gap, "scale": scale})

    # ------------------------------------------------------------------ use
    def hooks(self, scale: float = 1.0) -> list:
        """``fwd_hooks`` adding ``scale × vectors[l]`` at ``blocks.{l}.hook_resid_post`` (what llama.cpp does)."""

        def adder(v: torch.Tensor):
            def hook(t: torch.Tensor, hook) -> torch.Tensor:
                return t + (scale * v).to(t.device, t.dtype)

            return hook

        return [(act_name("resid_post", layer), adder(v)) for layer, v in self.vectors.items()]

    def check_fits(self, model: HookedLlama) -> None:
        """The vectors fit ``model`` (width, layers 1 … n−1); a one-line ``EditError`` otherwise."""
        if self.d_model != model.d_model:
            raise EditError(f"the control vector has {self.d_model} entries, the model's d_model is {model.d_model}")
        bad = [layer for layer in self.vectors if layer >= model.n_layers]
        if bad:
            raise EditError(f"layer {bad[0]} is out of range: the model has {model.n_layers} layers", param="layer")

    def save(self, path: str | os.PathLike, *, model: HookedLlama | None = None, overwrite: bool = False) -> Path:
        """Write the llama.cpp control-vector GGUF (checked against ``model`` when given, read back by
        llama.cpp's rules before it is moved into place)."""
        if model is not None:
            self.check_fits(model)
            from hooks import config as hooks_config

            hint = {"qwen2": "qwen2", "qwen3": "qwen3"}.get(hooks_config.family(model.config), "llama")
            self.model_hint = hint

        def write(staged: Path) -> None:
            import gguf

            w = gguf.GGUFWriter(str(staged), ARCH)
            w.add_string(f"{ARCH}.model_hint", self.model_hint)
            w.add_int32(f"{ARCH}.layer_count", len(self.vectors))
            w.add_string(GGUF_MARK, GGUF_MARK_VALUE)
            for layer, v in self.vectors.items():
                w.add_tensor(f"direction.{layer}", v.numpy().astype("float32"))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()

        def verify(staged: Path) -> None:
            back = load_control_vector(staged)
            if set(back.vectors) != set(self.vectors) or any(
                not torch.equal(back.vectors[k], self.vectors[k]) for k in self.vectors
            ):
                raise ExportError(f"the control vector read back from {path} differs from the one written")

        return Path(write_file(path, write, kind="gguf", overwrite=overwrite, verify=verify))


def load_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read a control-vector GGUF by llama.cpp's rules: every tensor named ``direction.{l}`` with ``l`` ≥ 1,
    1-D float32, all the same length; several tensors for one layer add up."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist", param="path")
    reader = gguf.GGUFReader(path)
    arch = reader.fields.get("general.architecture")
    hint = reader.fields.get(f"{ARCH}.model_hint")
    vectors: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        head, _, tail = t.name.partition(".")
        if head != "direction" or not tail.isdigit() or int(tail) == 0:
            raise ExportError(f"{path}: tensor {t.name!r} is not direction.<layer ≥ 1> (llama.cpp refuses it)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len([d for d in t.shape if d > 1]) > 1:
            raise ExportError(f"{path}: {t.name} must be a 1-D float32 tensor (llama.cpp refuses it)")
        v = torch.from_numpy(t.data.copy()).reshape(-1).float()
        layer = int(tail)
        vectors[layer] = vectors[layer] + v if layer in vectors else v
    if not vectors:
        raise ExportError(f"{path} holds no direction tensors")
    return ControlVector(
        vectors,
        bytes(hint.parts[hint.data[0]]).decode() if hint is not None else "llama",
        {"file": path.name, "architecture": bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None},
    )


def check_control_vector(
    path: str | os.PathLike,
    gguf_model: str | os.PathLike,
    model: HookedLlama,
    *,
    scale: float = 1.0,
    probe_prompts: Sequence[str] | None = None,
    threads: int | None = None,
) -> dict:
    """Run ``gguf_model`` in llama.cpp with the control vector ``path`` applied at ``scale`` (the vectors as
    llama.cpp's own GGUF parser reads them from the file, ``llamacpp.read_gguf_f32``) and compare its logits on the probes with ``model`` under ``cv.hooks(scale)``:
    ``{"steered": Agreement, "unsteered": Agreement, "shift": mean KL(unsteered ‖ steered) in llama.cpp}``.

    ``steered`` near ``unsteered`` (both at format precision) while ``shift`` is large means llama.cpp applies
    the file as our hooks do."""
    from analyses.divergence import kl_rows

    from .export.probes import probe_inputs, probe_logits
    from .llamacpp import LlamaCppModel, agreement, read_gguf_f32

    cv = load_control_vector(path)
    cv.check_fits(model)
    meta, tensors = read_gguf_f32(path)  # the file as llama.cpp's own GGUF parser reads it
    if meta.get("general.architecture") != ARCH or set(tensors) != {f"direction.{k}" for k in cv.vectors}:
        raise ExportError(f"llama.cpp reads {path} differently: {meta.get('general.architecture')}, {sorted(tensors)}")
    vectors = {int(name.partition(".")[2]): v for name, v in tensors.items()}
    probes = probe_inputs(model, probe_prompts)
    ids = [p.ids[0].tolist() for p in probes]
    plain = probe_logits(model, probes)
    with model.hooks(fwd_hooks=cv.hooks(scale)):
        ours = probe_logits(model, probes)
    with LlamaCppModel(gguf_model, threads=threads) as lm:
        base = [lm.logits(i) for i in ids]
        lm.set_control_vector(vectors, scale)
        steered = [lm.logits(i) for i in ids]
        lm.set_control_vector(None)
    shift = float(torch.cat([kl_rows(b, s) for b, s in zip(base, steered)]).mean())
    return {
        "steered": agreement(ours, steered),
        "unsteered": agreement(plain, base),
        "shift": shift,
        "ours_shift": float(torch.cat([kl_rows(b, s) for b, s in zip(plain, ours)]).mean()),
    }
