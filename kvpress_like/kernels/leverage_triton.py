"""Triton kernel: the per-token quadratic form of sketched leverage scores, ``o_i = k_i^T G^{-1} k_i``.

Mirrors the last step of :func:`kvpress_like.compressors.leverage.leverage_scores` (there a Cholesky solve against
every token; here one ``k x k`` inverse per head, from the same Cholesky factor, then one fused multiply-and-reduce
per block of tokens, so the ``[k, S]`` solved matrix is never materialised).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quadratic_form(x_ptr, inverse_ptr, out_ptr, n, k, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < n, cols < k
    x = tl.load(x_ptr + (head * n + rows[:, None]) * k + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    inverse = tl.load(inverse_ptr + head * k * k + cols[:, None] * k + cols[None, :],
                      mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    quadratic = tl.sum(tl.dot(x, inverse) * x, 1)
    tl.store(out_ptr + head * n + rows, tl.maximum(quadratic, 0.0), mask=row_ok)


def quadratic_form(centred: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """``k_i^T G^{-1} k_i`` for every token.

    Args:
        centred: ``[B, H, S, k]`` fp32 centred sketched keys (0 on padding).
        cholesky: ``[B, H, k, k]`` lower Cholesky factor of the regularised Gram matrix ``G``.

    Returns:
        ``[B, H, S]`` fp32, clamped at 0.
    """
    b, h, n, k = centred.shape
    x = centred.float().reshape(b * h, n, k).contiguous()
    inverse = torch.cholesky_inverse(cholesky.float()).reshape(b * h, k, k).contiguous()
    out = torch.empty(b * h, n, dtype=torch.float32, device=centred.device)
    block_s = 64
    _quadratic_form[(b * h, triton.cdiv(n, block_s))](x, inverse, out, n, k, BLOCK_S=block_s,
                                                        BLOCK_K=max(16, triton.next_power_of_2(k)))
    return out.view(b, h, n)
