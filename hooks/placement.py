"""Where a model's weights live: device maps computed by accelerate, dispatch and offload.

``device_map`` takes what transformers' ``from_pretrained`` takes: ``"auto"``, ``"balanced"``,
``"balanced_low_0"``, ``"sequential"`` (computed by ``accelerate.infer_auto_device_map`` within
``max_memory``, spilling to ``"cpu"`` and then ``"disk"`` when the weights do not fit), one device
(``"cuda:0"``, ``"cpu"``, ``0``), or a dict from HF module names to devices
(``{"model.embed_tokens": 0, "model.layers.0": 0, …, "model.layers.31": "disk", "lm_head": "cpu"}``).
A decoder layer is never split; a layer offloaded to the CPU (on a GPU machine) or to disk is loaded
whole, onto its execution device, when its forward starts, and dropped after it (accelerate's
``AlignDevicesHook``). Every map is checked (names, coverage, tied weights, devices present) before a
byte of the weights is read; each failure is one ``InputError`` line with ``param="device_map"``.

Outside a forward pass, the weights of an offloaded layer are on the meta device; ``onloaded(model,
"model.layers.3")`` (``model.onloaded(...)``) brings them in for a ``with`` block and keeps what the
block changed (an edit) in the offload storage's memory, where the next forward finds it.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterator

import torch
from torch import nn

from .errors import InputError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
NO_SPLIT = ["DecoderLayer"]  # never split across devices; offloaded layers load whole (o_proj read by hook_result)
Device = int | str  # accelerate's spelling: a GPU index, "cpu", "disk" or "mps"


# --------------------------------------------------------------------------- arguments
def normalize_device(value, param: str = "device_map", where: str = "") -> Device:
    """``0``, ``"cuda"``, ``"cuda:1"``, ``torch.device("cuda", 1)``, ``"cpu"``, ``"disk"``, ``"mps"`` → accelerate's
    spelling (a GPU index or a name)."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("cpu", "disk", "mps"):
            return text
        if text == "cuda":
            return 0
        if text.startswith("cuda:") and text[5:].isdigit():
            return int(text[5:])
    at = f" for {where!r}" if where else ""
    raise InputError(f"{param} names device {value!r}{at}; use a GPU index (0, 'cuda:1'), 'cpu' or 'disk'", param=param)


def torch_device(device: Device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def parse_max_memory(max_memory) -> dict[Device, int] | None:
    """``{0: "70GiB", "cpu": "200GB", "disk": …}`` → bytes per device (accelerate's size strings)."""
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict) or not max_memory:
        raise InputError(
            f"max_memory must be a dict of device -> size, e.g. {{0: '70GiB', 'cpu': '100GiB'}}, got {max_memory!r}",
            param="max_memory",
        )
    from accelerate.utils import convert_file_size_to_int

    out: dict[Device, int] = {}
    for key, value in max_memory.items():
        device = normalize_device(key, "max_memory")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            size = None
        elif isinstance(value, int):
            size = value if value >= 0 else None
        else:
            try:
                size = convert_file_size_to_int(value.strip())
            except (ValueError, AttributeError):
                size = None
        if size is None:
            raise InputError(
                f"max_memory[{key!r}] = {value!r} is not a size; write bytes or a string such as '20GiB' or '500MB'",
                param="max_memory",
            )
        out[device] = size
    return out


