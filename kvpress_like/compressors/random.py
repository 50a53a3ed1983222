"""Random press: a seeded uniform random score per token and head (a baseline, not from a paper).

The same seed, layer and input shape always give the same kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press


@dataclass
class RandomPress(Press):
    """Keeps a random subset of tokens per head.

    Args:
        seed: base seed; layer ``l`` draws from ``torch.Generator().manual_seed(seed + l)``.
    """

    name = "random"
    supports_decoding = True
    seed: int = 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + ctx.layer_idx)
        b, h, s, _ = ctx.keys.shape
        return torch.rand(b, h, s, generator=generator).to(ctx.keys.device)
