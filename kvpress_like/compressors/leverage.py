"""Approximate leverage scores of pre-RoPE keys (the query-agnostic half of Compactor).

Paper: Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
Scores", arXiv 2507.08143. For each KV head, the ``[S, D]`` matrix of pre-RoPE keys (after ``k_norm`` where the
model has one) is right-sketched by a seeded Gaussian ``Phi`` (``D x k``, entries ``N(0, 1/k)``, k = 48), giving
``K_hat = K Phi``; the leverage of token ``i`` is ``k_hat_i^T (K_hat^T K_hat)^{-1} k_hat_i``, computed from the
Cholesky factor ``L`` of the small ``k x k`` Gram matrix as ``||L^{-1} k_hat_i||^2`` (the ``k x k`` triangular
inverse, then one matrix product over the tokens).

Departures: keys are centred (mean over the real tokens of the row removed) before sketching, as the authors'
public engine does, so a large common offset in the keys does not dominate; the Gram matrix is regularised by
``1e-4 * trace / k + 1e-6`` so rank-deficient or constant keys give finite scores (constant keys score 0 everywhere).
When ``k >= D`` no sketch is applied (exact leverage). Cost ``O(S*D*k + S*k^2 + k^3)`` per head, no ``S x S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, check_odd_kernel
from ..kernels import leverage_scores as fused_leverage_scores
from ..kernels.linalg import gaussian_sketch, inverse_cholesky
from ..press import LayerContext, Press
from .snapkv import pool


@torch.no_grad()  # scores carry no gradient
def leverage_scores(keys: torch.Tensor, valid: torch.Tensor, sketch_size: int = 48, seed: int = 0) -> torch.Tensor:
    """Approximate leverage score of every token.

    Args:
        keys: ``[B, H, S, D]`` pre-RoPE keys (any float dtype; computed in fp32).
        valid: ``[B, S]`` bool, real tokens (others get score 0 and do not enter the statistics).
        sketch_size: ``k``, the sketch width; ``k >= D`` means exact leverage.
        seed: seed of the Gaussian sketch.

    Returns:
        ``[B, H, S]`` fp32 scores, each in ``[0, 1]``.
    """
    fused = fused_leverage_scores(keys, valid, sketch_size, seed)  # Triton on CUDA, else None
    if fused is not None:
        return fused
    d = keys.shape[-1]
    sketch = gaussian_sketch(d, sketch_size, seed, keys.device) if sketch_size < d else None
    with torch.autocast(keys.device.type, enabled=False):  # fp32 products even inside an autocast region
        return _leverage(keys, valid, sketch)


def _leverage(keys: torch.Tensor, valid: torch.Tensor, sketch: torch.Tensor | None) -> torch.Tensor:
    """:func:`leverage_scores` of ``keys`` ``[B, H, S, D]`` with the ``[D, k]`` ``sketch`` (``None``: exact)."""
    padded = not bool(valid.all())
    source = keys
    keys = keys.float()
    if padded:  # padding (possibly garbage) never enters the statistics
        keys = keys.masked_fill(~valid[:, None, :, None], 0.0)
    if sketch is not None:
        keys = keys @ sketch  # [B, H, S, k]
    if keys is source:
        keys = keys.clone()  # centred in place below: never the caller's tensor
    if padded:
        n_real = valid.sum(-1).clamp(min=1)[:, None, None, None]
        centred = keys.sub_(keys.sum(-2, keepdim=True) / n_real).mul_(valid[:, None, :, None])
    else:
        centred = keys.sub_(keys.mean(-2, keepdim=True))
    inverse = inverse_cholesky(centred.transpose(-1, -2) @ centred)  # L^-1 of the [B, H, k, k] Gram matrix
    # k_hat_i^T G^-1 k_hat_i = ||L^-1 k_hat_i||^2: one matrix product over the tokens
    return (centred @ inverse.transpose(-1, -2)).square_().sum(-1)


@dataclass
class LeverageScorePress(Press):
    """Keeps the keys with the largest approximate leverage (outliers of the key geometry).

    Args:
        sketch_size: width ``k`` of the Gaussian sketch (48 in the paper).
        seed: sketch seed; the same seed gives the same kept tokens.
        leverage_kernel_size: average-pooling width over neighbouring tokens (1 = none): keeps the neighbours of
            an outlier key with it.
    """

    name = "leverage"
    needs = frozenset({"pre_rope"})  # what score() reads (kvpress_like.scorer.NEEDS)
    sketch_size: int = 48
    seed: int = 0
    leverage_kernel_size: int = 1

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        check_leverage_args(self)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return pooled_leverage(self, ctx)


def check_leverage_args(p) -> None:
    """Validate ``sketch_size`` and ``leverage_kernel_size`` of a press with leverage scores."""
    check_int("sketch_size", p.sketch_size, minimum=1)
    check_odd_kernel("leverage_kernel_size", p.leverage_kernel_size)


def pooled_leverage(p, ctx: LayerContext) -> torch.Tensor:
    """``[B, H_kv, S]`` leverage scores of ``ctx``'s pre-RoPE keys with ``p``'s sketch, pooled over
    ``p.leverage_kernel_size`` neighbours."""
    scores = leverage_scores(ctx.pre_rope_keys, ctx.valid, p.sketch_size, p.seed)
    return pool(scores, ctx.valid, p.leverage_kernel_size)
