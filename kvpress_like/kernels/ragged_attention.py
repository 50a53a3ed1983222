"""Attention of new query tokens over a per-head ragged KV cache (every KV head of every row keeps its own count).

:func:`ragged_attention` takes the cache in its flat layout (the fields of :class:`kvpress_like.cache.RaggedLayer`,
described below). On CPU, :func:`ragged_layer_attention` instead attends over the layer's storage as it is, with
:func:`region_attention`: each head's key set is one contiguous region of one ``[C, D]`` storage (kept entries, then
the tokens appended in place), so a decoding step is, per key set, one product over a view, a softmax and one
product into the output, with no copy of the cache, no mask (unless new tokens are padding or several are fed at
once) and no host synchronisation; the geometry comes from the layer as host lists. (The flat layout's CPU path
below needs the appended tokens apart, and concatenates logits and masks per key set.)

The flat layout: the compressed context flat, head
``(b, h)`` owning ``lengths[b, h]`` consecutive rows of ``flat_keys``/``flat_values`` (segments in ``(b, h)``
row-major order), plus an optional dense tail ``[B, H_kv, T, D]`` of tokens appended afterwards to every head, with
``tail_valid`` ``[B, T]`` marking padding among them. The key set of head ``(b, h)`` is its flat segment followed by
its tail; the ``G = H_q / H_kv`` query heads of a group attend to it (query head ``h_kv * G + j``, as transformers'
``repeat_kv``). With ``causal``, the ``q`` new tokens are the last ``q`` entries of every key set (they have already
been appended to the cache) and token ``i`` sees the entries up to its own (bottom-right alignment).

Three paths, same result:

* flash-attention installed, CUDA fp16/bf16 tensors: ``flash_attn_varlen_func`` with each ``(b, h_kv)`` one
  variable-length sequence (its real entries packed back to back, tail padding left out), the group's query heads as
  heads, queries of padding tokens left out;
* on CPU (when the new tokens are all in the tail): per key set, logits (fp32, or fp64 for fp64 inputs) over its
  flat segment (a view, nothing copied) and over its tail, one softmax, two products;
* otherwise PyTorch: the key sets gathered into a padded ``[B, H_kv, L_max + T, D]`` batch and one masked
  ``scaled_dot_product_attention`` with the group's query heads stacked along the query axis (keys never repeated).

Outputs at padding query tokens (whose own entry is tail padding) are 0, on every path. This module mirrors no
scorer: it is the building block for attending over a :class:`~kvpress_like.cache.RaggedLayer` without its padded
view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_FLASH_VARLEN: Callable | None | bool = False  # False = not looked up yet


def _flash_varlen() -> Callable | None:
    """flash-attention's ``flash_attn_varlen_func``, or ``None`` when it cannot be imported (looked up once)."""
    global _FLASH_VARLEN
    if _FLASH_VARLEN is False:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # not installed, or built for another torch/CUDA
            _FLASH_VARLEN = None
        else:
            _FLASH_VARLEN = flash_attn_varlen_func
    return _FLASH_VARLEN


def flash_attn_available() -> bool:
    """Whether flash-attention's variable-length kernel can be imported."""
    return _flash_varlen() is not None


