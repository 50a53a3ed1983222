"""TOVA press.

Paper: Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104. A token's score is the attention the
last query gives it, averaged over all query heads of the layer, so every KV head of a layer keeps the same tokens.

Departure: applied once at prefill (the paper evicts one token per decoding step); the last token is protected
(``window = 1``) since it is the query itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press
from .snapkv import window_attention


@dataclass
class TOVAPress(Press):
    """Keeps the tokens the last query attends to most (averaged over every head of the layer)."""

    name = "tova"
    needs = frozenset({"queries"})  # what score() reads (kvpress_like.scorer.NEEDS)
    supports_decoding = True
    window: int = 1

    def score(self, ctx: LayerContext) -> torch.Tensor:
        weights = window_attention(ctx, 1)  # [B, H_kv, G, 1, S]
        b, h_kv, _, _, s = weights.shape
        return weights.mean(dim=(1, 2, 3))[:, None, :].expand(b, h_kv, s)
