"""Pyramid allocation (PyramidKV).

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069. Budgets decrease linearly with depth: with ``F`` the uniform per-head budget beyond the protected
tokens, the first compressible layer gets ``2F - F/beta`` and the last ``F/beta`` (``beta = 20``), so the mean over
layers equals the uniform budget.

Departures: the linear profile runs over the *compressible* layers only (Gemma3's sliding layers are skipped);
budgets are integers rounded by largest remainder so the total over layers is exactly ``L * F`` (plus protected
tokens), and a layer never keeps more than its real tokens (the excess goes to the other layers).
"""

from __future__ import annotations

import torch

from .base import Allocator, distribute, row_budgets


def pyramid_weights(n_layers: int, beta: float) -> list[float]:
    """Relative budgets ``max - l (max - min) / (L - 1)`` with ``min = 1/beta``, ``max = 2 - 1/beta`` (mean 1)."""
    low, high = 1.0 / beta, 2.0 - 1.0 / beta
    if n_layers == 1:
        return [1.0]
    return [high - i * (high - low) / (n_layers - 1) for i in range(n_layers)]


class PyramidAllocator(Allocator):
    """Per-layer budgets decreasing linearly with depth; every head of a layer keeps the same count.

    Args:
        beta: ratio between the uniform budget and the last layer's budget (20 in the paper).
    """

    name = "pyramid"

    def __init__(self, beta: float = 20.0):
        if not float(beta) >= 1.0:
            raise ValueError(f"beta must be >= 1; got {beta!r}")
        self.beta = float(beta)

    def allocate(self, scores, valid, protected, ratio, layer_idx, layers) -> torch.Tensor:
        b, h, _ = scores.shape
        position = list(layers).index(layer_idx)
        weights = pyramid_weights(len(layers), self.beta)
        budget = row_budgets(valid, protected, ratio)
        n_real, n_prot = valid.sum(-1).tolist(), protected.sum(-1).tolist()
        counts = []
        n_layers = len(layers)
        for row in range(b):
            if n_real[row] == 0:  # a row that is all padding keeps nothing
                counts.append(0)
                continue
            free = int(budget[row]) - n_prot[row]  # the profile applies beyond the protected tokens
            lower = 1 if n_prot[row] == 0 else 0
            per_layer = distribute(n_layers * free, weights, [lower] * n_layers, [n_real[row] - n_prot[row]] * n_layers)
            counts.append(n_prot[row] + per_layer[position])
        return torch.tensor(counts, dtype=torch.long, device=scores.device)[:, None].expand(b, h).clone()
