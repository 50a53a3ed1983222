"""Triton kernels for sketched leverage scores.

Mirrors :func:`kvpress_like.compressors.leverage.leverage_scores` (same sketch, centring, regularisation and padding
handling; see that module for the method and the paper). Three passes over the keys, each reading them once in their
own dtype and computing in fp32, the ``[S, k]`` sketched keys never materialised:

1. ``_masked_key_sum``: partial sums of the real keys, giving the per-head mean ``m`` (``[B, H, D]``).
2. ``_centred_gram``: ``x_i = ((k_i - m) * valid_i) Phi`` fused with the Gram accumulation ``G = sum_i x_i^T x_i``,
   one partial ``k x k`` Gram per block of rows (summed in torch: deterministic, no atomics).
3. torch: ``G`` regularised exactly as the reference, its Cholesky factor ``L`` and ``A = Phi L^{-T}`` (``[D, k]``);
   ``_leverage_rows``: ``score_i = ||((k_i - m) * valid_i) A||^2`` (``= x_i G^{-1} x_i^T``), one fused product per
   block of rows.

Centring the keys before the sketch equals centring the sketched keys (the sketch is linear) and avoids the
cancellation of ``sum x x^T - n mean mean^T``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linalg import gaussian_sketch, inverse_cholesky

_BLOCK_S = 32  # rows per block


@triton.jit
def _masked_key_sum(keys_ptr, valid_ptr, out_ptr, n_heads, seq_len, dim, rows_per_program, n_splits,
                    stride_b, stride_h, stride_s, stride_d,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets
    split = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    base = keys_ptr + b * stride_b + h * stride_h
    acc = tl.zeros((BLOCK_D,), tl.float32)
    first = split * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        row_ok = (rows < seq_len) & (rows < first + rows_per_program)
        real = tl.load(valid_ptr + b * seq_len + rows, mask=row_ok, other=0) != 0
        x = tl.load(base + rows[:, None] * stride_s + dims[None, :] * stride_d,
                    mask=(row_ok & real)[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x, 0)
    tl.store(out_ptr + (bh * n_splits + split) * dim + dims, acc, mask=dim_ok)


@triton.jit
def _centred_rows(keys_ptr, valid_ptr, mean_ptr, bh, b, h, start, first, rows_per_program, seq_len, dim,
                  stride_b, stride_h, stride_s, stride_d, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_S, BLOCK_D]`` fp32 block of ``(k_i - m) * valid_i`` (0 outside the rows and dims)."""
    rows = start + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    row_ok = (rows < seq_len) & (rows < first + rows_per_program)
    real = tl.load(valid_ptr + b * seq_len + rows, mask=row_ok, other=0) != 0
    keep = (row_ok & real)[:, None] & dim_ok[None, :]
    x = tl.load(keys_ptr + b * stride_b + h * stride_h + rows[:, None] * stride_s + dims[None, :] * stride_d,
                mask=keep, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + bh * dim + dims, mask=dim_ok, other=0.0)
    return tl.where(keep, x - mean[None, :], 0.0)


@triton.jit
def _centred_gram(keys_ptr, valid_ptr, mean_ptr, sketch_ptr, out_ptr, n_heads, seq_len, dim, width,
                  rows_per_program, n_splits, stride_b, stride_h, stride_s, stride_d,
                  HAS_SKETCH: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets
    split = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < width
    if HAS_SKETCH:
        dims = tl.arange(0, BLOCK_D)
        phi = tl.load(sketch_ptr + dims[:, None] * width + cols[None, :],
                      mask=(dims[:, None] < dim) & col_ok[None, :], other=0.0)
    gram = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    first = split * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_S):
        x = _centred_rows(keys_ptr, valid_ptr, mean_ptr, bh, b, h, start, first, rows_per_program, seq_len, dim,
                          stride_b, stride_h, stride_s, stride_d, BLOCK_S, BLOCK_D)
        if HAS_SKETCH:
            x = tl.dot(x, phi, input_precision="ieee")  # [BLOCK_S, BLOCK_K] sketched, centred keys
        gram += tl.dot(tl.trans(x), x, input_precision="ieee")
    out = out_ptr + (bh * n_splits + split) * width * width + cols[:, None] * width + cols[None, :]
    tl.store(out, gram, mask=col_ok[:, None] & col_ok[None, :])


