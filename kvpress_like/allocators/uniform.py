"""Uniform allocation: every head of every compressible layer keeps the same count (see ``base`` for it)."""

from __future__ import annotations

import torch

from .base import Allocator, row_budgets


class UniformAllocator(Allocator):
    """Each head keeps ``n - floor(ratio * n)`` of a row's ``n`` real tokens (at least its protected tokens)."""

    name = "uniform"

    def allocate(self, scores, valid, protected, ratio, layer_idx, layers) -> torch.Tensor:
        budget = row_budgets(valid, protected, ratio).to(scores.device)
        return budget[:, None].expand(scores.shape[0], scores.shape[1]).clone()
