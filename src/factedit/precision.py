"""Mixed precision: run matrix products in bfloat16/float16 while weights and sums stay float32.

On CPUs with AMX or AVX-512 BF16 (recent Xeons) a bfloat16 matrix product is several times faster
than a float32 one, so the forward-heavy jobs (causal tracing above all) offer it as an option.
It is never the default: results then differ from float32 ones at the level of bfloat16 rounding
(the tracing docs report how much on the default model).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from factedit.errors import FactEditError

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """Validate an autocast option (``None``/"none"/"float32" = off)."""
    if name is None or name in ("none", "float32", "fp32"):
        return None
    if name not in AUTOCAST_DTYPES:
        raise FactEditError(f"unknown autocast dtype {name!r}: choose bfloat16, float16 or none")
    return AUTOCAST_DTYPES[name]


def autocast(model: nn.Module, name: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the model's device type, or a no-op when ``name`` is off."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    # the first weight that is really somewhere: offloaded layers (models/placement.py) hold "meta" placeholders
    device_type = next((p.device.type for p in model.parameters() if p.device.type != "meta"), "cpu")
    return torch.autocast(device_type=device_type, dtype=dtype)