@triton.jit
def _leverage_rows(keys_ptr, valid_ptr, mean_ptr, a_ptr, out_ptr, n_heads, seq_len, dim, width,
                   stride_b, stride_h, stride_s, stride_d,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets
    block = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + bh * dim * width + dims[:, None] * width + cols[None, :],
                mask=(dims[:, None] < dim) & (cols[None, :] < width), other=0.0)
    start = block * BLOCK_S
    x = _centred_rows(keys_ptr, valid_ptr, mean_ptr, bh, b, h, start, start, BLOCK_S, seq_len, dim,
                      stride_b, stride_h, stride_s, stride_d, BLOCK_S, BLOCK_D)
    y = tl.dot(x, a, input_precision="ieee")  # [BLOCK_S, BLOCK_K] = x_i Phi L^-T
    rows = start + tl.arange(0, BLOCK_S)
    tl.store(out_ptr + bh * seq_len + rows, tl.sum(y * y, 1), mask=rows < seq_len)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every block dimension >= 16


def _splits(rows: int, heads: int) -> int:
    """Row ranges per head for the reductions: enough programs to fill a GPU, each at least a few blocks long."""
    return max(1, min(triton.cdiv(rows, 4 * _BLOCK_S), triton.cdiv(512, heads)))


def _rows_per_program(rows: int, splits: int) -> int:
    return triton.cdiv(triton.cdiv(max(rows, 1), splits), _BLOCK_S) * _BLOCK_S


def leverage_scores_triton(keys: torch.Tensor, valid: torch.Tensor, sketch_size: int = 48,
                           seed: int = 0) -> torch.Tensor:
    """Approximate leverage score of every token (Triton; same result as the PyTorch reference).

    Args:
        keys: ``[B, H, S, D]`` pre-RoPE keys, fp32, fp16 or bf16 (other dtypes are cast to fp32), any strides.
        valid: ``[B, S]`` bool, real tokens (others get score 0 and do not enter the statistics).
        sketch_size: ``k``, the sketch width; ``k >= D`` means exact leverage (no sketch).
        seed: seed of the Gaussian sketch (:func:`~kvpress_like.kernels.linalg.gaussian_sketch`, as the reference).

    Returns:
        ``[B, H, S]`` fp32 scores, each in ``[0, 1]``.
    """
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        keys = keys.float()
    b, h, s, d = keys.shape
    device = keys.device
    out = torch.zeros(b, h, s, dtype=torch.float32, device=device)
    if b * h == 0 or s == 0:
        return out
    valid_i8 = valid.to(device=device, dtype=torch.int8).contiguous()
    strides = keys.stride()
    block_d = _block(d)
    splits = _splits(s, b * h)
    rows = _rows_per_program(s, splits)
    splits = triton.cdiv(s, rows)
    grid = (b * h, splits)

    partial = torch.empty(b * h, splits, d, dtype=torch.float32, device=device)
    _masked_key_sum[grid](keys, valid_i8, partial, h, s, d, rows, splits, *strides, BLOCK_S=_BLOCK_S,
                          BLOCK_D=block_d)
    n_real = valid.to(device).sum(-1).clamp(min=1).repeat_interleave(h)  # [B * H]
    mean = (partial.sum(1) / n_real[:, None]).contiguous()  # [B * H, D]

    sketched = sketch_size < d
    width = sketch_size if sketched else d
    phi = gaussian_sketch(d, sketch_size, seed, device).float().contiguous() if sketched else mean  # dummy if unused
    grams = torch.empty(b * h, splits, width, width, dtype=torch.float32, device=device)
    _centred_gram[grid](keys, valid_i8, mean, phi, grams, h, s, d, width, rows, splits, *strides,
                        HAS_SKETCH=sketched, BLOCK_S=_BLOCK_S, BLOCK_D=block_d, BLOCK_K=_block(width))

    inverse_t = inverse_cholesky(grams.sum(1)).transpose(-1, -2)  # [B * H, k, k] = L^-T
    a = (phi @ inverse_t if sketched else inverse_t).contiguous()  # [B * H, D, k]
    _leverage_rows[(b * h, triton.cdiv(s, _BLOCK_S))](keys, valid_i8, mean, a, out, h, s, d, width,
                                                      *strides, BLOCK_S=_BLOCK_S, BLOCK_D=block_d,
                                                      BLOCK_K=_block(width))
    return out