def check_available(device: Device, where: str = "") -> None:
    """A GPU index must name a GPU this machine has (one line, before any work)."""
    at = f" ({where})" if where else ""
    if isinstance(device, int):
        n = torch.cuda.device_count()
        if device >= n:
            raise InputError(
                f"device_map puts weights on cuda:{device}{at} but this machine has {n} CUDA device(s); "
                "use 'cpu', 'disk' or a GPU it has",
                param="device_map",
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device_map puts weights on mps{at} but MPS is not available here", param="device_map")


# --------------------------------------------------------------------------- computing and checking maps
def device_map_for(
    model: nn.Module,
    device_map=None,
    *,
    device=None,
    max_memory=None,
    dtype: torch.dtype | None = None,
    check_devices: bool = True,
) -> dict[str, Device]:
    """The device map a load will use, checked: ``{module name: device}`` (``{"": device}`` for one
    device). ``model`` may be on the meta device (nothing is read)."""
    if device_map is not None and device is not None:
        raise InputError(
            "pass device or device_map, not both (device_map='cuda:0' puts everything there)", param="device"
        )
    if max_memory is not None and not (isinstance(device_map, str) and device_map in STRATEGIES):
        raise InputError(
            "max_memory bounds the map accelerate computes: pass it with device_map='auto', 'balanced', "
            "'balanced_low_0' or 'sequential'",
            param="max_memory",
        )
    if device_map is None:
        mapping: dict[str, Device] = {"": normalize_device(device if device is not None else "cpu", "device")}
    elif isinstance(device_map, str) and device_map in STRATEGIES:
        mapping = infer(model, device_map, parse_max_memory(max_memory), dtype)
    elif isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        try:
            mapping = {"": normalize_device(device_map)}
        except InputError:
            raise InputError(
                f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential', a device ('cuda:0', "
                f"'cpu') or a dict of module name -> device, got {device_map!r}",
                param="device_map",
            ) from None
    elif isinstance(device_map, dict):
        if not device_map:
            raise InputError(
                "device_map is an empty dict; map module names to devices or use 'auto'", param="device_map"
            )
        mapping = {}
        for name, value in device_map.items():
            if not isinstance(name, str):
                raise InputError(f"device_map keys are module names (str), got {name!r}", param="device_map")
            mapping[name] = normalize_device(value, where=name)
        check_device_map(model, mapping)
    else:
        raise InputError(
            f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential', a device or a dict of "
            f"module name -> device, got {device_map!r}",
            param="device_map",
        )
    if check_devices:
        for name, dev in mapping.items():
            check_available(dev, name)
    return mapping


def infer(model: nn.Module, strategy: str, max_memory: dict | None, dtype) -> dict[str, Device]:
    """accelerate's map for ``strategy`` within ``max_memory`` (default: what is free on each device)."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    memory = get_max_memory(dict(max_memory) if max_memory is not None else None)
    if strategy != "sequential":
        memory = get_balanced_memory(
            model,
            max_memory=memory,
            no_split_module_classes=NO_SPLIT,
            dtype=dtype,
            low_zero=strategy == "balanced_low_0",
        )
    mapping = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=NO_SPLIT, dtype=dtype)
    holders = {name for name, module in model.named_modules() if _holds_tensors(module)}
    # hook points hold nothing: a map entry there would give them a device hook (and make them "active")
    kept = {k: v for k, v in mapping.items() if k == "" or k in holders or any(h.startswith(k + ".") for h in holders)}
    return kept or {"": "cpu"}


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def device_of(mapping: dict[str, Device], tensor_name: str) -> Device:
    """The device the longest matching prefix of ``mapping`` gives ``tensor_name``."""
    best, found = -1, None
    for key, device in mapping.items():
        if (key == "" or tensor_name == key or tensor_name.startswith(key + ".")) and len(key) > best:
            best, found = len(key), device
    if found is None:
        raise KeyError(tensor_name)
    return found


def check_device_map(model: nn.Module, mapping: dict[str, Device]) -> None:
    """Names are modules of the model, every weight gets a device, tied weights share one."""
    modules = dict(model.named_modules())
    for name in mapping:
        if name and name not in modules:
            close = difflib.get_close_matches(name, [n for n, m in modules.items() if _holds_tensors(m) or n], n=3)
            raise InputError(
                f"device_map names {name!r}, which is not a module of this model (closest: "
                f"{', '.join(close) or 'none'}; HF names such as 'model.layers.3', 'model.embed_tokens', 'lm_head')",
                param="device_map",
            )
    uncovered = []
    for tensor_name in model.state_dict():
        try:
            device_of(mapping, tensor_name)
        except KeyError:
            uncovered.append(tensor_name)
    if uncovered:
        modules_left: list[str] = []
        for n in uncovered:  # a layer by its block ("model.layers.1"), anything else by its module
            parts = n.split(".")
            part = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else n.rsplit(".", 1)[0]
            if part not in modules_left:
                modules_left.append(part)
        more = f" and {len(modules_left) - 3} more" if len(modules_left) > 3 else ""
        raise InputError(
            f"device_map gives no device to {', '.join(modules_left[:3])}{more}; map every module "
            "(or '' for the rest) or use device_map='auto'",
            param="device_map",
        )
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and head.weight is embed.weight:
        a, b = device_of(mapping, "model.embed_tokens.weight"), device_of(mapping, "lm_head.weight")
        if a != b:
            raise InputError(
                f"device_map puts the tied embeddings on {a!r} and lm_head on {b!r}; tied weights are one "
                "tensor: give model.embed_tokens and lm_head one device",
                param="device_map",
            )


def explicit(model: nn.Module, mapping: dict[str, Device]) -> dict[str, Device]:
    """The same placement with one entry per module that holds tensors, never ``""`` beside other keys
    (accelerate's dispatch attaches its hooks by these names): each part takes the device of the longest
    key above it, and a part with a more specific key inside is split into its children."""
    if set(mapping) == {""}:
        return dict(mapping)
    out: dict[str, Device] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        inside = [k for k in mapping if k and (not prefix or k.startswith(prefix + "."))]
        if prefix and not inside:
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                try:
                    out[prefix] = device_of(mapping, prefix + ".")
                except KeyError:  # only derived buffers (the RoPE tables): they stay where they were built
                    pass
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out


def main_device(mapping: dict[str, Device]) -> Device:
    """Where activations start: the first GPU (or MPS) in the map, else the CPU."""
    for device in mapping.values():
        if device not in ("cpu", "disk"):
            return device
    return "cpu"


def execution_device_of(mapping: dict[str, Device], tensor_name: str) -> torch.device:
    """Where the module holding ``tensor_name`` runs: its device, or the main device when offloaded."""
    device = device_of(mapping, tensor_name)
    main = main_device(mapping)
    if device == "disk" or (device == "cpu" and main != "cpu"):
        device = main
    return torch_device(device)


def needs_dispatch(mapping: dict[str, Device]) -> bool:
    return len(set(mapping.values())) > 1 or "disk" in mapping.values()


# --------------------------------------------------------------------------- dispatch and execution
def dispatch(model: nn.Module, mapping: dict[str, Device], *, state_dict=None, offload_index=None, offload_dir=None):
    """Attach accelerate's device hooks for ``mapping`` (tensors already on their devices; offloaded
    ones on the meta device, their values in ``state_dict`` / ``offload_index``)."""
    from accelerate import dispatch_model

    mapping = explicit(model, mapping)
    dispatch_model(
        model,
        mapping,
        main_device=main_device(mapping),
        state_dict=state_dict,
        offload_dir=offload_dir,
        offload_index=offload_index,
        preload_module_classes=NO_SPLIT,
    )
    return model


def _align_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        if hasattr(h, "execution_device"):
            return h
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs: its accelerate hook's execution device, else its first tensor's device."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        dev = hook.execution_device
        return torch_device(dev) if isinstance(dev, (int, str)) else torch.device(dev)
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def offloading_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose weights are kept off its execution device."""
    if not getattr(model, "hf_device_map", None):
        return []
    out = []
    for name, module in model.named_modules():
        hook = _align_hook(module)
        if hook is not None and hook.offload and hook.weights_map is not None:
            out.append((name, module))
    return out


def has_offload(model: nn.Module) -> bool:
    return bool(offloading_modules(model))


@contextlib.contextmanager
def onloaded(model: nn.Module, *names: str, writes: bool = False) -> Iterator[nn.Module]:
    """Inside the block, the offloaded weights of the modules ``names`` (and of those inside them; every
    offloaded module when none is named) are real tensors on their execution device. With ``writes``,
    tensors the block changed or added (an edit, a new bias) are kept when it ends, in the offload
    storage's memory on the execution device (the next forward reads them from there); the rest go back
    to the meta device. A model without offloaded weights is left alone."""
    from accelerate.utils import align_module_device

    selected = [
        (name, module)
        for name, module in offloading_modules(model)
        if not names or any(name == n or name.startswith(n + ".") or n.startswith(name + ".") for n in names)
    ]
    with contextlib.ExitStack() as stack:
        for _, module in selected:
            stack.enter_context(align_module_device(module))  # exits last: the weights leave after the keep
            if writes:
                stack.enter_context(_keep_changes(module))
        yield model


@contextlib.contextmanager
def _keep_changes(module: nn.Module) -> Iterator[None]:
    """Store the tensors of ``module`` that differ from its offload storage's values, on exit."""
    weights = _align_hook(module).weights_map  # a PrefixedDataset over accelerate's OffloadedWeightsLoader
    store, prefix = weights.dataset, weights.prefix
    before = {n: t for n, t in module.named_parameters()}
    try:
        yield
    finally:
        for n, t in module.named_parameters():
            key = prefix + n
            if before.get(n) is t and key in store and _same(store[key], t):
                continue
            store.state_dict[key] = t.detach()  # the edited storage itself: undo journals restore into it
            if key not in store.all_keys:
                store.all_keys.append(key)


def _same(stored: torch.Tensor, t: torch.Tensor) -> bool:
    return stored.shape == t.shape and torch.equal(stored.to(t.device, t.dtype), t.detach())
