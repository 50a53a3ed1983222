"""Explicit per-layer ratios: layer ``l`` removes ``ratios[l]`` of each context (the press's own ratio is unused)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_ratio
from .base import Allocator, keep_count


class PerLayerAllocator(Allocator):
    """Every head of layer ``l`` keeps ``n - floor(ratios[l] * n)`` of a row's ``n`` real tokens (at least its
    protected tokens).

    Args:
        ratios: one ratio in [0, 1) per decoder layer of the model (entries of non-compressible layers are ignored).
    """

    name = "per_layer"

    def __init__(self, ratios: Sequence[float] | None = None):
        if ratios is None:
            raise TypeError("the per_layer allocator needs its ratios: PerLayerAllocator(ratios=[r0, r1, ...])")
        if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
            raise TypeError(f"ratios must be a list of ratios in [0, 1), one per decoder layer; got {ratios!r}")
        self.ratios = [check_ratio(r) for r in ratios]

    def allocate(self, scores, valid, protected, ratio, layer_idx, layers) -> torch.Tensor:
        if layer_idx >= len(self.ratios):
            raise ValueError(f"PerLayerAllocator has {len(self.ratios)} ratios but the model has layer {layer_idx}")
        b, h, _ = scores.shape
        counts = [max(keep_count(int(n), self.ratios[layer_idx]), int(p), 1)
                  for n, p in zip(valid.sum(-1).tolist(), protected.sum(-1).tolist())]
        return torch.tensor(counts, dtype=torch.long, device=scores.device)[:, None].expand(b, h).clone()
