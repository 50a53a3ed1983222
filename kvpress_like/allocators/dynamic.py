"""DynamicKV allocation: layer budgets in proportion to each layer's share of a global top-k (model scope).

Paper: Zhou et al., "DynamicKV: Task-Aware Adaptive KV Cache Compression for Long Context LLMs", arXiv 2412.14838.
The scores of all layers compete in one global top-``L * H * B``; layer ``l`` wins ``c_l`` of them and its per-head
budget becomes proportional to ``c_l``, capped at ``radio_max = 10`` times the uniform budget, the total fixed.

Departures: the paper re-splits every ``m = 4`` layers during prefill because it prunes as it goes; here the
allocator is model-scope and sees every layer's scores, so the split is computed once, from all layers (the
paper's last re-split). The paper pairs it with SnapKV-style scores (window 8, kernel 7); here any scorer works.
Every head of a layer keeps the same count (dense storage). Peak memory as for every model-scope allocator: the
full cache of the context plus one fp32 score tensor per layer.
"""

from __future__ import annotations

import torch

from .base import Allocator, distribute, row_budgets


class DynamicAllocator(Allocator):
    """Per-layer budgets proportional to each layer's hits in a global top-k over all layers' scores.

    Args:
        radio_max: cap of a layer's budget, as a multiple of the uniform budget (10 in the paper).
    """

    name = "dynamic"
    scope = "model"

    def __init__(self, radio_max: float = 10.0):
        if not float(radio_max) >= 1.0:
            raise ValueError(f"radio_max must be >= 1; got {radio_max!r}")
        self.radio_max = float(radio_max)

    def allocate_model(self, scores, valid, protected, ratio, layers):
        b, h, s = scores[0].shape
        n_layers = len(scores)
        budget = row_budgets(valid, protected, ratio)
        n_real, n_prot = valid.sum(-1).tolist(), protected.sum(-1).tolist()
        counts = torch.empty(n_layers, b, dtype=torch.long)
        for row in range(b):
            if n_real[row] == 0:  # a row that is all padding keeps nothing
                counts[:, row] = 0
                continue
            per_head = int(budget[row])
            flat = torch.stack([layer_scores[row] for layer_scores in scores]).flatten()  # [L * H * S]
            winners = flat.topk(n_layers * h * per_head).indices // (h * s)
            hits = torch.bincount(winners, minlength=n_layers).tolist()
            cap = min(n_real[row], max(int(self.radio_max * per_head), per_head))
            counts[:, row] = torch.tensor(distribute(n_layers * per_head, hits, [max(n_prot[row], 1)] * n_layers,
                                                     [cap] * n_layers))
        return [c[:, None].expand(b, h).clone().to(scores[0].device) for c in counts]
