"""Where each part of a model lives, and device maps checked before a model is loaded.

A model loaded with a device map (``load_model(..., device_map=...)``) is spread by
``accelerate`` over several devices: each mapped module computes on its own device, and
accelerate's hooks move a module's inputs there. factedit makes its own tensors (input
ids, noise, deltas, restored states, index tensors) and calls some modules directly (the
LM head, a rewrite module), so it must know where each module computes:
:func:`module_device` (a module's execution device), :func:`input_device` (the
embedding's, where input ids go). ``next(model.parameters()).device`` is wrong for such a
model: it is the first module's device, or ``meta`` when that module is offloaded.

Offloaded modules (``"disk"``, and ``"cpu"`` next to a GPU) keep no weights on the module
(their parameters are ``meta`` tensors); accelerate reads them from the checkpoint (or a
CPU copy) at every forward. Reading through them is sound, writing to them is not (a write
would go to the ``meta`` placeholder and be lost), so :func:`require_resident` refuses edits
of offloaded weights in one line.

Device maps: ``"auto"``, a ``{module name: device}`` dict, or a JSON file holding one.
:func:`parse_device_map` checks the form and every device (``cpu``, ``cuda``, ``cuda:N``,
an integer GPU index, ``mps``, ``disk``) before anything is read; :func:`check_device_map`
checks the module names against an empty (``meta``) model of the config before any weight
is read.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factedit.errors import FactEditError
from factedit.integrity import first_line
from factedit.models.architectures import get_parameter
from factedit.models.devices import available_devices, resolve_device

DISK = "disk"
AUTO = "auto"
DeviceMap = dict[str, str]
_CPU = torch.device("cpu")
_MAX_LISTED = 3


# -- where modules compute --------------------------------------------------------------------------------------------


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` (None when it has none)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def _resident_device(module: nn.Module) -> torch.device | None:
    for t in itertools.chain(module.parameters(), module.buffers()):  # stops at the first resident one
        if t.device.type != "meta":
            return t.device
    return None


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first
    parameter or buffer that is not offloaded, else the CPU."""
    return _hook_device(module) or _resident_device(module) or _CPU


def module_device(model: nn.Module, name: str) -> torch.device:
    """Where the module ``name`` of ``model`` computes (:func:`device_of`); a module with neither a hook
    nor tensors of its own (an activation) computes where its nearest placed ancestor does."""
    module = model.get_submodule(name)
    found = _hook_device(module) or _resident_device(module)
    parts = name.split(".") if name else []
    while found is None and parts:
        parts.pop()
        parent = model.get_submodule(".".join(parts))
        found = _hook_device(parent)
    return found or _resident_device(model) or _CPU


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the token embedding."""
    return device_of(model.get_input_embeddings())


def model_devices(model: nn.Module) -> list[torch.device]:
    """Every device some module of ``model`` computes on, the embedding's first (e.g. for ``fork_rng``)."""
    found = [input_device(model)]
    for module in model.modules():
        device = _hook_device(module) or next((t.device for t in module.parameters(recurse=False)), None)
        if device is not None and device.type != "meta" and device not in found:
            found.append(device)
    return found


def device_map_of(model: nn.Module) -> DeviceMap | None:
    """The device map the model was loaded with (``None``: loaded whole onto one device)."""
    mapping = getattr(model, "hf_device_map", None)
    return {str(k): _device_label(v) for k, v in mapping.items()} if isinstance(mapping, Mapping) else None


