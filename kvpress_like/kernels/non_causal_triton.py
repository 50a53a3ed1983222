"""Triton kernels: softmax column sums of bidirectional attention within chunks (flash-style, no chunk x chunk matrix).

Mirrors :func:`kvpress_like.compressors.non_causal_attention.non_causal_attention_scores` (see that module for the
method and the paper): chunks of ``chunk_size`` tokens laid from each row's first real token (the reference's
``roll_rows`` by the row's left padding, done here in the indexing, so nothing is copied, rolled or padded), padding
neither attending nor attended to, a shorter last chunk used as is, the column sums averaged over the query heads of
each KV group. Queries and keys are read in their own dtype (any strides) and the logits accumulated in fp32.

Two kernels, two passes over a chunk's keys for every block of queries:

1. ``_row_stats``: for each query row, the max ``m`` and the softmax denominator ``l`` of its logits over the real
   keys of its chunk (online, block of keys by block of keys); stored as ``m`` and ``1 / l`` (0 for padding rows).
2. ``_column_sums``: for each block of keys, ``sum_g sum_i exp(s_gi - m_gi) / l_gi`` over the chunk's query rows and
   the group's ``G`` query heads, divided by ``G``: each output is written once (deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _positions(b, chunk_index, offsets, shift_ptr, valid_ptr, seq_len, chunk):
    """Source index in the row and whether it is a real token, for in-chunk ``offsets`` of chunk ``chunk_index``."""
    rolled = chunk_index * chunk + offsets  # position in the row rolled left by its left padding
    inside = (offsets < chunk) & (rolled < seq_len)
    shift = tl.load(shift_ptr + b)
    source = (rolled + shift) % seq_len
    real = tl.load(valid_ptr + b * seq_len + source, mask=inside, other=0) != 0
    return source, inside & real


@triton.jit
def _logits(q, k, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``[M, N]`` fp32 ``q k^T * qk_scale`` (``UPCAST``: dot in fp32; the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale


@triton.jit
def _load_rows(ptr, b, h, positions, real, dims, dim_ok, s_b, s_h, s_s, s_d):
    """``[len(positions), BLOCK_D]`` rows ``positions`` of head ``h`` in batch row ``b`` (0 where not ``real``)."""
    return tl.load(ptr + b * s_b + h * s_h + positions[:, None] * s_s + dims[None, :] * s_d,
                   mask=real[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _row_stats(q_ptr, k_ptr, valid_ptr, shift_ptr, m_ptr, inv_l_ptr, qk_scale,
               n_q_heads, groups, n_chunks, seq_len, chunk, dim,
               sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (b, h_q, chunk), chunk fastest; 64-bit offsets
    c = pid % n_chunks
    bh = pid // n_chunks
    b = bh // n_q_heads
    hq = bh % n_q_heads
    hkv = hq // groups
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    rows, row_real = _positions(b, c, tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M), shift_ptr, valid_ptr,
                                seq_len, chunk)
    q = _load_rows(q_ptr, b, hq, rows, row_real, dims, dim_ok, sq_b, sq_h, sq_s, sq_d)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denominator = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, chunk, BLOCK_N):
        cols, col_real = _positions(b, c, start + tl.arange(0, BLOCK_N), shift_ptr, valid_ptr, seq_len, chunk)
        k = _load_rows(k_ptr, b, hkv, cols, col_real, dims, dim_ok, sk_b, sk_h, sk_s, sk_d)
        s = _logits(q, k, qk_scale, PRECISION, UPCAST)  # log2 units
        s = tl.where(col_real[None, :], s, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, 1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        denominator = denominator * tl.exp2(m - safe_m) + tl.sum(tl.exp2(s - safe_m[:, None]), 1)
        m = new_m
    ok = row_real & (denominator > 0)
    out = bh * seq_len + rows
    tl.store(m_ptr + out, tl.where(ok, m, 0.0), mask=row_real)
    tl.store(inv_l_ptr + out, tl.where(ok, 1.0 / tl.where(ok, denominator, 1.0), 0.0), mask=row_real)


@triton.jit
def _column_sums(q_ptr, k_ptr, valid_ptr, shift_ptr, m_ptr, inv_l_ptr, out_ptr, qk_scale,
                 n_kv_heads, groups, n_chunks, seq_len, chunk, dim,
                 sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (b, h_kv, chunk), chunk fastest; 64-bit offsets
    c = pid % n_chunks
    bh = pid // n_chunks
    b = bh // n_kv_heads
    hkv = bh % n_kv_heads
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    cols, col_real = _positions(b, c, tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), shift_ptr, valid_ptr,
                                seq_len, chunk)
    k = _load_rows(k_ptr, b, hkv, cols, col_real, dims, dim_ok, sk_b, sk_h, sk_s, sk_d)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g in range(0, groups):
        hq = hkv * groups + g
        stats = (b * n_kv_heads * groups + hq) * seq_len
        for start in range(0, chunk, BLOCK_M):
            rows, row_real = _positions(b, c, start + tl.arange(0, BLOCK_M), shift_ptr, valid_ptr, seq_len, chunk)
            q = _load_rows(q_ptr, b, hq, rows, row_real, dims, dim_ok, sq_b, sq_h, sq_s, sq_d)
            m = tl.load(m_ptr + stats + rows, mask=row_real, other=0.0)
            inv_l = tl.load(inv_l_ptr + stats + rows, mask=row_real, other=0.0)
            s = _logits(q, k, qk_scale, PRECISION, UPCAST)
            keep = (inv_l > 0)[:, None] & col_real[None, :]
            p = tl.where(keep, tl.exp2(tl.where(keep, s - m[:, None], 0.0)) * inv_l[:, None], 0.0)
            acc += tl.sum(p, 0)
    tl.store(out_ptr + bh * seq_len + cols, acc / groups, mask=col_real)


def _operands(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """Queries and keys in one dtype ``tl.dot`` takes, the dot precision (full fp32 for fp32 inputs: no TF32), and
    whether to upcast to fp32 before the dot (bf16 under the interpreter, whose bf16 dot is wrong; on a GPU half
    inputs use the native dot with fp32 accumulation, exact products as the reference's fp32 matmul)."""
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"  # "tf32" is ignored for half inputs
    return queries.to(dtype), keys.to(dtype), precision, upcast


def column_sums(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, shift: torch.Tensor, scale: float,
                chunk_size: int) -> torch.Tensor:
    """Within-chunk softmax column sums with chunks laid from position ``shift[b]`` of each row (cyclically).

    Args:
        queries: ``[B, H_q, S, D]``, fp32/fp16/bf16, any strides.
        keys: ``[B, H_kv, S, D]``, ``H_q`` a multiple of ``H_kv``.
        valid: ``[B, S]`` bool, real tokens.
        shift: ``[B]`` long, where the first chunk of each row starts (its left padding).
        scale: logit scale.
        chunk_size: tokens per chunk.

    Returns:
        ``[B, H_kv, S]`` fp32: the attention each key receives from the real queries of its chunk, averaged over the
        ``H_q / H_kv`` query heads of its group; 0 on padding.
    """
    b, h_q, s, d = queries.shape
    h_kv = keys.shape[1]
    if keys.shape[0] != b or keys.shape[2:] != (s, d) or h_kv == 0 or h_q % h_kv:
        raise ValueError(f"queries [B, H_q, S, D] and keys [B, H_kv, S, D] with H_q a multiple of H_kv expected; "
                         f"got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size}")
    device = keys.device
    out = torch.zeros(b, h_kv, s, dtype=torch.float32, device=device)
    if b == 0 or s == 0:
        return out
    q, k, precision, upcast = _operands(queries, keys)
    valid_i8 = valid.to(device=device, dtype=torch.int8).contiguous()
    shift = shift.to(device=device, dtype=torch.int64).contiguous()
    n_chunks = triton.cdiv(s, chunk_size)
    block = max(16, min(64, triton.next_power_of_2(chunk_size)))  # tl.dot needs every block dimension >= 16
    block_d = max(16, triton.next_power_of_2(d))
    qk_scale = float(scale) * _LOG2E  # exp(x) = exp2(x log2 e)
    m = torch.empty(b, h_q, s, dtype=torch.float32, device=device)
    inv_l = torch.empty_like(m)
    common = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast)
    strides = (*q.stride(), *k.stride())
    _row_stats[(b * h_q * n_chunks, triton.cdiv(chunk_size, block))](
        q, k, valid_i8, shift, m, inv_l, qk_scale, h_q, h_q // h_kv, n_chunks, s, chunk_size, d, *strides, **common)
    _column_sums[(b * h_kv * n_chunks, triton.cdiv(chunk_size, block))](
        q, k, valid_i8, shift, m, inv_l, out, qk_scale, h_kv, h_q // h_kv, n_chunks, s, chunk_size, d, *strides,
        **common)
    return out


def non_causal_attention_scores_triton(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float,
                                       chunk_size: int) -> torch.Tensor:
    """Column sums of bidirectional attention within chunks (Triton; same result as the PyTorch reference).

    Args:
        queries: ``[B, H_q, S, D]`` post-RoPE queries (fp32, fp16 or bf16; any strides).
        keys: ``[B, H_kv, S, D]`` post-RoPE keys.
        valid: ``[B, S]`` bool, real tokens.
        scale: logit scale.
        chunk_size: tokens per chunk; chunks start at each row's first real token.

    Returns:
        ``[B, H_kv, S]`` fp32: attention each key receives from the real queries of its chunk, averaged over the
        ``H_q / H_kv`` query heads of its group; 0 on padding.
    """
    valid = valid.to(keys.device)
    left_padding = (~valid).long().cumprod(-1).sum(-1)  # [B]: the first chunk of each row starts at its first token
    return column_sums(queries, keys, valid, left_padding, scale, chunk_size)