class _Sets:
    """Geometry of the key sets: per ``(b, h_kv)`` segment lengths, tail, the new tokens' own slots.

    Attributes:
        b, h_kv, g, q, t: batch, KV heads, group size, new tokens, tail length.
        lengths: ``[B, H_kv]`` long, flat entries per head.
        tail_valid: ``[B, T]`` bool.
        query_valid: ``[B, q]`` bool, whether each new token's own entry is real (always True without ``causal``).
    """

    def __init__(self, query, flat_keys, flat_values, lengths, tail_keys, tail_values, tail_valid, causal):
        if query.ndim != 4:
            raise ValueError(f"query must be [B, H_q, q, D]; got shape {tuple(query.shape)}")
        self.b, h_q, self.q, d = query.shape
        if lengths.ndim != 2 or lengths.shape[0] != self.b or lengths.shape[1] == 0 or h_q % lengths.shape[1]:
            raise ValueError(f"ragged_attention: inconsistent shapes: lengths must be [B, H_kv] with H_q a multiple of "
                             f"H_kv; got query {tuple(query.shape)}, lengths {tuple(lengths.shape)}")
        self.h_kv = lengths.shape[1]
        self.g = h_q // self.h_kv
        if (flat_keys.ndim != 2 or flat_values.ndim != 2 or flat_keys.shape[0] != flat_values.shape[0]
                or flat_keys.shape[1] != d or flat_keys.shape[0] != int(lengths.sum())):
            raise ValueError(f"ragged_attention: inconsistent shapes: flat keys/values must be [sum(lengths), D]; got "
                             f"{tuple(flat_keys.shape)}, {tuple(flat_values.shape)} for sum(lengths) = "
                             f"{int(lengths.sum())}, D = {d}")
        if (tail_keys is None) != (tail_values is None):
            raise ValueError("ragged_attention: pass both tail_keys and tail_values, or neither")
        device = flat_keys.device
        self.t = 0 if tail_keys is None else tail_keys.shape[2]
        if tail_keys is not None and (tail_keys.shape[:2] != (self.b, self.h_kv) or tail_keys.shape[3] != d
                                      or tail_values.shape[:3] != tail_keys.shape[:3]
                                      or tail_values.shape[3] != flat_values.shape[1]):
            raise ValueError(f"ragged_attention: inconsistent shapes: tail keys/values must be [B, H_kv, T, D]; got "
                             f"{tuple(tail_keys.shape)}, {tuple(tail_values.shape)}")
        if tail_valid is None:
            tail_valid = torch.ones(self.b, self.t, dtype=torch.bool, device=device)
        elif tail_valid.shape != (self.b, self.t):
            raise ValueError(f"ragged_attention: tail_valid must be [B, T] = {(self.b, self.t)}; got "
                             f"{tuple(tail_valid.shape)}")
        self.lengths = lengths.to(device=device, dtype=torch.long)
        self.tail_valid = tail_valid.to(device=device, dtype=torch.bool)
        self.causal = causal
        if causal and self.q > self.t and bool((self.lengths < self.q - self.t).any()):
            raise ValueError(f"ragged_attention: inconsistent shapes: with causal=True every key set must hold the "
                             f"{self.q} new tokens (flat length + tail >= q); pass causal=False for queries that are "
                             f"not in the cache")
        if causal and self.q > 0:  # own slot of new token i: tail position t - q + i (flat entries, if < 0, are real)
            own = torch.arange(self.t - self.q, self.t, device=device)
            padding = self.tail_valid[:, own.clamp(min=0)] if self.t else torch.ones_like(own, dtype=torch.bool)
            self.query_valid = torch.where(own[None, :] >= 0, padding, True).expand(self.b, self.q)
        else:
            self.query_valid = torch.ones(self.b, self.q, dtype=torch.bool, device=device)


