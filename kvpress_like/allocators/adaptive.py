"""Head-adaptive allocation (AdaKV).

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", arXiv 2407.11550. Within one layer and row, one top-``H * B`` over the scores of all heads together
(``B`` the uniform per-head budget); head ``h`` wins ``c_h`` of those; with the safeguard ``alpha`` (0.2) its
budget is ``c_h * (1 - alpha) + alpha * B``.

Departures: budgets are rounded by largest remainder so the layer total is exactly ``H * B``, and clamped to
``[n_protected, n_real]``. Scores of different heads are compared as given (no per-head normalisation), as in the
paper. Heads keeping different counts are stored in a ragged per-head layer: memory is really freed.
"""

from __future__ import annotations

import torch

from .base import Allocator, distribute, row_budgets


class HeadAdaptiveAllocator(Allocator):
    """One top-k across all heads of a layer, with each head keeping at least ``alpha`` of the uniform budget.

    Args:
        alpha: safeguard fraction of the uniform budget every head keeps (0.2 in the paper).
    """

    name = "head_adaptive"

    def __init__(self, alpha: float = 0.2):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
        self.alpha = float(alpha)

    def allocate(self, scores, valid, protected, ratio, layer_idx, layers) -> torch.Tensor:
        b, h, s = scores.shape
        budget = row_budgets(valid, protected, ratio)
        n_real, n_prot = valid.sum(-1).tolist(), protected.sum(-1).tolist()
        counts = torch.empty(b, h, dtype=torch.long)
        for row in range(b):
            if n_real[row] == 0:  # a row that is all padding keeps nothing
                counts[row] = 0
                continue
            per_head = int(budget[row])
            winners = scores[row].flatten().topk(h * per_head).indices // s
            hits = torch.bincount(winners, minlength=h).float()
            target = (hits * (1 - self.alpha) + self.alpha * per_head).tolist()
            lower = max(n_prot[row], 1)
            counts[row] = torch.tensor(distribute(h * per_head, target, [lower] * h, [n_real[row]] * h))
        return counts.to(scores.device)
