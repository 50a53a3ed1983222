"""Non-causal chunked attention scores (the attention half of Compactor).

Paper: Chari & Van Durme, "Compactor", arXiv 2507.08143. The context is split into chunks of ``chunk_size`` tokens
(256 by default); inside each chunk every post-RoPE query attends to every key of the chunk with no causal mask,
``softmax(Q_c K_c^T / sqrt(d))``; a key's score is its column sum (the attention it receives from its chunk),
averaged over the query heads of its KV group, then smoothed over neighbouring tokens by average pooling.

Chunks start at each row's first real token (left padding of a batch does not shift them).

Departures: the scale is the model's own attention scale (``1/sqrt(d)`` for all supported models but Gemma3, which
uses ``query_pre_attn_scalar``); padding tokens are excluded as queries and keys; a shorter last chunk is used as
is (no mass re-balancing). Memory is ``O(S * chunk_size)`` per head, never ``S x S``.

Implementation (the formula above, in fp32): on the PyTorch path each row is scored from its first real token, so the
chunks need no roll and no filler; the chunks of one KV group are processed a few at a time (``BLOCK_BYTES`` of
attention weights, so ``Q_c K_c^T``, the in-place softmax and the column sums stay in a core's cache in one reused
buffer), the scale is applied inside the matrix product (``baddbmm``), the shorter last chunk is scored on its own,
and only rows with padding after a real token are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, check_odd_kernel
from ..kernels import non_causal_attention_scores as fused_column_sums
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


BLOCK_BYTES = 1 << 20  # fp32 attention weights per block: small enough to stay in a core's L2 cache


@torch.no_grad()  # scores carry no gradient; the in-place buffers below need none
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
    fused = fused_column_sums(queries, keys, valid, scale, chunk_size)  # Triton on CUDA, else None
    if fused is not None:
        return fused
    b, h_q, s, _ = queries.shape
    h_kv = keys.shape[1]
    g = h_q // h_kv
    out = torch.zeros(b, h_kv, s, dtype=torch.float32, device=keys.device)
    keys = keys.float()  # no copy for fp32 keys
    pads = (~valid).long().cumprod(-1).sum(-1)  # left padding of each row: chunks start at its first real token
    holes = valid.long().diff(dim=-1).lt(0).any(-1)  # a real token followed by padding: needs masking
    step = max(1, BLOCK_BYTES // (4 * g * chunk_size * chunk_size))  # whole chunks per block
    blocks = []  # (row, KV head, first token, chunks, chunk length, masked)
    for row, (first, masked) in enumerate(zip(pads.tolist(), holes.tolist(), strict=True)):
        full, tail = divmod(s - first, chunk_size)  # a row without real tokens has none
        for h in range(h_kv):
            blocks += [
                (row, h, first + c * chunk_size, min(step, full - c), chunk_size, masked) for c in range(0, full, step)
            ]
            if tail:  # the shorter last chunk, on its own: no filler tokens to mask
                blocks.append((row, h, first + full * chunk_size, 1, tail, masked))
    with torch.autocast(keys.device.type, enabled=False):  # fp32 products even inside an autocast region
        _score_blocks(queries, keys, valid, scale, g, out, blocks)
    return out.div_(g)


def _score_blocks(queries, keys, valid, scale: float, g: int, out: torch.Tensor, blocks: list) -> None:
    """Column sums of ``blocks``, summed (not averaged) over each group's query heads, written into ``out``.

    A block is ``(row, h, start, m, size, masked)``: ``m`` chunks of ``size`` tokens of KV head ``h`` in batch row
    ``row`` from token ``start``. Its ``[G, m, size, size]`` logits (scale applied inside the matrix product), the
    in-place softmax and the column sums run in one reused buffer that stays in cache. ``masked`` blocks (a row with
    padding after a real token) mask padding keys and queries.
    """
    d = keys.shape[-1]
    buffer = torch.empty(max(g * m * size * size for *_, m, size, _ in blocks), dtype=torch.float32, device=keys.device)
    for row, h, start, m, size, masked in blocks:
        tokens = slice(start, start + m * size)
        q = queries[row, h * g : (h + 1) * g, tokens].float().reshape(g, m, size, d)  # a view for fp32 queries
        k_t = keys[row, h, tokens].reshape(m, size, d).transpose(1, 2)  # [m, D, size], a view
        w = buffer[: g * m * size * size].view(g, m, size, size)
        for i in range(g):
            torch.baddbmm(w[i], q[i], k_t, beta=0.0, alpha=scale, out=w[i])
        if masked:
            real = valid[row, tokens].view(m, size)
            w.masked_fill_(~real[None, :, None, :], float("-inf"))  # padding keys get no attention
        torch.softmax(w, -1, out=w)  # in place
        if masked:
            w.masked_fill_(~real[None, :, :, None], 0.0)  # padding queries give none (their rows may be NaN)
        torch.sum(w, (0, 2), out=out[row, h, tokens].view(m, size))


@dataclass
class NonCausalAttentionPress(Press):
    """Keeps keys that receive the most bidirectional attention within their chunk.

    Args:
        chunk_size: tokens per chunk (256 in the paper).
        kernel_size: average-pooling width over neighbouring tokens (1 = none).
        value_norm: multiply each key's attention by the L2 norm of its value (what the key contributes to the
            attention output), before pooling.
        attention_scale: logit scale of the chunk attention; ``None`` uses the model's own (``1/sqrt(d)``).
    """

    name = "non_causal_attention"
    needs = frozenset({"queries"})  # what score() reads (kvpress_like.scorer.NEEDS)
    chunk_size: int = 256
    kernel_size: int = 5
    value_norm: bool = False
    attention_scale: float | None = None

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        check_int("chunk_size", self.chunk_size, minimum=1)
        check_odd_kernel("kernel_size", self.kernel_size)
        if not isinstance(self.value_norm, bool):
            raise TypeError(f"value_norm must be True or False; got {self.value_norm!r}")
        if self.attention_scale is not None and (
            isinstance(self.attention_scale, bool) or not isinstance(self.attention_scale, (int, float))
            or not self.attention_scale > 0
        ):
            raise ValueError(f"attention_scale must be a positive number or None; got {self.attention_scale!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scale = ctx.scaling if self.attention_scale is None else float(self.attention_scale)
        scores = non_causal_attention_scores(ctx.queries(), ctx.keys, ctx.valid, scale, self.chunk_size)
        if self.value_norm:
            scores = scores * ctx.values.float().norm(dim=-1)
        return pool(scores, ctx.valid, self.kernel_size)