def ragged_attention(query: torch.Tensor, flat_keys: torch.Tensor, flat_values: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, causal: bool = True, *, tail_keys: torch.Tensor | None = None,
                     tail_values: torch.Tensor | None = None, tail_valid: torch.Tensor | None = None,
                     use_flash: bool | None = None) -> torch.Tensor:
    """Attention of ``q`` new tokens over per-head ragged key sets (flat segments plus an optional dense tail).

    Args:
        query: ``[B, H_q, q, D]``; ``H_q`` a multiple of ``H_kv``.
        flat_keys: ``[N, D]`` the flat segments back to back in ``(b, h_kv)`` row-major order, ``N = lengths.sum()``.
        flat_values: ``[N, D_v]`` the matching values.
        lengths: ``[B, H_kv]`` long, entries of each flat segment.
        scale: logit scale (default ``D ** -0.5``).
        causal: the new tokens are the last ``q`` entries of every key set and token ``i`` sees the entries up to its
            own; else every new token sees every real entry.
        tail_keys: ``[B, H_kv, T, D]`` entries appended after the flat segments (the same positions for every head).
        tail_values: ``[B, H_kv, T, D_v]``.
        tail_valid: ``[B, T]`` bool, False on padding among the tail entries (default all real).
        use_flash: ``None`` = flash-attention when it applies (installed, CUDA, fp16/bf16, ``D <= 256``), ``False`` =
            PyTorch always, ``True`` = flash-attention or an error.

    Returns:
        ``[B, H_q, q, D_v]`` in ``query``'s dtype; 0 at new tokens that are padding (their own tail entry is padding).

    Raises:
        ValueError: shapes that do not fit together, or ``causal`` with key sets shorter than the new tokens.
        RuntimeError: ``use_flash=True`` where flash-attention does not apply.
    """
    sets = _Sets(query, flat_keys, flat_values, lengths, tail_keys, tail_values, tail_valid, causal)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    flash = _flash_varlen()
    applies = (flash is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
               and query.shape[-1] <= 256 and flat_values.shape[-1] == query.shape[-1]
               and all(x is None or x.dtype == query.dtype for x in (flat_keys, flat_values, tail_keys, tail_values)))
    if use_flash and not applies:
        raise RuntimeError("use_flash=True needs flash-attention installed, CUDA tensors, one fp16/bf16 dtype for "
                           "queries, keys and values, head dim <= 256 and equal key and value head dims")
    if applies and use_flash is not False:
        return _varlen_path(flash, query, flat_keys, flat_values, tail_keys, tail_values, sets, scale)
    if _segments_apply(query, sets):
        return _segment_path(query, flat_keys, flat_values, tail_keys, tail_values, sets, scale)
    return _torch_path(query, flat_keys, flat_values, tail_keys, tail_values, sets, scale)


def _segments_apply(query: torch.Tensor, sets: _Sets) -> bool:
    """Whether :func:`_segment_path` is used: on CPU, when no new token is among the flat entries."""
    return query.device.type == "cpu" and (not sets.causal or sets.t >= sets.q)


