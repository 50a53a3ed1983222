"""Compactor press: approximate leverage scores blended with non-causal chunked attention.

Paper: Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
Scores", arXiv 2507.08143. Query-agnostic: the score of a token for one KV head is
``z(a) + lam * z(o)`` where ``a`` are non-causal chunked attention scores (:mod:`.non_causal_attention`), ``o``
approximate leverage scores of the pre-RoPE keys (:mod:`.leverage`) and ``z`` standardises each head's scores over
the row's real tokens (mean 0, std 1).

Departures: ``lam = 0.3`` is the weighting reported for the paper (the authors' public engine uses 0.5; the paper's
ablation finds 0.15-0.4 matters little); standardisation is per head, as specified for this library, where the
authors' engine standardises over all heads of a sequence together. The paper's numbers use head-adaptive budgets;
here the allocator is a separate choice (``allocator="uniform"`` by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext
from .leverage import check_leverage_args, pooled_leverage
from .non_causal_attention import NonCausalAttentionPress


def standardise(scores: torch.Tensor, valid: torch.Tensor, over: str = "head") -> torch.Tensor:
    """z-score of ``[B, H, S]`` scores over the real tokens of each row (``valid`` ``[B, S]``): per head
    (``over="head"``) or over all heads of the row together (``over="layer"``)."""
    w = valid[:, None, :].float().expand_as(scores)
    dims = (-1,) if over == "head" else (-2, -1)
    n = w.sum(dims, keepdim=True).clamp(min=1)
    mean = (scores * w).sum(dims, keepdim=True) / n
    var = (((scores - mean) * w) ** 2).sum(dims, keepdim=True) / n
    return (scores - mean) / (var.sqrt() + 1e-6) * w


@dataclass
class CompactorPress(NonCausalAttentionPress):
    """Query-agnostic blend of leverage and non-causal attention scores.

    Args:
        blending: weight ``lam`` of the leverage term.
        sketch_size: Gaussian sketch width for the leverage scores.
        chunk_size: chunk length of the non-causal attention.
        kernel_size: average-pooling width applied to the attention scores.
        seed: sketch seed.
    """

    name = "compactor"
    blending: float | None = 0.3
    sketch_size: int = 48
    seed: int = 0
    standardise_over: str = "head"
    leverage_kernel_size: int = 1

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)  # validates chunk_size and kernel_size
        check_leverage_args(self)
        if self.blending is not None and (isinstance(self.blending, bool) or not isinstance(self.blending, (int, float))
                                          or not self.blending >= 0):
            raise ValueError(f"blending must be a non-negative number or None (the ratio); got {self.blending!r}")
        if self.standardise_over not in ("head", "layer"):
            raise ValueError(f"standardise_over must be 'head' or 'layer'; got {self.standardise_over!r}")

    @property
    def score_depends_on_ratio(self) -> bool:
        """``blending=None`` weighs leverage by the ratio, so the scores change with it."""
        return self.blending is None

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = super().score(ctx)  # pooled non-causal chunked attention
        leverage = pooled_leverage(self, ctx)
        blending = self.ratio if self.blending is None else self.blending
        over = self.standardise_over
        return standardise(attention, ctx.valid, over) + blending * standardise(leverage, ctx.valid, over)