def is_offloaded(tensor: torch.Tensor) -> bool:
    """True for a weight accelerate keeps off the module (read from disk or a CPU copy at each forward)."""
    return tensor.device.type == "meta"


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor | None:
    """The value accelerate holds for the offloaded tensor ``name`` (read from the checkpoint for ``disk``,
    the CPU copy next to a GPU); ``None`` when ``name`` is not offloaded or no hook holds it.

    For whoever must read every weight of a model with offloaded layers (a fingerprint, a save)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    tensor = getattr(module, leaf, None)
    if not isinstance(tensor, torch.Tensor) or not is_offloaded(tensor):
        return None
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(h, "weights_map", None)
        if weights is not None and leaf in weights:
            return weights[leaf]
    return None


def require_resident(model: nn.Module, names: Iterable[str], what: str) -> None:
    """Refuse, in one line, to ``what`` weights that are offloaded (nothing is changed)."""
    offloaded = [name for name in names if is_offloaded(get_parameter(model, name))]
    if offloaded:
        mapping = device_map_of(model) or {}
        where = next((dev for mod, dev in mapping.items() if _covers(mod, offloaded[0])), "an offload device")
        raise FactEditError(
            f"cannot {what}: {_listed(offloaded)} is offloaded to {where} by the device map (accelerate reads it "
            "from there at each forward, so a change would be lost); map that layer to cpu or a GPU"
        )


# -- device maps -----------------------------------------------------------------------------------------------------


def _device_label(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    return str(value)


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _covers(module: str, tensor_name: str) -> bool:
    return module == "" or tensor_name == module or tensor_name.startswith(module + ".")


def parse_device_map(spec: str | Path | Mapping[str, Any] | None) -> str | DeviceMap | None:
    """``spec`` as ``None``, ``"auto"`` or a ``{module name: device}`` dict whose devices all exist here.

    A string other than ``auto`` is the path of a JSON file holding the dict. Refused in one line,
    before anything is read: a missing or unreadable file, invalid JSON, not an object, an empty map,
    a module name that is not a string, a device that is unknown or not on this machine (``meta``
    included: it holds no weights), and a map that puts every module on ``disk``.
    """
    if spec is None:
        return None
    if isinstance(spec, (str, Path)) and str(spec).strip().lower() == AUTO:
        return AUTO
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        source = f"device map file {path}"
        if not path.is_file():
            raise FactEditError(f"{source} not found: give 'auto' or a JSON file of {{module name: device}}")
        try:
            raw = json.loads(path.read_bytes())
        except OSError as exc:
            raise FactEditError(f"cannot read {source}: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FactEditError(f"{source} is not valid JSON ({first_line(exc)}); fix the file") from exc
    elif isinstance(spec, Mapping):
        source, raw = "device map", dict(spec)
    else:
        raise FactEditError(f"device map must be 'auto', a JSON file or a dict, not {type(spec).__name__}")
    if not isinstance(raw, dict):
        raise FactEditError(f"{source} must hold a JSON object {{module name: device}}, not a {type(raw).__name__}")
    if not raw:
        raise FactEditError(f'{source} is empty: map each module to a device, e.g. {{"": "cpu"}}')
    mapping: DeviceMap = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise FactEditError(f"{source}: module names must be strings, got {name!r}")
        mapping[name.strip()] = _check_device(value, f"{source}: module {name!r}")
    if set(mapping.values()) == {DISK}:
        raise FactEditError(f"{source} puts every module on disk: map at least one to a device that computes")
    return mapping


def _check_device(value: Any, where: str) -> str:
    """One device of a map as accelerate takes it: ``cpu``, ``cuda:N``, ``mps`` or ``disk``."""
    here = ", ".join([*available_devices(), DISK])
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FactEditError(f"{where}: device {value!r} is not a device name (available here: {here})")
    if isinstance(value, int):
        if value < 0:
            raise FactEditError(f"{where}: device {value} is not a GPU index (available here: {here})")
        value = f"cuda:{value}"
    label = value.strip().lower()
    if label == DISK:
        return DISK
    if label == "meta":
        raise FactEditError(f"{where}: 'meta' holds no weights; use a device or 'disk' (available here: {here})")
    try:
        device = resolve_device(label)
    except FactEditError as exc:
        raise FactEditError(f"{where}: {exc}") from None
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def check_device_map(mapping: DeviceMap, skeleton: nn.Module, source: str = "device map") -> None:
    """Refuse a map that does not fit the model (``skeleton``: the model built on ``meta`` from its config).

    In one line: a module name the model does not have; a map that splits a block (accelerate keeps
    each transformer block whole: its residual stream is one tensor); a module named together with one
    inside it (``""``, the whole model, included: accelerate cannot load that); a parameter or buffer
    that no mapped module contains.
    """
    modules = dict(skeleton.named_modules())
    unknown = [name for name in mapping if name not in modules]
    if unknown:
        lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)]
        hint = f" (its blocks are {lists[0]}.0 .. {lists[0]}.{len(modules[lists[0]]) - 1})" if lists else ""
        raise FactEditError(f"{source} names modules this model does not have: {_listed(unknown)}{hint}")
    whole = set(getattr(skeleton, "_no_split_modules", None) or ())
    for name in mapping:
        parts = name.split(".") if name else []
        for i in range(len(parts)):
            outer = ".".join(parts[:i])  # "" first: the whole model
            if outer in mapping:
                raise FactEditError(f"{source} names both {outer!r} and {name!r}, which is inside it: keep one")
            if type(modules[outer]).__name__ in whole:
                raise FactEditError(
                    f"{source} splits the block {outer!r} (it maps {name!r}): map whole blocks, e.g. {outer!r}"
                )
    tensors = [n for n, _ in skeleton.named_parameters()] + [n for n, _ in skeleton.named_buffers()]
    missing = [n for n in tensors if not any(_covers(module, n) for module in mapping)]
    if missing:
        raise FactEditError(f"{source} gives no device to {_listed(missing)}: map the modules holding them too")


def bytes_per_device(mapping: DeviceMap, skeleton: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the weights each device of ``mapping`` holds once loaded at ``dtype`` (floating tensors
    are cast), from the ``meta`` skeleton; the most specific mapped name wins."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    totals: dict[str, int] = {}
    names = sorted(mapping, key=len, reverse=True)
    for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers()):
        owner = next((m for m in names if _covers(m, name)), None)
        if owner is None:
            continue
        size = t.numel() * (itemsize if t.is_floating_point() else t.element_size())
        totals[mapping[owner]] = totals.get(mapping[owner], 0) + size
    return totals
