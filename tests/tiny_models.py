"""Tiny, randomly initialised causal LMs of every supported family (no download).

By default a model has 4 layers, hidden size 64, 4 attention heads (2 key/value
heads where the family supports grouped-query attention), MLP width 128 and the
vocabulary of the default model's tokenizer (49152), so real text tokenizes.
Weights come from ``torch.manual_seed(seed)``: the same call always builds the
same model. Attention is the library default (sdpa) unless
``attn_implementation`` says otherwise (e.g. ``"eager"``).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 49152
LAYERS = 4
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
INIT_STD = 0.02
MAX_POSITIONS = 2048
# Shorter than the longer test prompts, so Gemma 3's local (sliding-window) layers really mask.
GEMMA_SLIDING_WINDOW = 8

# token ids of the default tokenizer (SmolLM2): <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _configs(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, init: float) -> dict:
    head_dim = hidden // heads
    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=init,
        tie_word_embeddings=False,
        **_TOKENS,
    )
    gpt_like = dict(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=intermediate,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=init,
        **_TOKENS,
    )
    gemma_layers = ["sliding_attention", "sliding_attention", "full_attention"] * layers
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(**gpt_like)),
        "gptj": (GPTJForCausalLM, GPTJConfig(rotary_dim=head_dim // 2, tie_word_embeddings=False, **gpt_like)),
        "gpt_neox": (
            GPTNeoXForCausalLM,
            GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=intermediate,
                rotary_pct=0.25,
                max_position_embeddings=MAX_POSITIONS,
                use_parallel_residual=True,
                initializer_range=init,
                tie_word_embeddings=False,
                **_TOKENS,
            ),
        ),
        "llama": (LlamaForCausalLM, LlamaConfig(**llama_like)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**llama_like)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(head_dim=head_dim, **llama_like)),
        "mistral": (MistralForCausalLM, MistralConfig(sliding_window=None, **llama_like)),
        "gemma3": (
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                head_dim=head_dim,
                query_pre_attn_scalar=head_dim,
                sliding_window=GEMMA_SLIDING_WINDOW,
                layer_types=gemma_layers[:layers],
                **{**llama_like, "tie_word_embeddings": True},
            ),
        ),
        "phi3": (Phi3ForCausalLM, Phi3Config(**llama_like)),
    }


FAMILIES: tuple[str, ...] = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3")


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    intermediate: int = INTERMEDIATE,
    init: float = INIT_STD,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A tiny random model of ``family`` (a key of ``ARCHITECTURES``), float32, in eval mode.

    ``kv_heads`` applies to families with grouped-query attention (the GPT-2/J/NeoX ones have none);
    ``init`` is the config's ``initializer_range`` (std of the random weights).
    """
    configs = _configs(hidden, layers, heads, kv_heads, intermediate, init)
    if family not in configs:
        raise KeyError(f"no tiny model for {family!r}; known: {', '.join(configs)}")
    cls, config = configs[family]
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(config)
    model.to(torch.float32)
    model.eval()
    return model
