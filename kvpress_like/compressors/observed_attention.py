"""Observed-attention press (H2O-style heavy hitters).

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv 2306.14048. A key's score is the attention it accumulates from every query of the prefill, divided by the
number of queries that can attend to it (``S - j`` for key ``j`` under a causal mask), averaged over the query heads
of its KV group.

Departures: the attention is recomputed from the recomputed queries in blocks of ``block_size`` queries, so it
works with any attention implementation (SDPA never materialises the weights) and never holds an ``S x S``
matrix: memory is ``O(block_size * S)`` per head. Compute stays quadratic in ``S``, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press


def observed_attention_scores(queries, keys, valid, scale: float, block_size: int = 256) -> torch.Tensor:
    """Mean causal attention each key receives.

    Args:
        queries: ``[B, H_q, S, D]`` post-RoPE; keys: ``[B, H_kv, S, D]`` post-RoPE; valid: ``[B, S]``.

    Returns:
        ``[B, H_kv, S]`` fp32: summed attention from real queries divided by the number of real queries at or
        after the key, averaged over the query heads of each group; 0 on padding.
    """
    b, h_q, s, d = queries.shape
    h_kv = keys.shape[1]
    keys = keys.float()
    total = torch.zeros(b, h_kv, s, dtype=torch.float32, device=keys.device)
    key_pos = torch.arange(s, device=keys.device)
    for start in range(0, s, block_size):
        end = min(start + block_size, s)
        q = queries[:, :, start:end].float().view(b, h_kv, h_q // h_kv, end - start, d)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys) * scale
        allowed = key_pos[None, :] <= torch.arange(start, end, device=keys.device)[:, None]
        allowed = allowed[None, None, None] & valid[:, None, None, None, :]
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        weights = weights * valid[:, None, None, start:end, None]
        total += weights.sum(dim=3).mean(dim=2)
    later_queries = valid.flip(-1).long().cumsum(-1).flip(-1)  # real queries at or after each position
    return total / later_queries.clamp(min=1)[:, None, :] * valid[:, None, :]


@dataclass
class ObservedAttentionPress(Press):
    """Keeps keys with the highest average attention received during prefill.

    Args:
        block_size: queries processed at once (memory ``block_size * S`` per head).
    """

    name = "observed_attention"
    needs = frozenset({"queries"})  # what score() reads (kvpress_like.scorer.NEEDS)
    block_size: int = 256

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return observed_attention_scores(ctx.queries(), ctx.keys, ctx.valid, ctx.scaling, self.block_size)
