"""KNorm press.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430.
Keys with a small L2 norm receive more attention, so the score is ``-||k||``. The norm is taken on the cached
post-RoPE keys; RoPE is a rotation, so it equals the pre-RoPE norm. No departure from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press


@dataclass
class KnormPress(Press):
    """Keeps the keys with the smallest L2 norm."""

    name = "knorm"
    supports_decoding = True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
