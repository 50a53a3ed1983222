"""Attention of new queries over a per-head ragged KV cache (every KV head of every row keeps its own count).

Each (batch row, KV head) is one variable-length sequence of keys; the ``G`` query heads of the group attend to it.
With flash-attention installed and CUDA tensors, :func:`ragged_attention` calls its variable-length kernel
(``flash_attn_varlen_func``, the sequences packed back to back, no padding); otherwise it gathers the sequences into a
padded batch and runs masked ``scaled_dot_product_attention``. The model's own attention over a
:class:`~kvpress_like.cache.RaggedLayer` currently goes through the padded view and a mask (``sdpa``/``eager``);
this function is the building block for a variable-length path, tested against dense masked attention.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def flash_varlen_available(tensor: torch.Tensor) -> bool:
    """flash-attention is importable and ``tensor`` is on CUDA."""
    return tensor.is_cuda and importlib.util.find_spec("flash_attn") is not None


def ragged_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, causal: bool = True) -> torch.Tensor:
    """Attention of ``q`` new tokens over variable-length key sets.

    Args:
        query: ``[B, H_q, q, D]``.
        keys: ``[N, D]`` the key sets packed back to back, (row 0 head 0, row 0 head 1, ..., row 1 head 0, ...);
            each set ends with the ``q`` new tokens' keys.
        values: ``[N, D]`` the matching values.
        lengths: ``[B, H_kv]`` long, keys per set (each ``>= q``); ``H_q`` must be a multiple of ``H_kv``.
        scale: logit scale.
        causal: new token ``i`` sees the set's keys up to its own (bottom-right aligned); else every key.

    Returns:
        ``[B, H_q, q, D]`` in ``query``'s dtype.
    """
    b, h_q, q, d = query.shape
    h_kv = lengths.shape[1]
    if h_q % h_kv or keys.shape != values.shape or keys.shape[0] != int(lengths.sum()) or bool((lengths < q).any()):
        raise ValueError("ragged_attention: inconsistent shapes (query heads a multiple of KV heads, keys/values "
                         "[sum(lengths), D], every set at least as long as the queries)")
    g = h_q // h_kv
    grouped = query.view(b, h_kv, g, q, d).reshape(b * h_kv, g, q, d)
    flat_lengths = lengths.reshape(-1).to(torch.int32)
    if flash_varlen_available(query):
        from flash_attn import flash_attn_varlen_func

        cu_k = F.pad(flat_lengths.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b * h_kv + 1) * q, q, dtype=torch.int32, device=query.device)
        packed_q = grouped.permute(0, 2, 1, 3).reshape(b * h_kv * q, g, d)
        out = flash_attn_varlen_func(packed_q, keys[:, None], values[:, None], cu_q, cu_k, q,
                                     int(flat_lengths.max()), softmax_scale=scale, causal=causal)
        return out.view(b * h_kv, q, g, d).permute(0, 2, 1, 3).reshape(b, h_q, q, d)
    longest = int(flat_lengths.max())
    starts = F.pad(flat_lengths.long().cumsum(0), (1, 0))[:-1]
    slot = torch.arange(longest, device=keys.device)
    present = slot[None, :] < flat_lengths[:, None]  # [B * H_kv, L]
    index = (starts[:, None] + slot[None, :]).clamp(max=keys.shape[0] - 1)
    padded_k, padded_v = keys[index], values[index]  # [B * H_kv, L, D]
    mask = present[:, None, :].expand(-1, q, -1)
    if causal:  # query i (0-based among the q new ones) sees keys up to position length - q + i
        limit = flat_lengths[:, None] - q + torch.arange(q, device=keys.device)[None, :]  # [B * H_kv, q]
        mask = mask & (slot[None, None, :] <= limit[..., None])
    out = F.scaled_dot_product_attention(grouped, padded_k[:, None].to(query.dtype), padded_v[:, None].to(query.dtype),
                                         attn_mask=mask[:, None], scale=scale)
    return out.reshape(b, h_q, q, d)
