"""SnapKV press.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469.
The last ``window`` queries of the prompt (the observation window) attend to every key; the softmax weights
(fp32, causal inside the window, padding excluded) are summed over the window, averaged over the query heads of
each KV group (GQA), and smoothed by a 1-D average pooling of size ``kernel_size``. The window itself is always
kept (it is the press's protected ``window``).

Departures: average pooling (the paper's LongBench configs use max pooling of size 7; the public reference
uses average pooling of size 5); the window defaults to 64 queries (32 in the paper's LongBench configs).
Memory is ``O(window * S)`` per head, never ``S x S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_odd_kernel
from ..press import LayerContext, Press


def pool(scores: torch.Tensor, valid: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average of each token's score with its ``kernel_size`` neighbours, over real tokens only.

    Args:
        scores: ``[B, H, S]``; valid: ``[B, S]`` bool (padding neither contributes nor counts).

    Returns:
        ``[B, H, S]``, 0 on padding; a padded row scores exactly as the same row without padding.
    """
    if kernel_size <= 1:
        return scores * valid[:, None, :]
    b, h, s = scores.shape
    if bool(valid.all()):  # no padding: one average over the neighbours that exist
        return F.avg_pool1d(scores.reshape(b * h, 1, s), kernel_size, stride=1, padding=kernel_size // 2,
                            count_include_pad=False).view(b, h, s)
    weight = valid[:, None, :].to(scores.dtype).expand(b, h, s)
    args = dict(kernel_size=kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    total = F.avg_pool1d((scores * weight).reshape(b * h, 1, s), **args)
    count = F.avg_pool1d(weight.reshape(b * h, 1, s), **args)
    return (total / count.clamp(min=1e-12)).view(b, h, s) * weight


def window_attention(ctx: LayerContext, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries onto every key.

    Returns:
        ``[B, H_kv, G, W, S]`` fp32 weights (``G`` query heads per KV head, ``W = min(window, S)``); causal inside
        the window, zero on padding keys.
    """
    keys = ctx.keys.float()
    b, h_kv, s, d = keys.shape
    queries = ctx.queries(last=window).float()
    w = queries.shape[2]
    queries = queries.view(b, h_kv, ctx.num_kv_groups, w, d)
    logits = torch.einsum("bhgwd,bhsd->bhgws", queries, keys).mul_(ctx.scaling)
    query_pos = torch.arange(s - w, s, device=keys.device)
    allowed = torch.arange(s, device=keys.device)[None, :] <= query_pos[:, None]  # [W, S]
    allowed = allowed[None, None, None] & ctx.valid[:, None, None, None, :]
    logits.masked_fill_(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1, out=logits).nan_to_num_(0.0)  # in place


@dataclass
class SnapKVPress(Press):
    """Scores keys by the attention they receive from the observation window (the last ``window`` queries).

    Args:
        window: observation window size; these last tokens are always kept.
        kernel_size: width of the average pooling over neighbouring tokens (odd).
    """

    name = "snapkv"
    needs = frozenset({"queries"})  # what score() reads (kvpress_like.scorer.NEEDS)
    supports_decoding = True
    window: int = 64
    kernel_size: int = 5

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        check_odd_kernel("kernel_size", self.kernel_size)
        if self.window < 1:
            raise ValueError(f"window must be >= 1 for SnapKV (the observation window); got {self.window!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        weights = window_attention(ctx, self.window)  # [B, H_kv, G, W, S]
        return pool(weights.sum(dim=3).mean(dim=2), ctx.valid, self.kernel_size)
