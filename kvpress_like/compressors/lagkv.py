"""LagKV press: attention-free scores from each partition's keys and values against the next partition.

Paper: Liang, Zhang, Li, Li, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
arXiv 2504.04704. Per layer and KV head, after the first ``n_sink`` tokens the context is cut into partitions of
``lag_size`` tokens. Partition ``p`` is judged against partition ``p + 1`` (its "lag"): every channel of ``p``'s keys
is min-max normalised with the minimum and maximum of that channel over ``p + 1``'s keys, the token's key score is
the softmax over the partition's tokens of the standard deviation over channels of its normalised key, the same for
values, and ``score = s_K + value_weight * s_V`` (``value_weight`` is the paper's ``score_v_ratio``, 1). No query
and no attention weight is needed, so any attention implementation works. Cost: ``O(S * D)`` per head.

Departures from the paper and its public code:

* Selection is left to the press's allocator (uniform: one top-k over the whole layer per head; or any other
  allocator) instead of keeping exactly ``ratio * lag_size`` tokens of every partition. The per-partition softmax
  puts every partition on the same scale (its scores sum to ``1 + value_weight``), which is what makes one top-k
  across partitions meaningful.
* The last complete partition and the incomplete remainder have no reference partition; the paper keeps them
  uncompressed as a sliding window. Here they score above every partition token (``1 + value_weight`` plus a bonus
  growing with recency), so they are kept first while the budget allows, the most recent first when it does not.
* The prefill is scored once, as a whole, after its attention saw every token (the authors' prefill recipe feeds
  the prompt in ``lag_size`` chunks, so later prompt tokens already attend to compressed partitions); the recursive
  compression every ``lag_size`` decoded tokens is not done (tokens appended after the prefill are never
  compressed by this press).
* ``max - min`` is clamped to ``1e-6`` (a channel constant over the reference partition would otherwise divide by
  zero); the standard deviation is the unbiased one, as in the public code.
* Keys are scored as cached (after RoPE), as in the public code; the defaults (``n_sink = 16``, ``lag_size =
  128``) are those of the authors' README prefill recipe and Hugging Face ``custom_generate`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..press import LayerContext, Press

EPS = 1e-6


def partition_scores(states: torch.Tensor, lag_size: int) -> torch.Tensor:
    """Lag-relative score of every token of every partition that has a successor.

    Args:
        states: ``[H, P * lag_size, D]`` keys or values of ``P >= 2`` consecutive complete partitions.
        lag_size: tokens per partition.

    Returns:
        ``[H, (P - 1) * lag_size]`` fp32: per partition, the softmax over its tokens of the (unbiased) standard
        deviation over channels of the token's states min-max normalised by the next partition.
    """
    h, n, d = states.shape
    parts = states.float().view(h, n // lag_size, lag_size, d)
    reference, current = parts[:, 1:], parts[:, :-1]
    low = reference.amin(dim=2, keepdim=True)
    span = (reference.amax(dim=2, keepdim=True) - low).clamp(min=EPS)
    spread = ((current - low) / span).std(dim=-1)  # [H, P - 1, lag]
    return spread.softmax(dim=-1).reshape(h, -1)


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, n_sink: int, lag_size: int,
                 value_weight: float) -> torch.Tensor:
    """LagKV scores of every cached token.

    Args:
        keys: ``[B, H, S, D]`` cached (post-RoPE) keys.
        values: ``[B, H, S, D]`` cached values.
        valid: ``[B, S]`` bool, False on padding; partitions are formed over each row's real tokens.
        n_sink: first real tokens left out of the partitions (protected by the press).
        lag_size: tokens per partition.
        value_weight: weight of the value score.

    Returns:
        ``[B, H, S]`` fp32: ``s_K + value_weight * s_V`` in ``[0, 1 + value_weight]`` for tokens of partitions with a
        successor; ``1 + value_weight + (j + 1) / R`` for the ``j``-th (in position order) of the ``R`` other real
        tokens (the sinks, then the trailing tokens that have no successor partition); 0 on padding.
    """
    b, h, s, _ = keys.shape
    top = 1.0 + value_weight
    scores = torch.zeros(b, h, s, dtype=torch.float32, device=keys.device)
    for row in range(b):
        real = valid[row].nonzero().squeeze(-1)
        n = real.numel()
        start = min(n_sink, n)
        complete = (n - start) // lag_size
        scored = (complete - 1) * lag_size if complete >= 2 else 0
        row_scores = torch.empty(h, n, dtype=torch.float32, device=keys.device)
        if scored:
            span = real[start:start + complete * lag_size]
            row_scores[:, start:start + scored] = (
                partition_scores(keys[row][:, span], lag_size)
                + value_weight * partition_scores(values[row][:, span], lag_size))
        rest = torch.cat([torch.arange(start, device=keys.device), torch.arange(start + scored, n, device=keys.device)])
        if rest.numel():
            rank = torch.arange(1, rest.numel() + 1, device=keys.device, dtype=torch.float32)
            row_scores[:, rest] = top + rank / rest.numel()
        scores[row, :, real] = row_scores
    return scores


@dataclass
class LagKVPress(Press):
    """Attention-free: scores each partition's keys and values against the min/max of the next partition.

    Args:
        n_sink: first tokens always kept (16 in the authors' code).
        lag_size: tokens per partition (128 in the authors' prefill recipe).
        value_weight: weight of the value score against the key score (``score_v_ratio``, 1).
    """

    name = "lagkv"
    n_sink: int = 16
    lag_size: int = 128
    value_weight: float = 1.0

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        check_int("lag_size", self.lag_size, minimum=2)
        if isinstance(self.value_weight, bool) or not isinstance(self.value_weight, (int, float)) or not (
                self.value_weight >= 0):
            raise ValueError(f"value_weight must be a number >= 0; got {self.value_weight!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return lagkv_scores(ctx.keys, ctx.values, ctx.valid, self.n_sink, self.lag_size, float(self.value_weight))