def _segment_path(query, flat_keys, flat_values, tail_keys, tail_values, sets: _Sets, scale: float) -> torch.Tensor:
    """Per ``(b, h_kv)`` key set: logits (fp32 or wider) of its ``G * q`` queries over its flat segment (a view) and its
    tail, one softmax over both, then the two weighted sums. Needs the new tokens in the tail when ``sets.causal``."""
    b, h_kv, g, q, t = sets.b, sets.h_kv, sets.g, sets.q, sets.t
    d_v = flat_values.shape[-1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    out = torch.zeros(b, h_kv * g, q, d_v, dtype=dtype, device=query.device)
    starts = (sets.lengths.flatten().cumsum(0) - sets.lengths.flatten()).tolist()
    lengths = sets.lengths.flatten().tolist()
    visible = sets.tail_valid[:, None, :].expand(b, q, t)  # [B, q, T]: tail entries each new token sees
    if sets.causal:
        own = torch.arange(t - q, t, device=query.device)  # each new token's tail position
        visible = visible & (torch.arange(t, device=query.device) <= own[:, None])
    for row in range(b):
        hidden = ~visible[row].repeat(g, 1)  # [G * q, T], rows in (head, token) order
        masked = bool(hidden.any())
        scaled = query[row].reshape(h_kv, g * q, -1).to(dtype) * scale  # [H_kv, G * q, D]
        for h in range(h_kv):
            start, length = starts[row * h_kv + h], lengths[row * h_kv + h]
            queries = scaled[h]
            keys, values = flat_keys[start:start + length].to(dtype), flat_values[start:start + length].to(dtype)
            logits = queries @ keys.T
            if t:
                tail = queries @ tail_keys[row, h].to(dtype).T
                logits = torch.cat([logits, tail.masked_fill_(hidden, float("-inf")) if masked else tail], dim=-1)
            weights = torch.softmax(logits, dim=-1)
            if length == 0:
                weights.nan_to_num_(0.0)  # nothing visible: 0
            result = weights[:, :length] @ values
            if t:
                result += weights[:, length:] @ tail_values[row, h].to(dtype)
            out[row, h * g:(h + 1) * g] = result.view(g, q, d_v)
    return out.masked_fill_(~sets.query_valid[:, None, :, None], 0.0).to(query.dtype)


def ragged_layer_attention(query: torch.Tensor, layer, scale: float | None = None) -> torch.Tensor:
    """Attention of the ``q`` new tokens over a :class:`~kvpress_like.cache.RaggedLayer` after its ``update`` (they
    are the last ``q`` appended tokens of every head).

    On CPU, :func:`region_attention` over the layer's storage as it is (each head's key set is one contiguous region:
    no copy of the cache, no mask, no host synchronisation in a decoding step); elsewhere :func:`ragged_attention`
    over its flat layout (flash-attention's varlen kernel when it applies).

    Args:
        query: ``[B, H_q, q, D]``.
        layer: the ragged layer (read, not changed).
        scale: logit scale (default ``D ** -0.5``).

    Returns:
        ``[B, H_q, q, D]`` in ``query``'s dtype; 0 at new tokens that are padding.
    """
    if query.device.type == "cpu":
        return region_attention(query, *layer.attention_regions(), scale)
    return ragged_attention(query, layer.flat_keys, layer.flat_values, layer.lengths, scale, True,
                            tail_keys=layer.tail_keys, tail_values=layer.tail_values, tail_valid=layer.tail_valid)


def region_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: list[int],
                     lengths: list[int], tail: int, tail_valid: torch.Tensor, all_valid: bool,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention of ``q`` new tokens over key sets that are contiguous regions of one storage.

    Key set ``i = b * H_kv + h`` is ``keys[starts[i] : starts[i] + lengths[i] + tail]``: ``lengths[i]`` entries all
    visible, then ``tail`` entries shared in position by every key set of row ``b`` (``tail_valid[b]`` marks the real
    ones), of which the ``q`` new tokens are the last ``q``; token ``i`` sees the tail entries up to its own. Per key
    set: logits of the group's ``G * q`` queries (fp32, or wider for fp64 inputs) over the region (a view), softmax,
    weighted sum; masks only when ``q > 1`` or some tail entry is padding (``all_valid`` False).

    Args:
        query: ``[B, H_q, q, D]``, ``H_q = G * H_kv`` (query head ``h * G + j`` reads key set ``h``).
        keys: ``[C, D]`` storage; values: ``[C, D_v]``.
        starts, lengths: host lists of ``B * H_kv`` ints, row-major over ``(b, h)``.
        tail: ``T >= q``, entries after each key set's ``lengths[i]``.
        tail_valid: ``[B, T]`` bool.
        all_valid: ``bool(tail_valid.all())``, known to the caller without a synchronisation.
        scale: logit scale (default ``D ** -0.5``).

    Returns:
        ``[B, H_q, q, D_v]`` in ``query``'s dtype; 0 at new tokens whose own tail entry is padding.
    """
    b, h_q, q, d = query.shape
    if b == 0 or len(starts) % b or h_q % (len(starts) // b) or len(lengths) != len(starts) or tail < q:
        raise ValueError(f"region_attention: inconsistent shapes: query {tuple(query.shape)}, {len(starts)} key sets, "
                         f"tail {tail}")
    h_kv = len(starts) // b
    g = h_q // h_kv
    scale = d ** -0.5 if scale is None else float(scale)
    dtype = torch.promote_types(query.dtype, torch.float32)
    scaled = query.reshape(b, h_kv, g * q, d).to(dtype) * scale  # rows of key set h: (j, token) for j < G
    out = scaled.new_empty(b, h_kv, g * q, values.shape[-1])
    hidden = None
    if q > 1 or not all_valid:  # tail entries each new token does not see: padding, and causal among new tokens
        place = torch.arange(tail, device=query.device)
        visible = tail_valid[:, None, :] & (place <= place[tail - q:, None])  # [B, q, T]
        hidden = ~visible[:, None].expand(b, g, q, tail).reshape(b, g * q, tail)
    cast = keys.dtype != dtype
    per_head = zip(scaled.view(b * h_kv, g * q, d).unbind(0), out.view(b * h_kv, g * q, -1).unbind(0), starts, lengths)
    for i, (queries, result, start, length) in enumerate(per_head):
        stop = start + length + tail
        region_keys, region_values = keys[start:stop], values[start:stop]
        if cast:
            region_keys, region_values = region_keys.to(dtype), region_values.to(dtype)
        logits = F.linear(queries, region_keys)  # [G * q, L + T] = queries @ keys.T (the cheapest call for it)
        if hidden is not None:
            logits[:, length:].masked_fill_(hidden[i // h_kv], float("-inf"))
        torch.mm(torch.softmax(logits, dim=-1), region_values, out=result)
    out = out.view(b, h_q, q, -1)
    if not all_valid:  # padding new tokens (their rows may see nothing at all: NaN) give 0
        out = out.masked_fill(~tail_valid[:, None, tail - q:, None], 0.0)
    return out.to(query.dtype)


def _torch_path(query, flat_keys, flat_values, tail_keys, tail_values, sets: _Sets, scale: float) -> torch.Tensor:
    """Padded gather of the key sets and one masked SDPA, the group's query heads stacked along the query axis."""
    b, h_kv, g, q, t = sets.b, sets.h_kv, sets.g, sets.q, sets.t
    device = flat_keys.device
    lengths = sets.lengths
    longest = int(lengths.max()) if lengths.numel() else 0
    offsets = (lengths.flatten().cumsum(0) - lengths.flatten()).view(b, h_kv)
    slot = torch.arange(longest, device=device)
    present = slot < lengths[..., None]  # [B, H_kv, L]
    index = (offsets[..., None] + slot).clamp(max=max(flat_keys.shape[0] - 1, 0))
    dtype = query.dtype
    if flat_keys.shape[0]:
        keys, values = flat_keys[index].to(dtype), flat_values[index].to(dtype)  # [B, H_kv, L, D]
    else:
        keys = flat_keys.new_zeros(b, h_kv, longest, flat_keys.shape[1], dtype=dtype)
        values = flat_values.new_zeros(b, h_kv, longest, flat_values.shape[1], dtype=dtype)
    real = present
    position = slot.expand(b, h_kv, longest)  # place of each slot in its key set
    if t:
        keys = torch.cat([keys, tail_keys.to(dtype)], dim=2)
        values = torch.cat([values, tail_values.to(dtype)], dim=2)
        real = torch.cat([present, sets.tail_valid[:, None, :].expand(b, h_kv, t)], dim=-1)
        position = torch.cat([position, lengths[..., None] + torch.arange(t, device=device)], dim=-1)
    mask = real[:, :, None, :]  # [B, H_kv, 1 or q, L + T]
    if sets.causal and q:
        own = lengths[..., None] + t - q + torch.arange(q, device=device)  # [B, H_kv, q]: each new token's place
        mask = mask & (position[:, :, None, :] <= own[..., None])
    mask = mask & sets.query_valid[:, None, :, None]
    mask = mask | ~mask.any(-1, keepdim=True)  # no real entry visible (padding tokens): any finite row, zeroed below
    if mask.shape[2] == 1:
        stacked_mask = mask  # [B, H_kv, 1, L + T], the same for every stacked query
    else:
        stacked_mask = mask[:, :, None].expand(b, h_kv, g, q, mask.shape[-1]).reshape(b, h_kv, g * q, -1)
    stacked = query.reshape(b, h_kv, g * q, query.shape[-1])  # query head h_kv * G + j is row block j
    out = F.scaled_dot_product_attention(stacked, keys, values, attn_mask=stacked_mask, scale=scale)
    out = out.view(b, h_kv * g, q, -1)
    seen = real[:, :, None, :].expand(b, h_kv, q, real.shape[-1]) if not sets.causal else None
    zero = ~sets.query_valid[:, None, :]  # [B, 1, q]
    if seen is not None:  # without causal: a key set with no real entry gives 0
        zero = zero | ~seen.any(-1).repeat_interleave(g, dim=1)
    return out.masked_fill(zero[..., None], 0.0)


def _varlen_path(varlen_fn, query, flat_keys, flat_values, tail_keys, tail_values, sets: _Sets,
                 scale: float) -> torch.Tensor:
    """Each ``(b, h_kv)`` one sequence for ``varlen_fn`` (``flash_attn_varlen_func``'s signature and bottom-right
    causal alignment): its flat segment then its real tail entries; queries of padding tokens left out."""
    b, h_kv, g, q, t = sets.b, sets.h_kv, sets.g, sets.q, sets.t
    d, d_v = query.shape[-1], flat_values.shape[-1]
    device = query.device
    lengths = sets.lengths.flatten()  # [B * H_kv], (b, h) row-major as the flat segments
    tail_count = sets.tail_valid.sum(-1).repeat_interleave(h_kv)  # [B * H_kv] real tail entries per set
    set_lengths = lengths + tail_count
    cu_k = F.pad(set_lengths.cumsum(0), (1, 0))
    # flat row r of set s goes to r + (real tail entries of the sets before s)
    tail_before = cu_k[:-1] - (lengths.cumsum(0) - lengths)
    owner = torch.repeat_interleave(torch.arange(b * h_kv, device=device), lengths)
    total = int(cu_k[-1])
    keys = flat_keys.new_empty(total, 1, d)
    values = flat_values.new_empty(total, 1, d_v)
    flat_dest = torch.arange(flat_keys.shape[0], device=device) + tail_before[owner]
    keys[flat_dest, 0], values[flat_dest, 0] = flat_keys, flat_values
    if t:
        tail_mask = sets.tail_valid[:, None, :].expand(b, h_kv, t)  # [B, H_kv, T]
        rank = (sets.tail_valid.long().cumsum(-1) - 1)[:, None, :].expand(b, h_kv, t)
        start = (cu_k[:-1] + lengths).view(b, h_kv, 1)
        tail_dest = (start + rank)[tail_mask]
        keys[tail_dest, 0], values[tail_dest, 0] = tail_keys[tail_mask], tail_values[tail_mask]
    # queries: [B, H_kv, q, G, D], the real new tokens of each set
    grouped = query.view(b, h_kv, g, q, d).permute(0, 1, 3, 2, 4)
    query_mask = sets.query_valid[:, None, :].expand(b, h_kv, q)
    packed_q = grouped[query_mask]  # [total_q, G, D], (b, h, i) order
    q_lengths = sets.query_valid.sum(-1).repeat_interleave(h_kv)
    cu_q = F.pad(q_lengths.cumsum(0), (1, 0))
    out = varlen_fn(packed_q.contiguous(), keys, values, cu_q.to(torch.int32), cu_k.to(torch.int32),
                    int(q_lengths.max()) if q_lengths.numel() else 0,
                    int(set_lengths.max()) if set_lengths.numel() else 0, softmax_scale=scale, causal=sets.causal)
    full = out.new_zeros(b, h_kv, q, g, d_v)
    full[query_mask] = out
    if not sets.causal:  # a key set with no entry gives 0
        full = full.masked_fill((set_lengths == 0).view(b, h_kv, 1, 1, 1), 0.0)
    return full.permute(0, 1, 3, 2, 4).reshape(b, h_kv * g, q, d_v)
