"""Which device a model runs on: ``--device`` parsed and checked before anything is loaded.

``torch.device("banana")`` raises a bare ``RuntimeError`` and ``model.to("cuda")`` on a machine
without CUDA fails only after the model was read from disk (seconds to minutes), with a traceback.
:func:`resolve_device` turns every such mistake into one line that lists what this machine has.
"""

from __future__ import annotations

import torch

from factedit.errors import FactEditError

SUPPORTED_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """What this machine can run on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``spec`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, or a ``torch.device``) as a device that exists here.

    Refused with the list of available devices: an unparsable name, a device type factedit does
    not support, CUDA or MPS where they are not available, and a CUDA index past the last GPU.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return torch.device("cpu")
    here = ", ".join(available_devices())
    if isinstance(spec, torch.device):
        device = spec
    else:
        try:
            device = torch.device(spec.strip().lower())
        except (RuntimeError, ValueError, TypeError):
            raise FactEditError(
                f"unknown device {spec!r}: use cpu, cuda, cuda:N or mps (available here: {here})"
            ) from None
    if device.type not in SUPPORTED_TYPES:
        raise FactEditError(
            f"device {str(spec)!r} is not supported: use cpu, cuda, cuda:N or mps (available here: {here})"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FactEditError(
                f"device {str(spec)!r} is not available: this machine has no usable CUDA GPU (available: {here})"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FactEditError(
                f"device {str(spec)!r} does not exist: this machine has {count} CUDA GPU(s) (available: {here})"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise FactEditError(f"device {str(spec)!r} is not available: MPS needs Apple silicon (available: {here})")
    if device.type == "cpu" and device.index not in (None, 0):
        raise FactEditError(f"device {str(spec)!r} does not exist: there is one CPU device, 'cpu' (available: {here})")
    return device
