"""Run the top decoder blocks on a few live tokens against cached prefix keys/values, at the cost of the work.

Why: the value optimisation (ROME's v*, MEMIT's z) re-runs the blocks above the edited one on the
tokens from the subject's last one on, twenty times per edit. Through the model's own ``forward``
each of those small passes also pays for mask construction, cache objects, the attention kernel's
set-up, the stubs of the blocks below and the edited block itself. :class:`LiveBlocks` does the same
arithmetic with the block's own modules (its projections, norms, activation and the model's rotary
embedding are called as they are), skips the edited block (the change enters the residual stream as
is), attends to the cached prefix with one grouped-query product per block, and at the top block
sends only the positions the loss reads through the MLP (nothing above reads the others). Fusing
q/k/v or gate/up into one product was measured and left out: on a CPU the wider products ran slower
than the separate ones (docs/performance.md).

It serves Llama-style blocks (Llama, Mistral, Qwen2, Qwen3 with its per-head q/k norms): pre-norm,
rotary positions, grouped-query attention with the 1/sqrt(head_dim) scale, a gated MLP, no post-norms,
no soft-capping. :meth:`LiveBlocks.for_model` returns None for anything else (Gemma 3, GPT-2, ...,
offloaded weights, windows shorter than the sequence), and callers use the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from factedit.models.architectures import ArchSpec, get_module
from factedit.models.placement import device_of
from factedit.models.runtime import text_config

LIVE_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_BLOCK_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


@dataclass
class _Block:
    """One block's modules, called as the model calls them."""

    norm1: nn.Module
    norm2: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o_proj: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act: nn.Module
    device: torch.device


@dataclass
class LiveBatch:
    """What stays fixed over the steps: the prefix states, masks and rotary angles of one batch of rows."""

    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block from ``first``: (B, kv heads, P, head_dim)
    allowed: torch.Tensor  # (B, 1, S, P + S) bool: which keys each live query sees
    cos: torch.Tensor  # (B, 1, S, head_dim)
    sin: torch.Tensor
    read_rows: torch.Tensor  # (R,) row and live position of each vector the caller reads
    read_pos: torch.Tensor

    def select(self, rows: torch.Tensor, read_rows: torch.Tensor, read_pos: torch.Tensor) -> LiveBatch:
        """The same batch for a subset of rows, reading at ``read_rows`` (indices into the subset)."""
        return LiveBatch(
            [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.prefix_kv],
            self.allowed[rows.to(self.allowed.device)],
            self.cos[rows.to(self.cos.device)],
            self.sin[rows.to(self.sin.device)],
            read_rows,
            read_pos,
        )


