"""Non-causal chunked attention scores (the attention half of Compactor).

Paper: Chari & Van Durme, "Compactor", arXiv 2507.08143. The context is split into chunks of ``chunk_size`` tokens
(256 by default); inside each chunk every post-RoPE query attends to every key of the chunk with no causal mask,
``softmax(Q_c K_c^T / sqrt(d))``; a key's score is its column sum (the attention it receives from its chunk),
averaged over the query heads of its KV group, then smoothed over neighbouring tokens by average pooling.

Chunks start at each row's first real token (left padding of a batch does not shift them).

Departures: the scale is the model's own attention scale (``1/sqrt(d)`` for all supported models but Gemma3, which
uses ``query_pre_attn_scalar``); padding tokens are excluded as queries and keys; a shorter last chunk is used as
is (no mass re-balancing). Memory is ``O(S * chunk_size)`` per head, never ``S x S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import use_triton
from ..press import LayerContext, Press
from .snapkv import pool


def roll_rows(x: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotate each row ``b`` of ``x`` left by ``shift[b]`` along ``dim`` (``shift`` ``[B]``, ``x`` batch-first).

    With ``shift`` the left padding of each row, the real tokens start at index 0, so chunks are laid on each row's
    own tokens; rolling by ``-shift`` undoes it.
    """
    s = x.shape[dim]
    index = (torch.arange(s, device=x.device)[None, :] + shift[:, None]) % s  # [B, S]
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = s
    return x.gather(dim, index.view(shape).expand(x.shape))


def non_causal_attention_scores(queries, keys, valid, scale: float, chunk_size: int) -> torch.Tensor:
    """Column sums of bidirectional attention within chunks.

    Args:
        queries: ``[B, H_q, S, D]`` post-RoPE queries.
        keys: ``[B, H_kv, S, D]`` post-RoPE keys.
        valid: ``[B, S]`` bool, real tokens.
        scale: logit scale.
        chunk_size: tokens per chunk.

    Returns:
        ``[B, H_kv, S]`` fp32: attention each key receives from the real queries of its chunk, averaged over the
        ``H_q / H_kv`` query heads of its group; 0 on padding.
    """
    b, h_q, s, d = queries.shape
    h_kv = keys.shape[1]
    g = h_q // h_kv
    padded = not bool(valid.all())
    pad = (~valid).long().cumprod(-1).sum(-1)  # left padding of each row: chunks start at its first real token
    if padded:
        queries, keys, valid = roll_rows(queries, pad, 2), roll_rows(keys, pad, 2), roll_rows(valid, pad, 1)
    n_chunks = -(-s // chunk_size)
    extra = n_chunks * chunk_size - s  # pad to whole chunks with non-real tokens
    masked = padded or extra > 0
    queries = F.pad(queries.float(), (0, 0, 0, extra)).view(b, h_kv, g, n_chunks, chunk_size, d)
    keys = F.pad(keys.float(), (0, 0, 0, extra)).view(b, h_kv, n_chunks, chunk_size, d)
    valid = F.pad(valid, (0, extra)).view(b, 1, n_chunks, chunk_size)
    if use_triton(keys):
        from ..kernels.non_causal_triton import chunk_column_sums

        out = chunk_column_sums(queries, keys, valid, scale)
    else:
        out = _chunk_column_sums(queries, keys, valid, scale, masked)
    out = out.view(b, h_kv, -1)[..., :s]
    return roll_rows(out, -pad, 2) if padded else out


def _chunk_column_sums(queries, keys, valid, scale: float, masked: bool) -> torch.Tensor:
    """PyTorch path of the column sums: ``queries`` ``[B, H_kv, G, n, C, D]``, ``keys`` ``[B, H_kv, n, C, D]``,
    ``valid`` ``[B, 1, n, C]``; returns ``[B, H_kv, n, C]`` averaged over the ``G`` query heads."""
    b, h_kv, g, n_chunks, chunk_size, _ = queries.shape
    out = torch.empty(b, h_kv, n_chunks, chunk_size, dtype=torch.float32, device=keys.device)
    step = max(1, (1 << 24) // (h_kv * g * chunk_size * chunk_size))  # chunks per batched matmul: bounded memory
    for first in range(0, n_chunks, step):
        part = slice(first, min(first + step, n_chunks))
        # [B, H_kv, G, c, C, C]: the key chunks broadcast over the G query heads of their KV head
        logits = (queries[:, :, :, part] * scale) @ keys[:, :, None, part].transpose(-1, -2)
        if masked:  # padding (and the filler of the last chunk) neither attends nor is attended to
            m = valid[:, :, None, part]  # [B, 1, 1, c, C]
            logits = logits.masked_fill(~m[..., None, :], float("-inf"))
            weights = torch.softmax(logits, dim=-1).nan_to_num(0.0) * m[..., None]
        else:
            weights = torch.softmax(logits, dim=-1)
        out[:, :, part] = weights.sum(dim=-2).mean(dim=2)
    return out


@dataclass
class NonCausalAttentionPress(Press):
    """Keeps keys that receive the most bidirectional attention within their chunk.

    Args:
        chunk_size: tokens per chunk (256 in the paper).
        kernel_size: average-pooling width over neighbouring tokens (1 = none).
    """

    name = "non_causal_attention"
    chunk_size: int = 256
    kernel_size: int = 5

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {self.chunk_size!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int; got {self.kernel_size!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = non_causal_attention_scores(ctx.queries(), ctx.keys, ctx.valid, ctx.module.scaling, self.chunk_size)
        return pool(scores, ctx.valid, self.kernel_size)
