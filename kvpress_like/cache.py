"""Cache storage for compressed layers.

A compressed layer keeps two lengths apart:

* the *logical* length: how many tokens this layer has seen. transformers derives default positions from
  ``cache.get_seq_length()``, so later tokens keep the positions they would have had without compression.
* the *physical* length: how many key/value entries are stored.

Rows of a batch may keep different numbers of entries (their contexts have different lengths); the layer then
stores ``max`` entries per row and marks the unused slots in ``valid``. Slots are never attended to when invalid.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CompressedLayer(DynamicLayer):
    """A dense cache layer holding the kept entries of a compressed context, then every new token.

    Attributes:
        keys: ``[B, H_kv, P, D]`` kept keys (post-RoPE, as the model cached them), then appended ones.
        values: ``[B, H_kv, P, D]`` the matching values.
        valid: ``[B, P]`` bool, ``False`` for slots that hold nothing (a shorter row's filler, or padding).
        logical_length: number of tokens the layer has seen (kept, evicted and appended).
        compressed_length: number of physical entries that belong to the compressed context; entries after it
            are uncompressed, appended tokens.
    """

    is_croppable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, logical_length: int):
        super().__init__()
        if keys.shape != values.shape or keys.ndim != 4:
            raise ValueError(f"keys and values must both be [B, H, P, D]; got {tuple(keys.shape)}, {tuple(values.shape)}")
        if valid.shape != (keys.shape[0], keys.shape[2]) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {(keys.shape[0], keys.shape[2])}")
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.valid = keys, values, valid
        self.logical_length = int(logical_length)
        self.compressed_length = keys.shape[2]
        self.pending_valid: torch.Tensor | None = None
        self.is_initialized = True

    @property
    def physical_length(self) -> int:
        """Number of stored entries per row and head (``P``)."""
        return self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H_kv, q, D]`` new keys and values; returns the whole stored keys and values."""
        q = key_states.shape[-2]
        new_valid = self.pending_valid
        if new_valid is None:
            new_valid = torch.ones(key_states.shape[0], q, dtype=torch.bool, device=self.valid.device)
        self.pending_valid = None
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.valid = torch.cat([self.valid, new_valid.to(self.valid.device)], dim=-1)
        self.logical_length += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Logical length: tokens seen, so positions continue as without compression."""
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` such that new tokens line up causally with their logical positions."""
        return self.physical_length + query_length, self.logical_length - self.physical_length

    def attention_mask(self, incoming: torch.Tensor | None, query_length: int, float_dtype: torch.dtype | None):
        """Mask for ``query_length`` new tokens over the stored entries plus themselves.

        Args:
            incoming: the mask transformers built for this forward (``[B, 1, q, kv]``, bool or additive float),
                or ``None``. Only its last ``q`` columns (new tokens among themselves) are used.
            query_length: ``q``.
            float_dtype: when not ``None`` and ``incoming`` is ``None``, return an additive float mask of this
                dtype (eager attention); otherwise a bool mask (True = attend).

        Returns:
            ``[B, 1, q, P + q]`` mask, or ``None`` when plain unmasked attention is already right.
        """
        q, b = query_length, self.keys.shape[0]
        device = self.valid.device
        if incoming is None:
            if q == 1 and bool(self.valid.all()):
                return None
            new = torch.ones(q, q, dtype=torch.bool, device=device).tril()[None, None].expand(b, 1, q, q)
        elif incoming.dtype == torch.bool:
            new = incoming[..., -q:]
        else:
            new = incoming[..., -q:] == 0
            float_dtype = incoming.dtype
        past = self.valid[:, None, None, :].expand(b, 1, q, self.physical_length)
        mask = torch.cat([past, new.expand(b, 1, q, q).to(device)], dim=-1)
        if float_dtype is None:
            return mask
        zero = torch.zeros((), dtype=float_dtype, device=device)
        return torch.where(mask, zero, torch.finfo(float_dtype).min)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` appended tokens (never entries of the compressed context)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0:
            return
        if n > self.physical_length - self.compressed_length:
            raise ValueError(
                f"cannot crop {n} tokens: only {self.physical_length - self.compressed_length} tokens were appended "
                "after the compressed context, and compressed entries cannot be un-evicted"
            )
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.valid = self.valid[:, :-n]
        self.logical_length -= n

    def reset(self) -> None:
        super().reset()
        self.valid = None
        self.logical_length = 0
        self.compressed_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.valid = self.valid[indices, ...]

    def nbytes(self) -> int:
        """Bytes held: keys and values, plus the ``[B, P]`` bool ``valid`` mask (one byte per slot)."""
        return tensor_bytes(self.keys) + tensor_bytes(self.values) + tensor_bytes(self.valid)


def tensor_bytes(t: torch.Tensor | None) -> int:
    """``numel * element_size`` of a tensor, 0 for ``None``."""
    return 0 if t is None else t.numel() * t.element_size()


def layer_bytes(layer) -> int:
    """Bytes held by one cache layer (keys, values and any index metadata)."""
    if hasattr(layer, "nbytes"):
        return layer.nbytes()
    return tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))


def cache_bytes(cache: Cache) -> int:
    """Total bytes held by every layer of a transformers ``Cache``."""
    return sum(layer_bytes(layer) for layer in cache.layers)
