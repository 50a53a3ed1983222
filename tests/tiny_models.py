"""Tiny random models for every supported architecture, built from configs (never downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 3-layer, 4-query-head / 2-KV-head random model of ``arch`` in fp32 eval mode."""
    kwargs = {**COMMON, **overrides}
    if arch == "llama":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    elif arch == "mistral":
        config, cls = MistralConfig(sliding_window=None, **kwargs), MistralForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = Qwen3Config(head_dim=16, **kwargs), Qwen3ForCausalLM
    elif arch == "gemma3":
        kwargs.setdefault("num_hidden_layers", 3)
        config = Gemma3TextConfig(
            head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention", "full_attention"],
            **kwargs,
        )
        cls = Gemma3ForCausalLM
    elif arch == "phi3":
        config, cls = Phi3Config(pad_token_id=0, **kwargs), Phi3ForCausalLM
    else:
        raise ValueError(arch)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(config).eval()
    return model
