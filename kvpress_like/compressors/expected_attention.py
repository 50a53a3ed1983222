"""Expected-attention press.

Paper: "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution",
arXiv 2510.00636. Future queries are modelled as Gaussian: mean ``mu`` and covariance ``Sigma`` of the layer's
pre-RoPE queries over the prompt (sink tokens excluded), rotated by the RoPE matrix averaged over the next
``n_future`` positions, ``R = mean_t R(t)``: ``mu' = R mu``, ``Sigma' = R Sigma R^T``. The expected attention logit
of a cached (post-RoPE) key ``k`` is then ``E[exp(q.k s)] = exp(s k.mu' + s^2 k^T Sigma' k / 2)`` with ``s`` the
attention scale; scores are normalised over the row's keys (a softmax of the exponent), averaged over the query
heads of each KV group and multiplied by ``||v||``.

Departures: the future positions start at the row's padded length ``S`` (identical for every row of a batch);
since RoPE is linear in ``(cos, sin)``, the averaged rotation is RoPE with averaged tables, applied exactly
(also for partial rotary embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press


def averaged_rotation(ctx: LayerContext, start: int, n_future: int, dim: int) -> torch.Tensor:
    """``[D, D]`` matrix ``R = mean_{t in [start, start + n_future)} R(t)`` of the layer's RoPE."""
    cos, sin = ctx.rotary(torch.arange(start, start + n_future))
    cos, sin = cos.float().mean(1, keepdim=True), sin.float().mean(1, keepdim=True)  # [1, 1, rot]
    eye = torch.eye(dim, device=cos.device)[None, None]  # rows are basis vectors
    rotated, _ = ctx.arch.apply_rope(eye, eye, cos.expand(1, dim, -1), sin.expand(1, dim, -1))
    return rotated[0, 0].T  # row i of `rotated` is R e_i, i.e. column i of R


def expected_attention_scores(keys, values, queries_pre, valid, rotation, scale: float, n_sink: int):
    """Expected attention of future queries onto each key, times the value norm.

    Args:
        keys: ``[B, H_kv, S, D]`` post-RoPE; values: ``[B, H_kv, S, D]``; queries_pre: ``[B, H_q, S, D]`` pre-RoPE.
        valid: ``[B, S]`` bool; rotation: ``[D, D]`` averaged RoPE; scale: attention scale.
        n_sink: first real tokens left out of the query statistics.

    Returns:
        ``[B, H_kv, S]`` fp32 scores (0 on padding).
    """
    b, h_q, s, d = queries_pre.shape
    h_kv = keys.shape[1]
    rank = valid.long().cumsum(-1) - 1
    use = (valid & (rank >= n_sink)).float()
    use = torch.where(use.sum(-1, keepdim=True) > 0, use, valid.float())  # all-sink context: use every token
    weight = use / use.sum(-1, keepdim=True).clamp(min=1)
    q = queries_pre.float()
    mean = torch.einsum("bs,bhsd->bhd", weight, q)
    centred = (q - mean[:, :, None]) * use[:, None, :, None].sqrt()
    cov = centred.transpose(-1, -2) @ centred / use.sum(-1).clamp(min=1)[:, None, None, None]  # [B, H_q, D, D]
    mean = mean @ rotation.T
    cov = rotation @ cov @ rotation.T
    k = keys.float().repeat_interleave(h_q // h_kv, dim=1)  # [B, H_q, S, D]
    exponent = scale * torch.einsum("bhsd,bhd->bhs", k, mean)
    exponent = exponent + 0.5 * scale**2 * ((k @ cov) * k).sum(-1)
    exponent = exponent.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(exponent, dim=-1).nan_to_num(0.0)
    probs = probs.view(b, h_kv, h_q // h_kv, s).mean(2)
    return probs * values.float().norm(dim=-1)


@dataclass
class ExpectedAttentionPress(Press):
    """Keeps keys that future queries are expected to attend to, weighted by value norm.

    Args:
        n_future: number of future positions the RoPE rotation is averaged over (512 in the paper).
    """

    name = "expected_attention"
    needs = frozenset({"pre_rope", "rope_tables"})  # what score() reads (kvpress_like.scorer.NEEDS)
    n_sink: int = 4
    n_future: int = 512

    def score(self, ctx: LayerContext) -> torch.Tensor:
        s, d = ctx.keys.shape[2], ctx.keys.shape[3]
        rotation = averaged_rotation(ctx, s, self.n_future, d).to(ctx.keys.device)
        return expected_attention_scores(ctx.keys, ctx.values, ctx.pre_rope_queries, ctx.valid, rotation,
                                         ctx.scaling, self.n_sink)
