"""Cheap, content-based identity of a model's current weights.

Hashing every byte of a model costs seconds; a strided sample of every tensor
(plus names, shapes, dtypes and the config) costs milliseconds and still changes
whenever a weight is edited, because ROME/MEMIT/FT updates touch every entry of
the rewritten matrix. Statistics caches and patches are keyed by it.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

_SAMPLES_PER_TENSOR = 4096
_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Full hash of one tensor's bytes (used per rewritten weight)."""
    t = tensor.detach().contiguous().cpu()
    data = t.view(torch.uint8) if t.dtype.itemsize else t
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def model_identity(model: nn.Module) -> str:
    """Hash of the architecture alone (config essentials), to tell 'other model' from 'other weights'."""
    cfg = model.config.to_dict()
    essentials = {k: cfg.get(k) for k in _CONFIG_KEYS if k in cfg}
    return hashlib.sha256(json.dumps(essentials, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """Hash of config, parameter names/shapes/dtypes and a strided sample of every parameter."""
    h = hashlib.sha256(model_identity(model).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step].float().cpu().numpy()
        h.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:32]
