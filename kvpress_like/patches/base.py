"""What a press needs to know about one architecture family, and the shared projection helpers.

Every supported family in transformers 5.x computes attention the same way: q/k/v projections (separate, or one
fused ``qkv_proj``), optional per-head ``q_norm``/``k_norm`` before RoPE, RoPE, then
``past_key_values.update(k, v, layer_idx)``. An :class:`Architecture` records the family's RoPE function and which
model types it covers; queries and keys are recomputed from a layer's input hidden states with the layer's own
projections and norms, never by undoing RoPE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """An architecture family a press can hook.

    Attributes:
        name: registry name, e.g. ``"llama"``.
        model_types: the ``config.model_type`` values this family covers.
        apply_rope: the family's ``apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)``.
    """

    name: str
    model_types: tuple[str, ...]
    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM or of its base model."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        layers = getattr(base, "layers", None)
        if layers is None:
            raise TypeError(f"{type(model).__name__} has no decoder `layers`; cannot hook architecture {self.name!r}")
        return layers

    def attention(self, decoder_layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer."""
        return decoder_layer.self_attn

    def compressible_layers(self, config) -> list[int]:
        """Indices of the layers a press compresses: those with full attention; in a model whose every layer is
        sliding-window (Mistral-7B-v0.1, Qwen2 with a sliding window on all layers), the sliding-window layers
        (compressed when a prefill fits in the window). Models mixing both (Gemma3) keep their sliding layers."""
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = layer_types(config)
        full = [i for i, kind in enumerate(types) if kind == "full_attention"]
        return full or [i for i, kind in enumerate(types) if kind == "sliding_attention"]

    def sliding_window(self, config, layer_idx: int) -> int | None:
        """The sliding window of layer ``layer_idx`` (``None`` for a full-attention layer)."""
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if layer_types(config)[layer_idx] != "sliding_attention":
            return None
        return getattr(config, "sliding_window", None)


def layer_types(config) -> list[str]:
    """Attention type of each layer: ``config.layer_types``, else sliding if ``config.sliding_window`` is set."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers


def projection_module(attn: nn.Module, which: str) -> nn.Module:
    """The linear layer whose output holds the queries (``which="q"``) or the keys (``"k"``): ``q_proj``/``k_proj``,
    or the fused ``qkv_proj`` (Phi3)."""
    return attn.qkv_proj if hasattr(attn, "qkv_proj") else getattr(attn, f"{which}_proj")


def _fused_rows(attn: nn.Module, which: str) -> slice:
    """Rows of the queries or keys in a fused ``qkv_proj`` (rows are ``[q | k | v]``)."""
    n_q = attn.config.num_attention_heads * attn.head_dim
    n_k = attn.config.num_key_value_heads * attn.head_dim
    return slice(0, n_q) if which == "q" else slice(n_q, n_q + n_k)


def from_projection(attn: nn.Module, projected: torch.Tensor, which: str) -> torch.Tensor:
    """Pre-RoPE queries or keys ``[B, H, S, D]`` from the output ``[B, S, out]`` of
    ``projection_module(attn, which)``."""
    if hasattr(attn, "qkv_proj"):
        projected = projected[..., _fused_rows(attn, which)]
    return _project(attn, projected, which, projected=True)


def _project(attn: nn.Module, hidden_states: torch.Tensor, which: str, projected: bool = False) -> torch.Tensor:
    """Pre-RoPE queries (``which="q"``) or keys (``"k"``) of ``hidden_states`` ``[B, S, hidden]``.

    Returns ``[B, H, S, D]`` (H query heads or KV heads), after ``q_norm``/``k_norm`` when the layer has them.
    With ``projected=True``, ``hidden_states`` is already the projection's output (only the ``which`` rows).
    """
    head_dim = attn.head_dim
    if projected:
        flat = hidden_states
    elif hasattr(attn, "qkv_proj"):  # fused (Phi3)
        rows = _fused_rows(attn, which)
        bias = attn.qkv_proj.bias[rows] if attn.qkv_proj.bias is not None else None
        flat = F.linear(hidden_states, attn.qkv_proj.weight[rows], bias)
    else:
        flat = getattr(attn, f"{which}_proj")(hidden_states)
    states = flat.view(*hidden_states.shape[:-1], -1, head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def pre_rope_queries(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``[B, H_q, S, D]`` queries before RoPE (after ``q_norm`` if any)."""
    return _project(attn, hidden_states, "q")


def pre_rope_keys(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv, S, D]`` keys before RoPE (after ``k_norm`` if any)."""
    return _project(attn, hidden_states, "k")