class LiveBlocks:
    """Blocks ``first .. n-1`` of a Llama-style decoder and the final norm, run on live tokens."""

    def __init__(self, model: nn.Module, arch: ArchSpec, first: int) -> None:
        config = text_config(model)
        self.first = first
        self.head_dim = _head_dim(config)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.rotary = get_module(model, "model.rotary_emb")
        self.final_norm = get_module(model, arch.final_norm)
        blocks = get_module(model, arch.blocks)
        self.blocks = [_parts(blocks[i]) for i in range(first, len(blocks))]

    @classmethod
    def for_model(cls, model: nn.Module, arch: ArchSpec, first: int, max_position: int) -> LiveBlocks | None:
        """The runner for blocks ``first ..`` of ``model``, or None where it cannot reproduce the model exactly."""
        if arch.family not in LIVE_FAMILIES:
            return None
        config = text_config(model)
        blocks = get_module(model, arch.blocks)
        if not 0 <= first < len(blocks) or getattr(config, "hidden_act", None) not in ("silu", "swish"):
            return None
        if getattr(config, "attn_logit_softcapping", None) or getattr(config, "mlp_bias", False):
            return None
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window is not None and max_position >= window:
            return None  # a window would hide part of the prefix: the model's own masks apply it
        try:
            get_module(model, "model.rotary_emb")
        except Exception:  # noqa: BLE001 - any family without a shared rotary module is served by the model
            return None
        for i in range(first, len(blocks)):
            block = blocks[i]
            if not all(hasattr(block, p) for p in _BLOCK_PARTS):
                return None
            if not all(hasattr(block.self_attn, p) for p in _ATTN_PARTS) or not all(
                hasattr(block.mlp, p) for p in _MLP_PARTS
            ):
                return None
            if abs(float(getattr(block.self_attn, "scaling", 0.0)) - _head_dim(config) ** -0.5) > 1e-12:
                return None
            if any(p.device.type == "meta" for p in block.parameters()):
                return None  # offloaded by accelerate: the weights are not where the block computes
        return cls(model, arch, first)

    def prepare(
        self,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_ok: torch.Tensor,
        live_ok: torch.Tensor,
        position_ids: torch.Tensor,
        read_rows: torch.Tensor,
        read_pos: torch.Tensor,
        dtype: torch.dtype,
    ) -> LiveBatch:
        """Fix the masks and angles of a batch: ``prefix_ok`` (B, P) and ``live_ok`` (B, S) say which cached
        and live slots hold real tokens, ``position_ids`` (B, S) the live tokens' positions.

        ``prefix_kv`` are the cache's (post-rotary) keys and values of every block (only ``first ..`` are used).
        """
        s = live_ok.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=live_ok.device).tril()
        live = causal[None] & live_ok[:, None, :]
        allowed = torch.cat([prefix_ok[:, None, :].expand(-1, s, -1), live], dim=2)[:, None]
        probe = torch.zeros(1, dtype=dtype, device=position_ids.device)
        cos, sin = self.rotary(probe, position_ids)
        return LiveBatch(
            [(k, v) for k, v in prefix_kv[self.first :]], allowed, cos[:, None], sin[:, None], read_rows, read_pos
        )

    def run(self, batch: LiveBatch, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm's output (R, d) at the read positions, from the input of block ``first`` (B, S, d)."""
        last = len(self.blocks) - 1
        for i, (block, (past_k, past_v)) in enumerate(zip(self.blocks, batch.prefix_kv, strict=True)):
            hidden = hidden.to(block.device)
            hidden = hidden + self._attention(block, batch, block.norm1(hidden), past_k, past_v)
            if i == last:  # nothing above the top block reads the other positions
                hidden = hidden[batch.read_rows.to(hidden.device), batch.read_pos.to(hidden.device)]
            x = block.norm2(hidden)
            hidden = hidden + block.down_proj(block.act(block.gate_proj(x)) * block.up_proj(x))
        return self.final_norm(hidden.to(device_of(self.final_norm)))

    def _attention(self, block: _Block, batch: LiveBatch, x: torch.Tensor, past_k, past_v) -> torch.Tensor:
        b, s, _ = x.shape
        hd, h, kvh = self.head_dim, self.heads, self.kv_heads
        q = block.q_proj(x).view(b, s, h, hd)
        k = block.k_proj(x).view(b, s, kvh, hd)
        v = block.v_proj(x)
        if block.q_norm is not None:
            q, k = block.q_norm(q), block.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, kvh, hd).transpose(1, 2)
        cos, sin = batch.cos.to(x.device, x.dtype), batch.sin.to(x.device, x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys = torch.cat([past_k, k], dim=2)  # (B, kvh, P + S, hd)
        values = torch.cat([past_v, v], dim=2)
        # Grouped queries: the g query heads of one key head attend as one (g * S)-row block, no key repeat.
        g = h // kvh
        qg = q.reshape(b, kvh, g * s, hd)
        scores = torch.matmul(qg, keys.transpose(2, 3)) * (hd**-0.5)
        allowed = batch.allowed.to(x.device)  # (B, 1, S, P + S)
        allowed = allowed[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, 1, g * s, -1)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values).reshape(b, h, s, hd).transpose(1, 2).reshape(b, s, h * hd)
        return block.o_proj(out)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _parts(block: nn.Module) -> _Block:
    attn, mlp = block.self_attn, block.mlp
    return _Block(
        norm1=block.input_layernorm,
        norm2=block.post_attention_layernorm,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        q_norm=getattr(attn, "q_norm", None),
        k_norm=getattr(attn, "k_norm", None),
        o_proj=attn.o_proj,
        gate_proj=mlp.gate_proj,
        up_proj=mlp.up_proj,
        down_proj=mlp.down_proj,
        act=mlp.act_fn,
        device=attn.q_proj.weight.device,
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
