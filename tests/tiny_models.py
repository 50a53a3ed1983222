"""Tiny random models for every supported architecture, built from configs (never downloaded)."""

from __future__ import annotations

from contextlib import contextmanager

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

from kvpress_like.cache import CACHE_KWARG

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
SLIDING_ARCHITECTURES = ("mistral_sliding", "qwen2_sliding")  # every layer sliding-window (window 64), tested apart


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 3-layer, 4-query-head / 2-KV-head random model of ``arch`` in fp32 eval mode."""
    kwargs = {**COMMON, **overrides}
    if arch == "llama":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    elif arch == "mistral":
        config, cls = MistralConfig(sliding_window=None, **kwargs), MistralForCausalLM
    elif arch == "mistral_sliding":  # Mistral-7B-v0.1 style: every layer sliding-window (a 64-token window here)
        config, cls = MistralConfig(**{"sliding_window": 64, **kwargs}), MistralForCausalLM
    elif arch == "qwen2_sliding":  # Qwen2 with a sliding window on every layer
        kwargs = {"sliding_window": 64, **kwargs}
        config, cls = Qwen2Config(use_sliding_window=True, max_window_layers=0, **kwargs), Qwen2ForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = Qwen3Config(head_dim=16, **kwargs), Qwen3ForCausalLM
    elif arch == "gemma3":
        kwargs.setdefault("num_hidden_layers", 3)
        config = Gemma3TextConfig(
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
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


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the core test-suite (test_core, test_architectures, test_positions, test_errors, test_cache).
# They never import the package under test, so they can serve as independent references.
# ---------------------------------------------------------------------------------------------------------------------

_MODEL_CACHE: dict = {}


def perturb_norm_weights(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every RMSNorm weight (in place) and return the model.

    Freshly initialised norms have constant weights, so the per-head ``q_norm``/``k_norm`` of Qwen3 and Gemma3 give
    every key the same L2 norm (``sqrt(head_dim)``): key-norm scores then tie and float noise decides the top-k.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.add_(scale * torch.randn(module.weight.shape, generator=generator))
    return model


def cached_tiny_model(
    arch: str, attn_implementation: str = "sdpa", seed: int = 0, perturb_norms: bool = False, **overrides
) -> torch.nn.Module:
    """Like :func:`tiny_model`, but built once per argument set and reused (tests must leave it unmodified).

    ``overrides`` may contain e.g. ``initializer_range=0.2`` for sharper (less uniform) attention;
    ``perturb_norms`` applies :func:`perturb_norm_weights` (well separated key norms).
    """
    key = (arch, attn_implementation, seed, perturb_norms, tuple(sorted(overrides.items())))
    if key not in _MODEL_CACHE:
        model = tiny_model(arch, attn_implementation, seed=seed, **overrides)
        _MODEL_CACHE[key] = perturb_norm_weights(model, seed=seed) if perturb_norms else model
    return _MODEL_CACHE[key]


def random_ids(n: int, batch: int = 1, seed: int = 0, vocab: int = 128, distinct: bool = False) -> torch.Tensor:
    """``[batch, n]`` random token ids in ``[1, vocab)`` (0 is kept free for padding).

    ``distinct=True`` draws each row without repetition: a repeated token has the same key norm in layer 0 (RoPE is a
    rotation), which would tie key-norm scores exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    if distinct:
        return torch.stack([torch.randperm(vocab - 1, generator=generator)[:n] + 1 for _ in range(batch)])
    return torch.randint(1, vocab, (batch, n), generator=generator)


def full_attention_layers(config) -> list[int]:
    """Indices of the layers that use full (not sliding-window) attention, read from the config alone."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [kind] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts into ``(input_ids [B, L], attention_mask [B, L])``."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def attention_hooks(model: torch.nn.Module) -> list[tuple[str, int]]:
    """``(module name, number of hooks)`` for every module that still has forward (pre-)hooks."""
    found = []
    for name, module in model.named_modules():
        count = len(module._forward_hooks) + len(module._forward_pre_hooks)
        if count:
            found.append((name, count))
    return found


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op torch threads, then restore the previous setting.

    Tiny models gain nothing from parallel kernels, and with several test processes on a 2-core machine the default
    thread pool oversubscribes the CPU (a 10x slowdown was observed); test modules use this around their tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prefill(model, ids, p=None):
    """A ``DynamicCache`` holding ``ids`` after one forward, compressed by press ``p`` when given."""
    from transformers import DynamicCache

    from kvpress_like import press

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if p is None:
            model(ids, **{CACHE_KWARG: cache})
        else:
            with press(model, p):
                model(ids, **{CACHE_KWARG: cache})
    return cache


def save_tiny_llama_dir(directory):
    """Save a tiny random Llama (seed 0) with the word-level test tokenizer to ``directory`` (what ``--model DIR``
    loads) and return ``directory``."""
    from tiny_tokenizer import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
