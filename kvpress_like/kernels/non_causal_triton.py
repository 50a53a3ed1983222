"""Triton kernel: softmax column sums of bidirectional attention within chunks (flash-style, no chunk x chunk matrix).

Mirrors the inner loop of :func:`kvpress_like.compressors.non_causal_attention.non_causal_attention_scores`: for each
(batch, KV head, query head of the group, chunk) one program takes a block of query rows, finds each row's max and
softmax denominator over the chunk's real keys (first pass), then adds ``exp(s - max) / denominator`` of its real rows
to the keys' column sums (second pass, atomically: several query blocks and the group's query heads add to the same
keys). The caller divides by the group size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _column_sums(q_ptr, k_ptr, valid_ptr, out_ptr, scale, n_kv, groups, n_chunks, chunk, dim,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # over (b, h_kv, g, c), c fastest
    block = tl.program_id(1)  # query block
    c = pid % n_chunks
    g_bh = pid // n_chunks
    bh = g_bh // groups  # b * n_kv + h_kv
    b = bh // n_kv
    kv_row = bh * n_chunks + c  # [B * H_kv * n_chunks, chunk, dim] keys and output
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < chunk
    row_valid = tl.load(valid_ptr + (b * n_chunks + c) * chunk + rows, mask=row_ok, other=0) != 0
    q = tl.load(q_ptr + (pid * chunk + rows[:, None]) * dim + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < dim), other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denominator = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, chunk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < chunk
        col_valid = tl.load(valid_ptr + (b * n_chunks + c) * chunk + cols, mask=col_ok, other=0) != 0
        k = tl.load(k_ptr + (kv_row * chunk + cols[:, None]) * dim + dims[None, :],
                    mask=col_ok[:, None] & (dims[None, :] < dim), other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(col_valid[None, :], s, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, 1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        denominator = denominator * tl.exp(m - safe_m) + tl.sum(tl.exp(s - safe_m[:, None]), 1)
        m = new_m
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.where(row_valid & (denominator > 0), 1.0 / tl.where(denominator > 0, denominator, 1.0), 0.0)
    for start in range(0, chunk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < chunk
        col_valid = tl.load(valid_ptr + (b * n_chunks + c) * chunk + cols, mask=col_ok, other=0) != 0
        k = tl.load(k_ptr + (kv_row * chunk + cols[:, None]) * dim + dims[None, :],
                    mask=col_ok[:, None] & (dims[None, :] < dim), other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.exp(s - safe_m[:, None]) * weight[:, None]
        p = tl.where(col_valid[None, :], p, 0.0)
        tl.atomic_add(out_ptr + kv_row * chunk + cols, tl.sum(p, 0), mask=col_ok)


def chunk_column_sums(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Column sums of within-chunk softmax attention, averaged over each KV head's query heads.

    Args:
        queries: ``[B, H_kv, G, n_chunks, C, D]`` fp32.
        keys: ``[B, H_kv, n_chunks, C, D]`` fp32.
        valid: ``[B, 1, n_chunks, C]`` bool, real tokens (others neither attend nor are attended to).
        scale: logit scale.

    Returns:
        ``[B, H_kv, n_chunks, C]`` fp32.
    """
    b, h_kv, g, n_chunks, chunk, d = queries.shape
    q = queries.float().contiguous()
    k = keys.float().contiguous()
    v = valid.reshape(b, n_chunks, chunk).to(torch.int8).contiguous()
    out = torch.zeros(b, h_kv, n_chunks, chunk, dtype=torch.float32, device=keys.device)
    block = max(16, min(64, triton.next_power_of_2(chunk)))  # tl.dot needs blocks of at least 16
    grid = (b * h_kv * g * n_chunks, triton.cdiv(chunk, block))
    _column_sums[grid](q, k, v, out, float(scale), h_kv, g, n_chunks, chunk, d,
                       BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(d)))
    return out / g
