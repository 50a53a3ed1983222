"""KVCompose allocation: composite tokens and a global budget split across layers (model scope).

Paper: "KVCompose: Efficient Structured KV Cache Compression with Composite Tokens", arXiv 2509.05165. Each head
of a layer ranks its own tokens; the composite token at rank ``j`` of layer ``l`` scores the mean over heads of each
head's ``j``-th best score. The top ``L * B`` composite tokens over all layers (``B`` the uniform per-head budget)
give each layer its count ``m_l``; every head of layer ``l`` then keeps its own top ``m_l`` tokens, so each layer
stays one dense tensor.

Departures: works with any scorer (the paper uses attention-derived scores; scores of different layers must be
comparable for the split to be meaningful); each layer's best composite token is always selected so every head
keeps at least one entry; protected tokens are ``+inf`` and therefore always selected. Peak memory: the full
cache of the context plus one ``[B, H, S]`` fp32 score tensor per layer, held until the last layer's prefill.
"""

from __future__ import annotations

import math

import torch

from .base import Allocator, row_budgets


class KVComposeAllocator(Allocator):
    """Global top-k over composite-token scores of every layer; the hits per layer are its per-head budget."""

    name = "kvcompose"
    scope = "model"

    def allocate_model(self, scores, valid, protected, ratio, layers):
        b, h, _ = scores[0].shape
        budget = row_budgets(valid, protected, ratio)
        counts = torch.empty(len(scores), b, dtype=torch.long)
        for row in range(b):
            composite = []
            for layer_scores in scores:
                ranked = layer_scores[row].double().sort(dim=-1, descending=True).values.mean(0)  # [S], no overflow
                ranked[0] = math.inf
                composite.append(ranked)
            stacked = torch.stack(composite)  # [L, S]
            winners = stacked.flatten().topk(len(scores) * int(budget[row])).indices // stacked.shape[1]
            counts[:, row] = torch.bincount(winners, minlength=len(scores))
        return [c[:, None].expand(b, h).clone().to(scores[0].device) for c in counts]
