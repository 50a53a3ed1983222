"""OLMo2 (`model_type="olmo2"`), added through the public plugin hook only.

This module is a plugin like a third party's: the core never imports it; it is loaded through its entry point
(``olmo2 = "kvpress_like.plugins.olmo2"`` in the group ``kvpress_like`` of ``pyproject.toml``) and registers its
architecture with the ``register_architectures`` hook. What differs from the default layout (transformers 5.x
``modeling_olmo2``): ``q_norm`` and ``k_norm`` are RMSNorms over the whole projection (``H * D`` weights, one
statistic over every head of a token), applied to ``q_proj``/``k_proj``'s output before it is split into heads;
Qwen3 and Gemma3 normalise each head separately. Everything else is the default layout.
"""

import torch
from torch import nn
from transformers.models.olmo2 import modeling_olmo2

from kvpress_like import Architecture, hookimpl


class Olmo2Architecture(Architecture):
    """OLMo2: ``q_norm``/``k_norm`` over the full projection width, then the split into heads."""

    def to_heads(self, attn: nn.Module, flat: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, H, S, D]``: ``q_norm``/``k_norm`` applied to the whole projection ``flat`` ``[B, S, H * D]``, then
        split into heads."""
        if which not in ("q", "k"):
            raise ValueError(f"which must be 'q' (queries) or 'k' (keys); got {which!r}")
        normed = getattr(attn, f"{which}_norm")(flat)  # [B, S, H * D]
        return normed.view(*flat.shape[:-1], -1, self.head_dim(attn)).transpose(1, 2)  # [B, H, S, D]


ARCHITECTURE = Olmo2Architecture(name="olmo2", model_types=("olmo2",), apply_rope=modeling_olmo2.apply_rotary_pos_emb)


@hookimpl
def register_architectures(register):
    register(ARCHITECTURE)
