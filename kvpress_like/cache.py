"""Cache storage for compressed layers.

A compressed layer keeps two lengths apart:

* the *logical* length: how many tokens this layer has seen. transformers derives default positions from
  ``cache.get_seq_length()``, so later tokens keep the positions they would have had without compression.
* the *physical* length: how many key/value entries are stored.

Rows of a batch may keep different numbers of entries (their contexts have different lengths); the layer then
stores ``max`` entries per row and marks the unused slots in ``valid``. Slots are never attended to when invalid.

Every compressed layer class carries its own capabilities, as transformers' layer classes do (``is_sliding``,
``is_compileable``), so that callers (saving and loading, the pipeline, the CLI, decoding-time compression) work
through this interface and never switch on the class:

* flags: ``is_croppable`` (``crop`` removes appended tokens), ``is_reorderable`` (beam-search reordering and batch
  expansion work), ``per_head`` (the KV heads of a row keep different numbers of entries), ``is_dynamic`` (it grows
  with every new token, so a press may install on a cache holding it), ``recompress_problem`` (``None`` when
  decoding-time compression may cut the layer again, else why not);
* :meth:`~CompressedLayer.kept_entries`: ``(kept, total)`` KV pairs of the compressed context;
* :meth:`~CompressedLayer.to_record` / :meth:`~CompressedLayer.from_record` / :meth:`~CompressedLayer.check_record`:
  the layer as a dict of tensors and numbers (``record["kind"]`` is the class's ``RECORD_KIND``; the tensors are named
  by ``RECORD_TENSORS``), as :mod:`kvpress_like.saved_cache` writes and validates it. :data:`RECORD_CLASSES` maps each
  kind to its class; a new storage kind adds itself there.
"""

from __future__ import annotations

import copy

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import (
    BaseQuantizedLayer,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)

from .checks import check_int

# who attends the current forward: a compressed layer's ``update`` asks whether it is one of the attention functions
# kvpress_like.attention registers or transformers' plain sdpa/eager, and refuses plain attention where it would not
# give the same result (transformers' one mask per forward cannot say which entries of each row and head are real)
from .forward_notes import (
    KVPRESS_ATTENTION,
    forward_attention,
    mask_physical_length,
    note_extended,
    note_mask_query,
    note_update,
    take_extended,
)
from .patches.base import layer_types

# transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache`` (the old name still works, with a
# deprecation warning, until 5.40).
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


CROP_HINT = ("Generation that feeds candidate tokens with the prompt and crops the rejected ones (assisted decoding: "
             "generate(assistant_model=...) or prompt_lookup_num_tokens=...) is not supported on a compressed cache.")


PLAIN_ATTENTION_HINT = (
    "Use the cache inside `with press(model, p):` (any press), or attend it with the attention function kvpress_like "
    "registers, which works outside a press too: model.set_attn_implementation('kvpress_like_sdpa') (or "
    "'kvpress_like_eager' for an eager model; import kvpress_like.attention first if kvpress_like.cache was not "
    "imported)."
)


def check_attention(layer, key_states: torch.Tensor) -> str | None:
    """Before a compressed layer's ``update``: raise if this forward's attention is plain ``sdpa``/``eager`` and the
    layer cannot be attended by it exactly (``layer.plain_attention_problem()`` says why), or if the registered
    attention meets a layer that plain attention extended in a batch. Returns :func:`forward_attention`."""
    mode = forward_attention(layer, key_states.shape[-2])
    if mode == "plain":
        problem = layer.plain_attention_problem()
        if problem:
            _undo_extensions(key_states.shape[-2])
            raise ValueError(
                f"this cache holds a compressed context ({type(layer).__name__}) that transformers' plain attention "
                f"cannot attend correctly: {problem}. {PLAIN_ATTENTION_HINT}"
            )
        note_extended(layer)
        if key_states.shape[0] > 1:  # padding among these new tokens is seen by plain attention's mask, never stored
            layer.extended_by_plain_attention = True
    elif mode is not None and getattr(layer, "extended_by_plain_attention", False):
        raise ValueError(
            "this compressed cache was extended, in a batch, by a forward with transformers' plain attention (outside "
            "a press), which does not record which of the new tokens were padding; it cannot be attended exactly "
            "inside a press any more. Keep a batched compressed cache inside `with press(model, p):`, or switch the "
            "model to model.set_attn_implementation('kvpress_like_sdpa') before using it outside"
        )
    return mode


def _undo_extensions(query_length: int) -> None:
    """Remove the ``q`` tokens that this refused forward already appended to compressed layers before the refusing one
    (so that the cache stays as it was; uncompressed layers of transformers, e.g. Gemma3's sliding-window layers updated
    before the first compressed layer, are not reachable from here)."""
    for layer in take_extended():
        if getattr(layer, "is_croppable", False):
            try:
                layer.crop(-query_length)
            except NotImplementedError:  # a quantized layer cannot be cropped
                pass


def new_token_validity(mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """``[B, q]`` bool: which of the ``q`` new tokens are real, read from the diagonal of the last ``q`` columns of a
    4D mask ``[B, 1 or H, q, kv]`` (bool, or additive float with 0 = attend): a token sees itself unless it is
    padding."""
    own = torch.diagonal(mask[:, 0, :, -query_length:], dim1=-2, dim2=-1)
    return own if own.dtype == torch.bool else own == 0


def valid_tokens(mask: torch.Tensor | None, batch: int, q: int, device) -> torch.Tensor:
    """``[B, q]`` bool: which of the ``q`` new tokens are real, read from the last query row of a 4D mask
    ``[B, 1 or H, q, kv]`` (bool, or additive float with 0 = attend; ``None`` = all real)."""
    if mask is None:
        return torch.ones(batch, q, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, -q:]
    return last if last.dtype == torch.bool else last == 0


def cache_in(kwargs: dict) -> Cache | None:
    """The cache passed to a forward call as keyword arguments, under either name."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


class CompressedLayer(DynamicLayer):
    """A dense cache layer holding the kept entries of a compressed context, then every new token.

    Attributes:
        keys: ``[B, H_kv, P, D]`` kept keys (post-RoPE, as the model cached them), then appended ones.
        values: ``[B, H_kv, P, D]`` the matching values.
        valid: ``[B, P]`` bool, ``False`` for slots that hold nothing (a shorter row's filler, or padding).
        logical_length: number of tokens the layer has seen (kept, evicted and appended).
        compressed_length: number of physical entries that belong to the compressed context; entries after it
            are uncompressed, appended tokens.

    Appended tokens are written in place into room reserved after the stored entries (``APPEND_RESERVE`` tokens at a
    time, counted by :meth:`nbytes`): a decoding step copies one token, not the whole layer as ``torch.cat`` would.
    ``keys``/``values`` are views of that storage.
    """

    is_croppable = True
    is_reorderable = True
    per_head = False
    recompress_problem: str | None = None
    RECORD_KIND = "compressed"
    RECORD_TENSORS = ("keys", "values", "valid")
    APPEND_RESERVE = 64

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, logical_length: int):
        super().__init__()
        if keys.shape != values.shape or keys.ndim != 4:
            raise ValueError(
                f"keys and values must both be [B, H, P, D]; got {tuple(keys.shape)}, {tuple(values.shape)}"
            )
        if valid.shape != (keys.shape[0], keys.shape[2]) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {(keys.shape[0], keys.shape[2])}")
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.valid = keys, values, valid
        self.logical_length = int(logical_length)
        self.compressed_length = keys.shape[2]
        self.pending_valid: torch.Tensor | None = None
        self._storage: dict[str, torch.Tensor] = {}  # "keys"/"values" -> [B, H, capacity, D] reserved storage
        self.selected: torch.Tensor | None = None  # [B, H, P] indices gathered from the source, until like_source
        self.is_initialized = True

    @property
    def physical_length(self) -> int:
        """Number of stored entries per row and head (``P``)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H_kv, q, D]`` new keys and values; returns the whole stored keys and values.

        Raises:
            ValueError: this forward is attended by transformers' plain sdpa/eager and plain attention would not give
                the exact result (see :meth:`plain_attention_problem`).
        """
        q = key_states.shape[-2]
        mode = check_attention(self, key_states)
        if not self.is_initialized:  # after reset(): grow from empty [B, H, 0, D] keys and values
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            self.valid = torch.ones(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)
        new_valid = self.pending_valid
        if new_valid is None:
            new_valid = torch.ones(key_states.shape[0], q, dtype=torch.bool, device=self.valid.device)
        self.pending_valid = None
        self.keys = self._append("keys", self.keys, key_states)
        self.values = self._append("values", self.values, value_states)
        self.valid = torch.cat([self.valid, new_valid.to(self.valid.device)], dim=-1)
        self.logical_length += q
        if mode != "plain":
            note_update(self, self.keys)
        return self.keys, self.values

    def plain_attention_problem(self) -> str | None:
        """Why transformers' plain sdpa/eager, with the one mask it builds for every layer of this forward, would not
        attend this layer exactly (``None`` when it would: every stored slot is real and the layer holds as many
        entries as the layer the mask was sized for)."""
        if self.valid is None or self.compressed_length == 0:  # reset: a plain growing layer
            return None
        if self.physical_length != mask_physical_length():
            return ("its layers hold different numbers of entries (per-layer budgets: pyramid, kvcompose, dynamic, "
                    "per_layer), and transformers sizes one mask for every layer")
        if not bool(self.valid.all()):
            return ("rows of the batch keep different numbers of entries (a padded batch, or padding among tokens "
                    "appended inside a press), which transformers' padding mask cannot express")
        return None

    def record_new_tokens(self, incoming: torch.Tensor | None, query_length: int) -> None:
        """After :meth:`update`: mark which of the ``q`` tokens just appended are padding, read from this forward's mask
        ``incoming`` (``[B, 1, q, kv]``; ``None`` = all real)."""
        if incoming is not None:
            self.valid[:, -query_length:] = new_token_validity(incoming, query_length).to(self.valid.device)

    def attended_mask(self, incoming: torch.Tensor | None, query_length: int, float_dtype: torch.dtype | None,
                      groups: int = 1):
        """After :meth:`update`: record the new tokens' padding (:meth:`record_new_tokens`) and return the mask of the
        ``q`` new tokens over what ``update`` returned, as :meth:`attention_mask` gives before the update.

        Returns:
            ``[B, 1, q, P + q]`` mask (bool, or additive float of ``float_dtype``/``incoming``'s dtype), or ``None``.
        """
        q = query_length
        self.record_new_tokens(incoming, q)
        past = self.valid[:, :-q]
        if incoming is None and q == 1 and bool(past.all()):
            return None
        return build_mask(past[:, None, :], incoming, q, float_dtype)

    def _append(self, name: str, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``stored`` ``[B, H, P, D]`` followed by ``new`` ``[B, H, q, D]``, written into the reserved room after
        ``stored`` when ``stored`` is the start of this layer's storage ``name`` (else a new storage is reserved)."""
        storage = self._storage.get(name)
        p, q = stored.shape[-2], new.shape[-2]
        in_place = (storage is not None and stored.data_ptr() == storage.data_ptr() and stored.stride() ==
                    storage.stride() and stored.shape[:2] == storage.shape[:2] and p + q <= storage.shape[-2])
        if not in_place:
            storage = stored.new_empty(*stored.shape[:2], p + q + self.APPEND_RESERVE, stored.shape[-1])
            storage[:, :, :p].copy_(stored)
            self._storage[name] = storage
        storage[:, :, p:p + q].copy_(new)
        return storage[:, :, :p + q]

    def _held(self, view: torch.Tensor | None) -> torch.Tensor | None:
        """The reserved storage ``view`` starts, or ``view`` itself."""
        return next((t for t in self._storage.values() if view is not None and t.data_ptr() == view.data_ptr()), view)

    def get_seq_length(self) -> int:
        """Logical length: tokens seen, so positions continue as without compression."""
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` such that new tokens line up causally with their logical positions (transformers
        asks it while building a forward's mask: noted, see :func:`check_attention`)."""
        note_mask_query(self, query_length)
        return self.physical_length + query_length, self.logical_length - self.physical_length

    def attention_mask(
        self, incoming: torch.Tensor | None, query_length: int, float_dtype: torch.dtype | None, groups: int = 1
    ):
        """Mask for ``query_length`` new tokens over the stored entries plus themselves.

        Args:
            incoming: the mask transformers built for this forward (``[B, 1, q, kv]``, bool or additive float),
                or ``None``. Only its last ``q`` columns (new tokens among themselves) are used.
            query_length: ``q``.
            float_dtype: when not ``None`` and ``incoming`` is ``None``, return an additive float mask of this
                dtype (eager attention); otherwise a bool mask (True = attend).
            groups: query heads per KV head (unused: every head of a dense layer sees the same entries).

        Returns:
            ``[B, 1, q, P + q]`` mask, or ``None`` when plain unmasked attention is already right.
        """
        if incoming is None and query_length == 1 and bool(self.valid.all()):
            return None
        return build_mask(self.valid[:, None, :], incoming, query_length, float_dtype)

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
                f"after the compressed context, and compressed entries cannot be un-evicted. {CROP_HINT}"
            )
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]  # the room is reused
        self.valid = self.valid[:, :-n]
        self.logical_length -= n

    def fresh_layer(self) -> CacheLayerMixin:
        """The empty layer a new prefill under a press starts from (after :meth:`reset`)."""
        return DynamicLayer()

    def reset(self) -> None:
        """Empty the layer; it then behaves as a plain growing layer (a new prefill under a press replaces it)."""
        super().reset()
        self.valid = None
        self.pending_valid = None
        self._storage = {}
        self.logical_length = 0
        self.compressed_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
        self._storage = {}  # keys/values are new tensors now

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.valid = self.valid.repeat_interleave(repeats, dim=0)
        self._storage = {}  # keys/values are new tensors now

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.valid = self.valid[indices, ...]
        self._storage = {}  # keys/values are new tensors now

    def nbytes(self) -> int:
        """Bytes held: keys and values (with the room reserved for appended tokens), plus the ``[B, P]`` bool ``valid``
        mask (one byte per slot)."""
        return tensor_bytes(self._held(self.keys)) + tensor_bytes(self._held(self.values)) + tensor_bytes(self.valid)

    @property
    def num_kv_heads(self) -> int:
        """``H_kv``: KV heads stored per row."""
        return self.keys.shape[1]

    def kept_entries(self) -> tuple[int, int]:
        """``(kept, total)``: KV pairs of the compressed context kept by the layer and the context's KV pairs, over
        rows and KV heads (tokens appended after compression count in neither; ``(0, 0)`` after :meth:`reset`)."""
        if self.valid is None or self.compressed_length == 0:
            return 0, 0
        heads = self.num_kv_heads
        kept = int(self.valid[:, :self.compressed_length].sum()) * heads
        appended = self.physical_length - self.compressed_length
        return kept, self.valid.shape[0] * heads * (self.logical_length - appended)

    def to_record(self) -> dict:
        """The layer as ``{"kind": RECORD_KIND, tensors named by RECORD_TENSORS, lengths}`` (views, not copies)."""
        return {"kind": self.RECORD_KIND, "keys": self.keys, "values": self.values, "valid": self.valid,
                "logical_length": self.logical_length, "compressed_length": self.compressed_length}

    @classmethod
    def from_record(cls, record: dict) -> CompressedLayer:
        """Inverse of :meth:`to_record` (``record`` checked by :meth:`check_record`)."""
        layer = cls(record["keys"], record["values"], record["valid"], record["logical_length"])
        layer.compressed_length = record["compressed_length"]
        return layer

    def row_stack_key(self) -> tuple | None:
        """A key equal for one-row layers that :meth:`stack_rows` can stack into one batch (same shapes and lengths),
        ``None`` when this layer cannot be stacked (more than one row, or a subclass with more state)."""
        if type(self) is not CompressedLayer or self.valid.shape[0] != 1:
            return None
        return (tuple(self.keys.shape), self.logical_length, self.compressed_length)

    @classmethod
    def stack_rows(cls, layers: list[CompressedLayer]) -> CompressedLayer:
        """One layer whose batch rows are those of ``layers`` (all with one :meth:`row_stack_key`)."""
        if len({layer.row_stack_key() for layer in layers}) != 1 or layers[0].row_stack_key() is None:
            raise ValueError("stack_rows takes one-row dense compressed layers of the same shapes and lengths")
        stacked = cls(torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]),
                      torch.cat([layer.valid for layer in layers]), layers[0].logical_length)
        stacked.compressed_length = layers[0].compressed_length
        return stacked

    @classmethod
    def check_record(cls, record: dict, batch: int, heads: int, head_dim: int, length: int) -> None:
        """Raise ``ValueError("<field>: <what is allowed>")`` unless ``record`` fits a model with ``heads`` KV heads
        of ``head_dim`` and a context of ``batch`` rows of ``length`` tokens (dtypes and shapes against the metadata
        are checked by the caller)."""
        keys, values, valid = record["keys"], record["values"], record["valid"]
        stored = keys.shape[2] if keys.ndim == 4 else -1
        if not (keys.shape == values.shape and keys.dtype == values.dtype and keys.ndim == 4
                and keys.shape[:2] == (batch, heads) and keys.shape[3] == head_dim and stored <= length):
            raise ValueError(f"keys/values: must both be [{batch}, {heads}, P, {head_dim}] with P <= {length}")
        if valid.dtype != torch.bool or valid.shape != (batch, stored):
            raise ValueError(f"valid: must be bool [{batch}, {stored}]")
        compressed = record["compressed_length"]
        if isinstance(compressed, bool) or not isinstance(compressed, int) or not 0 <= compressed <= stored:
            raise ValueError(f"compressed_length must be in [0, {stored}]")


def build_mask(past_valid: torch.Tensor, incoming: torch.Tensor | None, q: int, float_dtype: torch.dtype | None):
    """Attention mask of ``q`` new tokens over stored entries (``past_valid``) and themselves.

    Args:
        past_valid: ``[B, H, P]`` bool (``H`` = 1 when all heads share it), True = attendable stored entry.
        incoming: transformers' mask for this forward (``[B, 1, q, kv]`` bool or additive float) or ``None``; only
            its last ``q`` columns are used (new tokens among themselves: causal plus their own padding).
        q: number of new tokens.
        float_dtype: dtype of the additive mask to return when ``incoming`` is ``None`` (eager); ``None`` = bool.

    Returns:
        ``[B, H, q, P + q]`` bool mask (True = attend) or additive float mask (0 / dtype min).
    """
    b, h, p = past_valid.shape
    device = past_valid.device
    if incoming is None:
        new = torch.ones(q, q, dtype=torch.bool, device=device).tril()[None, None]
    elif incoming.dtype == torch.bool:
        new = incoming[..., -q:]
    else:
        new = incoming[..., -q:] == 0
        float_dtype = incoming.dtype
    past = past_valid[:, :, None, :].expand(b, h, q, p)
    mask = torch.cat([past, new.to(device).expand(b, h, q, q)], dim=-1)
    if float_dtype is None:
        return mask
    zero = torch.zeros((), dtype=float_dtype, device=device)
    return torch.where(mask, zero, torch.finfo(float_dtype).min)


def _ranges(starts: list[int], counts: list[int], device) -> torch.Tensor:
    """``[sum(counts)]`` long: ``starts[i], ..., starts[i] + counts[i] - 1`` for each ``i`` in turn."""
    total = sum(counts)
    if not total:
        return torch.zeros(0, dtype=torch.long, device=device)
    counts_t = torch.tensor(counts, dtype=torch.long, device=device)
    shift = torch.tensor(starts, dtype=torch.long, device=device) - (counts_t.cumsum(0) - counts_t)
    return torch.arange(total, device=device) + shift.repeat_interleave(counts_t, output_size=total)


def _layout_field(name: str, doc: str) -> property:
    """A public field of :class:`RaggedLayer`'s flat layout: read from the storage (or from the fields assigned since
    the last use); assigning it defers rebuilding the storage to the next use."""

    def get(self):
        return self._loose[name] if self._loose is not None else getattr(self, f"_get_{name}")()

    def set(self, value):
        if self._loose is None:
            self._loose = {field: getattr(self, field) for field in RaggedLayer.LAYOUT_FIELDS}
            self._k = self._v = None
        self._loose[name] = value

    return property(get, set, doc=doc)


class RaggedLayer(CacheLayerMixin):
    """A cache layer whose KV heads keep different numbers of entries, stored without padding between heads.

    Head ``(b, h)`` (index ``i = b * H + h``) owns one region of a ``[C, D]`` key storage (and of the matching value
    storage): its ``lengths[b, h]`` kept entries of the compressed context, then the tokens appended after compression
    (every new token goes to every head), then free room for ``room - T`` more. Room is reserved ``APPEND_RESERVE``
    tokens at a time and counted by :meth:`nbytes`, as :class:`CompressedLayer` does; until the first append the
    storage is just the kept entries back to back. So each head's key set is one contiguous slice: a decoding step
    writes one entry per head in place and attends over views
    (:func:`~kvpress_like.kernels.ragged_attention.ragged_layer_attention`, from :meth:`attention_regions`), without
    copying the cache, building a mask or synchronising with the host. The geometry (region starts and lengths) is
    kept on the host and changes only when the room grows.

    Eager attention (and any caller that did not set ``skip_padded_view``) gets from :meth:`update` a transient padded
    view ``[B, H, L_max + T, D]`` that :meth:`attention_mask` masks per head.

    Attributes:
        flat_keys, flat_values: ``[N, D]`` kept entries of the compressed context, ``N = lengths.sum()``, head
            segments in ``(b, h)`` row-major order (gathered from the storage when read).
        lengths: ``[B, H]`` long, kept entries per head (index metadata: 8 bytes per head).
        tail_keys, tail_values: ``[B, H, T, D]`` appended tokens (gathered when read).
        tail_valid: ``[B, T]`` bool, False on padding among appended tokens (1 byte per token and row).
        keys, values: aliases of ``flat_keys``/``flat_values``.
        logical_length: tokens seen by the layer.

    Assigning any of the fields above (as :mod:`kvpress_like.saved_cache` does when loading) is allowed, one at a
    time: the storage is rebuilt from them when the layer is next used, and a ``ValueError`` is raised then if they do
    not fit together.
    """

    is_sliding = False
    is_croppable = True
    is_reorderable = False
    per_head = True
    is_dynamic = True  # grows with every new token, as transformers' DynamicLayer (a press may install on it)
    recompress_problem = ("decoding-time compression needs dense layers; use a uniform-count allocator for the "
                          "prefill (not head_adaptive)")
    RECORD_KIND = "ragged"
    RECORD_TENSORS = ("flat_keys", "flat_values", "lengths", "tail_keys", "tail_values", "tail_valid")
    attends_as_stored = True  # kvpress_like_sdpa attends over the storage update returns (no padded view)
    APPEND_RESERVE = 64
    LAYOUT_FIELDS = ("flat_keys", "flat_values", "lengths", "tail_keys", "tail_values", "tail_valid")

    def __init__(self, flat_keys, flat_values, lengths: torch.Tensor, logical_length: int, shape: tuple[int, ...]):
        # CacheLayerMixin.__init__ is not called: it assigns keys/values, which are derived here
        b, h, _, d = shape
        if lengths.shape != (b, h) or int(lengths.sum()) != flat_keys.shape[0] or flat_keys.shape != flat_values.shape:
            raise ValueError("flat keys/values must hold lengths.sum() rows and lengths must be [B, H]")
        self.dtype, self.device = flat_keys.dtype, flat_keys.device
        self.logical_length = int(logical_length)
        self.pending_valid: torch.Tensor | None = None
        self.skip_padded_view = False  # set for one update whose caller attends over the storage itself
        self.is_initialized = True
        self._loose: dict[str, torch.Tensor] | None = None  # fields assigned since the storage was last built
        self._layout(flat_keys, flat_values, lengths, flat_keys.new_zeros(b, h, 0, d),
                     flat_values.new_zeros(b, h, 0, d), torch.ones(b, 0, dtype=torch.bool, device=flat_keys.device), 0)

    flat_keys = _layout_field("flat_keys", "``[N, D]`` kept keys of the compressed context.")
    flat_values = _layout_field("flat_values", "``[N, D]`` kept values of the compressed context.")
    lengths = _layout_field("lengths", "``[B, H]`` long, kept entries per head.")
    tail_keys = _layout_field("tail_keys", "``[B, H, T, D]`` keys appended after compression.")
    tail_values = _layout_field("tail_values", "``[B, H, T, D]`` values appended after compression.")
    tail_valid = _layout_field("tail_valid", "``[B, T]`` bool, False on padding among appended tokens.")
    keys = flat_keys  # for code that checks `layer.keys`
    values = flat_values

    # ------------------------------------------------------------------------------------------------- storage
    def _layout(self, flat_keys, flat_values, lengths, tail_keys, tail_values, tail_valid, room: int) -> None:
        """Build the storage with ``room`` (>= T) tail slots per head from the flat layout's fields."""
        t = tail_keys.shape[2] if tail_keys.ndim == 4 else -1
        if (lengths.ndim != 2 or flat_keys.ndim != 2 or flat_keys.shape != flat_values.shape
                or flat_keys.shape[0] != int(lengths.sum())):
            raise ValueError(f"RaggedLayer: flat keys/values must both be [lengths.sum(), D] and lengths [B, H]; got "
                             f"{tuple(flat_keys.shape)}, {tuple(flat_values.shape)}, lengths {tuple(lengths.shape)}")
        b, h = lengths.shape
        d = flat_keys.shape[1]
        if t < 0 or tail_keys.shape != (b, h, t, d) or tail_values.shape != tail_keys.shape:
            raise ValueError(f"RaggedLayer: tail keys/values must both be [B, H, T, D] = [{b}, {h}, T, {d}]; got "
                             f"{tuple(tail_keys.shape)}, {tuple(tail_values.shape)}")
        if tail_valid.shape != (b, t) or tail_valid.dtype != torch.bool:
            raise ValueError(f"RaggedLayer: tail_valid must be bool [B, T] = [{b}, {t}]; got {tail_valid.dtype} "
                             f"{tuple(tail_valid.shape)}")
        if room < t:
            raise ValueError(f"RaggedLayer: room {room} < {t} appended tokens")
        device = flat_keys.device
        lens = lengths.flatten().tolist()
        starts, at = [], 0
        for n in lens:
            starts.append(at)
            at += n + room
        if room == 0:  # no appended token yet: the storage is the flat entries themselves
            keys, values = flat_keys, flat_values
        else:
            keys, values = flat_keys.new_empty(at, d), flat_values.new_empty(at, d)
            rows = _ranges(starts, lens, device)
            keys.index_copy_(0, rows, flat_keys.to(device))
            values.index_copy_(0, rows, flat_values.to(device))
        self._lengths = lengths.to(device=device, dtype=torch.long)
        self._lens, self._starts, self._room, self._tail = lens, starts, room, t
        self._append_at = torch.tensor(starts, dtype=torch.long, device=device) + self._lengths.flatten()  # [B * H]
        self._k, self._v = keys, values
        self._valid = torch.ones(b, room, dtype=torch.bool, device=device)
        self._valid[:, :t] = tail_valid.to(device)
        self._all_valid = bool(tail_valid.all())
        self._padded_index = None  # [B, H, L_max] rows of the padded view's flat part, built on first use
        if t:
            rows = self._tail_rows(0, t).flatten()
            keys.index_copy_(0, rows, tail_keys.to(device).reshape(-1, d))
            values.index_copy_(0, rows, tail_values.to(device).reshape(-1, d))
        self._loose = None

    def _packed(self) -> None:
        """Rebuild the storage from fields assigned since it was last built (room for them plus the reserve)."""
        if self._loose is not None:
            t = self._loose["tail_keys"].shape[2] if self._loose["tail_keys"].ndim == 4 else 0
            self._layout(**self._loose, room=t + self.APPEND_RESERVE if t else 0)

    def _tail_rows(self, start: int, stop: int) -> torch.Tensor:
        """``[B * H, stop - start]`` storage rows of appended tokens ``start .. stop - 1`` of every head."""
        return self._append_at[:, None] + torch.arange(start, stop, device=self._append_at.device)

    def _get_flat_keys(self) -> torch.Tensor:
        return self._k if self._room == 0 else self._k[_ranges(self._starts, self._lens, self._k.device)]

    def _get_flat_values(self) -> torch.Tensor:
        return self._v if self._room == 0 else self._v[_ranges(self._starts, self._lens, self._v.device)]

    def _get_lengths(self) -> torch.Tensor:
        return self._lengths

    def _get_tail_keys(self) -> torch.Tensor:
        return self._k[self._tail_rows(0, self._tail)].view(*self._lengths.shape, self._tail, self._k.shape[1])

    def _get_tail_values(self) -> torch.Tensor:
        return self._v[self._tail_rows(0, self._tail)].view(*self._lengths.shape, self._tail, self._v.shape[1])

    def _get_tail_valid(self) -> torch.Tensor:
        return self._valid[:, :self._tail]

    def attention_regions(self) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], int, torch.Tensor, bool]:
        """What attention over the layer as stored needs (see
        :func:`~kvpress_like.kernels.ragged_attention.region_attention`).

        Returns:
            ``(keys [C, D], values [C, D], starts, lengths, tail, tail_valid [B, T], all_valid)``: head ``i = b * H +
            h`` attends over storage rows ``starts[i] .. starts[i] + lengths[i] + tail - 1`` (its kept entries, then
            the ``tail`` appended tokens, of which ``tail_valid`` marks the real ones; ``all_valid`` says they all
            are). ``starts`` and ``lengths`` are host lists, read-only.
        """
        self._packed()
        return (self._k, self._v, self._starts, self._lens, self._tail, self._valid[:, :self._tail],
                self._all_valid)

    def lazy_initialization(self, key_states, value_states) -> None:  # built already initialised
        return None

    @property
    def padded_length(self) -> int:
        """Length of the padded view of the compressed part (``L_max``)."""
        self._packed()
        return max(self._lens, default=0)

    @property
    def physical_length(self) -> int:
        """Positions in the padded view of stored entries (``L_max + T``)."""
        return self.padded_length + self._tail

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded view ``[B, H, L_max + T, D]``: each head's kept entries, filler, then its appended tokens. Filler
        slots repeat a real kept entry (finite; the storage's free room is never read), and are masked."""
        self._packed()
        b, h = self._lengths.shape
        if self._padded_index is None:
            slots = torch.arange(self.padded_length, device=self._k.device)
            starts = self._append_at - self._lengths.flatten()  # [B * H]
            first = next((s for s, n in zip(self._starts, self._lens) if n), 0)  # a real kept entry (if L_max > 0)
            present = slots < self._lengths.flatten()[:, None]
            self._padded_index = torch.where(present, starts[:, None] + slots, first).view(b, h, -1)
        index = torch.cat([self._padded_index, self._tail_rows(0, self._tail).view(b, h, -1)], dim=-1)
        return self._k[index], self._v[index]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, q, D]`` to every head, in place; returns the padded ``[B, H, L_max + T, D]`` keys and values,
        or the ``[C, D]`` storage when ``skip_padded_view`` was set for this update or the forward is attended by the
        registered ``kvpress_like_sdpa`` (the caller attends over the layer with
        :func:`~kvpress_like.kernels.ragged_attention.ragged_layer_attention`).

        Raises:
            ValueError: this forward is attended by transformers' plain sdpa/eager (see
                :meth:`plain_attention_problem`).
        """
        mode = check_attention(self, key_states)
        self._packed()
        b, h, q, d = key_states.shape
        valid, self.pending_valid = self.pending_valid, None
        t = self._tail
        if t + q > self._room:  # out of room: lay the heads out again with more
            self._layout(self.flat_keys, self.flat_values, self._lengths, self.tail_keys, self.tail_values,
                         self.tail_valid, t + q + self.APPEND_RESERVE)
        rows = self._append_at + t if q == 1 else self._tail_rows(t, t + q).flatten()
        self._k.index_copy_(0, rows, key_states.reshape(b * h * q, d))
        self._v.index_copy_(0, rows, value_states.reshape(b * h * q, value_states.shape[-1]))
        if valid is not None:  # (free room is kept True: nothing to write for real tokens)
            self._valid[:, t:t + q] = valid.to(self._valid.device)
            self._all_valid = self._all_valid and bool(valid.all())
        self._tail = t + q
        self.logical_length += q
        if self.skip_padded_view or mode == KVPRESS_ATTENTION["sdpa"]:
            self.skip_padded_view = False
            note_update(self, self._k)
            return self._k, self._v
        keys, values = self._padded()
        note_update(self, keys)
        return keys, values

    def plain_attention_problem(self) -> str | None:
        """Why transformers' plain sdpa/eager would not attend this layer exactly (``None`` once it holds no kept
        entry, after :meth:`reset`)."""
        self._packed()
        if not any(self._lens):
            return None
        return ("its KV heads keep different numbers of entries (per-head budgets), which transformers' mask cannot "
                "express")

    def record_new_tokens(self, incoming: torch.Tensor | None, query_length: int) -> None:
        """After :meth:`update`: mark which of the ``q`` tokens just appended are padding, read from this forward's mask
        ``incoming`` (``None`` = all real)."""
        if incoming is not None:
            self._packed()
            valid = new_token_validity(incoming, query_length).to(self._valid.device)
            self._valid[:, self._tail - query_length:self._tail] = valid
            self._all_valid = self._all_valid and bool(valid.all())

    def attended_mask(self, incoming, query_length: int, float_dtype, groups: int = 1):
        """After :meth:`update`: record the new tokens' padding and return the per-query-head mask
        ``[B, H_kv * groups, q, L_max + T]`` over the padded view ``update`` returned (as :meth:`attention_mask` gives
        before the update)."""
        q = query_length
        self.record_new_tokens(incoming, q)
        slots = torch.arange(self.padded_length, device=self._lengths.device)
        present = slots < self._lengths[..., None]  # [B, H, L_max]
        b, h, _ = present.shape
        tail = self._valid[:, :self._tail - q][:, None, :].expand(b, h, -1)
        mask = build_mask(torch.cat([present, tail], dim=-1), incoming, q, float_dtype)
        return mask.repeat_interleave(groups, dim=1)

    def attention_mask(self, incoming, query_length: int, float_dtype, groups: int = 1):
        """Per-query-head mask ``[B, H_kv * groups, q, L_max + T + q]`` (see :func:`build_mask`)."""
        self._packed()
        slots = torch.arange(self.padded_length, device=self._lengths.device)
        present = slots < self._lengths[..., None]  # [B, H, L_max]
        b, h, _ = present.shape
        tail = self.tail_valid[:, None, :].expand(b, h, -1)
        mask = build_mask(torch.cat([present, tail], dim=-1), incoming, query_length, float_dtype)
        return mask.repeat_interleave(groups, dim=1)

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        note_mask_query(self, query_length)
        return self.physical_length + query_length, self.logical_length - self.physical_length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` appended tokens (never compressed entries); their room is reused."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._packed()
        n = -tokens_to_remove
        if n > self._tail:
            raise ValueError(f"cannot crop {n} tokens: only {self._tail} were appended after compression, "
                             f"and compressed entries cannot be un-evicted. {CROP_HINT}")
        if n:
            self._tail -= n
            self.logical_length -= n
            if not self._all_valid:
                self._valid[:, self._tail:] = True  # free room is kept True
                self._all_valid = bool(self._valid[:, :self._tail].all())

    def fresh_layer(self) -> CacheLayerMixin:
        """The empty layer a new prefill under a press starts from (after :meth:`reset`)."""
        return DynamicLayer()

    def reset(self) -> None:
        """Empty the layer (no compressed entries, no appended tokens); it then grows as a dense layer."""
        self._packed()
        b, h = self._lengths.shape
        keys, values = self._k.new_empty(0, self._k.shape[1]), self._v.new_empty(0, self._v.shape[1])
        self._layout(keys, values, torch.zeros_like(self._lengths), keys.new_empty(b, h, 0, keys.shape[1]),
                     values.new_empty(b, h, 0, values.shape[1]), self._valid[:, :0], 0)
        self.pending_valid = None
        self.logical_length = 0

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "batch reordering (beam search, batch expansion) is not supported on a ragged per-head cache layer"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported

    def nbytes(self) -> int:
        """Key and value storage (kept entries, appended tokens and the room reserved for more) + ``lengths`` and the
        ``[B, room]`` bool validity of appended tokens."""
        self._packed()
        return sum(tensor_bytes(t) for t in (self._k, self._v, self._lengths, self._valid))

    def kept_entries(self) -> tuple[int, int]:
        """``(kept, total)`` KV pairs of the compressed context over rows and KV heads (see
        :meth:`CompressedLayer.kept_entries`)."""
        self._packed()
        return int(self._lengths.sum()), self._lengths.numel() * (self.logical_length - self._tail)

    def to_record(self) -> dict:
        """The layer as ``{"kind": "ragged", flat_keys, flat_values, lengths, tail_keys, tail_values, tail_valid,
        logical_length}``."""
        return {"kind": self.RECORD_KIND, **{name: getattr(self, name) for name in self.RECORD_TENSORS},
                "logical_length": self.logical_length}

    @classmethod
    def from_record(cls, record: dict) -> RaggedLayer:
        """Inverse of :meth:`to_record` (``record`` checked by :meth:`check_record`)."""
        b, h = record["lengths"].shape
        layer = cls(record["flat_keys"], record["flat_values"], record["lengths"], 0,
                    (b, h, 0, record["flat_keys"].shape[-1]))
        layer.tail_keys, layer.tail_values = record["tail_keys"], record["tail_values"]
        layer.tail_valid, layer.logical_length = record["tail_valid"], record["logical_length"]
        return layer

    @classmethod
    def check_record(cls, record: dict, batch: int, heads: int, head_dim: int, length: int) -> None:
        """As :meth:`CompressedLayer.check_record`, for the ragged fields."""
        lengths, tail = record["lengths"], record["tail_keys"]
        if lengths.dtype != torch.long or lengths.shape != (batch, heads) or not bool((lengths >= 0).all()):
            raise ValueError(f"lengths: must be non-negative int64 [{batch}, {heads}]")
        n = int(lengths.sum())
        keys, values = record["flat_keys"], record["flat_values"]
        if not keys.shape == values.shape == (n, head_dim):
            raise ValueError(f"flat_keys/flat_values: must both be [{n}, {head_dim}] (lengths.sum(), head_dim)")
        if not (tail.shape == record["tail_values"].shape and tail.ndim == 4 and tail.shape[:2] == (batch, heads)
                and tail.shape[3] == head_dim and tail.dtype == keys.dtype):
            raise ValueError(f"tail_keys/tail_values: must both be {keys.dtype} [{batch}, {heads}, T, {head_dim}]")
        if record["tail_valid"].dtype != torch.bool or record["tail_valid"].shape != (batch, tail.shape[2]):
            raise ValueError(f"tail_valid: must be bool [{batch}, {tail.shape[2]}]")


class QuantizedCompressedLayer(CompressedLayer):
    """A compressed context kept quantized: the kept entries live in a fresh transformers quantized layer of the
    same kind as the one the prefill used (fp8, quanto, hqq), new tokens are appended to it.

    Attributes:
        inner: the quantized layer holding the ``P`` physical entries (its own length is the physical length).
        valid, logical_length, compressed_length: as in :class:`CompressedLayer`.
    """

    def __init__(self, inner: BaseQuantizedLayer, valid: torch.Tensor, logical_length: int,
                 num_kv_heads: int | None = None):
        CacheLayerMixin.__init__(self)
        self._num_kv_heads = num_kv_heads
        self.inner, self.valid, self.logical_length = inner, valid, int(logical_length)
        self.dtype, self.device = inner.keys.dtype, inner.device  # transformers layers have no `dtype`
        self.compressed_length = inner.get_seq_length()
        self.pending_valid = None
        self.is_initialized = True

    @property
    def physical_length(self) -> int:
        return self.inner.get_seq_length()

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``[B, H, q, D]`` (quantized by the inner layer); returns all dequantized keys and values."""
        q = key_states.shape[-2]
        mode = check_attention(self, key_states)
        new_valid = self.pending_valid
        if new_valid is None:
            new_valid = torch.ones(key_states.shape[0], q, dtype=torch.bool, device=self.valid.device)
        self.pending_valid = None
        self.valid = torch.cat([self.valid, new_valid.to(self.valid.device)], dim=-1)
        self.logical_length += q
        keys, values = self.inner.update(key_states, value_states)
        if mode != "plain":
            note_update(self, keys)
        return keys, values

    def fresh_layer(self) -> BaseQuantizedLayer:
        """An empty quantized layer of the same backend, which a new prefill under a press starts from."""
        inner = copy.copy(self.inner)
        inner.reset()
        return inner

    def reset(self) -> None:
        """Empty the layer; it then grows as a plain quantized layer (a new prefill under a press replaces it)."""
        self.inner = self.fresh_layer()
        self.valid = self.valid[:, :0]
        self.logical_length = self.compressed_length = 0
        self.pending_valid = None

    is_croppable = False
    is_reorderable = False
    recompress_problem = "decoding-time compression does not support quantized caches"
    RECORD_KIND = "quantized_compressed"  # not saved: to_record raises

    @property
    def num_kv_heads(self) -> int:
        if self._num_kv_heads is None:  # not given: read from the dequantized entries (once)
            self._num_kv_heads = full_keys_values(self.inner)[0].shape[1]
        return self._num_kv_heads

    def to_record(self) -> dict:
        raise TypeError("cannot save a compressed layer of a QuantizedCache; saving supports caches compressed in a "
                        "DynamicCache")

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(f"cropping or reordering a quantized compressed layer is not supported. {CROP_HINT}")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported

    def nbytes(self) -> int:
        """Quantized storage (every tensor held by the inner layer) plus the ``[B, P]`` bool ``valid`` mask."""
        return _deep_bytes(vars(self.inner)) + tensor_bytes(self.valid)


class SlidingCompressedLayer(CompressedLayer):
    """A compressed sliding-window layer: a :class:`CompressedLayer` whose entries stop being attended once they are
    ``sliding_window`` or more positions behind the query, as in transformers' ``DynamicSlidingWindowLayer``.

    Used for models whose every layer is sliding-window (Mistral-7B-v0.1, Qwen2 with ``use_sliding_window`` on all
    layers): the press compresses a prefill no longer than the window, and later tokens see only the kept entries
    within their window. Entries that left the window stay stored (masked) until the cache is dropped or reset.

    The window needs the position of every stored entry, so the mask comes from the layer itself
    (:meth:`attended_mask`, which the attention functions registered by :mod:`kvpress_like.attention` use, inside a
    press and outside one): attending over this layer with transformers' plain sdpa/eager raises an error rather than
    attending to entries outside the window.

    Attributes:
        sliding_window: ``W``: a query at position ``t`` attends to positions ``t - W + 1 .. t``.
        positions: ``[B, H_kv, P]`` long, the position (token index in the uncompressed sequence, padding included)
            of every stored entry.
    """

    is_sliding = True
    RECORD_KIND = "sliding_compressed"
    RECORD_TENSORS = ("keys", "values", "valid", "positions")

    def __init__(self, keys, values, valid, logical_length: int, sliding_window: int, positions: torch.Tensor):
        super().__init__(keys, values, valid, logical_length)
        if positions.shape != keys.shape[:3] or positions.dtype != torch.long:
            raise ValueError(f"positions must be an int64 tensor of shape {tuple(keys.shape[:3])} ([B, H, P])")
        check_int("sliding_window", sliding_window, minimum=1)
        self.sliding_window, self.positions = sliding_window, positions
        self._mask_given = False  # set by attention_mask() for the next update of a direct caller

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``[B, H_kv, q, D]`` new keys and values (at positions ``logical_length ..``); returns all stored."""
        # no model mask was built for this update: a direct caller, who must have asked attention_mask()
        if forward_attention(self, key_states.shape[-2]) is None and not self._mask_given:
            raise RuntimeError(
                "a compressed sliding-window cache layer must be attended with the mask it gives (attention_mask() "
                f"before update, or attended_mask() after it): it hides the entries outside the window. "
                f"{PLAIN_ATTENTION_HINT}"
            )
        q = key_states.shape[-2]
        new = torch.arange(self.logical_length, self.logical_length + q, device=self.positions.device)
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # (raises under plain attention)
        self._mask_given = False
        self.positions = torch.cat([self.positions, new.expand(*key_states.shape[:2], q)], dim=-1)
        return keys, values

    def plain_attention_problem(self) -> str | None:
        if self.valid is None or self.compressed_length == 0:
            return None
        return "its entries must be hidden once they leave the sliding window, which needs each entry's position"

    def attention_mask(self, incoming, query_length: int, float_dtype, groups: int = 1):
        """Mask ``[B, H_kv * groups, q, P + q]`` (bool, or additive float for eager): valid stored entries within
        ``sliding_window`` of each new token, and the new tokens among themselves (causal, within the window).
        Asked before :meth:`update` (:meth:`attended_mask` after it)."""
        self._mask_given = True
        return self._window_mask(self.valid, self.positions, self.logical_length, incoming, query_length, float_dtype,
                                 groups)

    def attended_mask(self, incoming, query_length: int, float_dtype, groups: int = 1):
        """After :meth:`update`: record the new tokens' padding and return the mask :meth:`attention_mask` gives before
        the update."""
        q = query_length
        self.record_new_tokens(incoming, q)
        return self._window_mask(self.valid[:, :-q], self.positions[..., :-q], self.logical_length - q, incoming, q,
                                 float_dtype, groups)

    def _window_mask(self, valid, positions, start: int, incoming, query_length: int, float_dtype, groups: int):
        """The mask of ``q`` new tokens at positions ``start ..`` over stored entries (``valid`` ``[B, P]``,
        ``positions`` ``[B, H, P]``) and themselves."""
        q, w = query_length, self.sliding_window
        device = valid.device
        query_positions = start + torch.arange(q, device=device)  # [q]
        inside = positions[:, :, None, :] > (query_positions - w)[None, None, :, None]  # [B, H, q, P]
        past = valid[:, None, None, :] & inside
        if incoming is None:
            i = torch.arange(q, device=device)
            new = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w))[None, None]
        elif incoming.dtype == torch.bool:
            new = incoming[..., -q:].to(device)
        else:
            new = incoming[..., -q:].to(device) == 0
            float_dtype = incoming.dtype
        b, h = past.shape[:2]
        if incoming is None and q == 1 and bool(past.all()):
            return None
        mask = torch.cat([past, new.expand(b, h, q, q)], dim=-1).repeat_interleave(groups, dim=1)
        if float_dtype is None:
            return mask
        zero = torch.zeros((), dtype=float_dtype, device=device)
        return torch.where(mask, zero, torch.finfo(float_dtype).min)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.positions = self.positions[..., : self.physical_length]

    def fresh_layer(self) -> CacheLayerMixin:
        """An empty sliding-window layer, which a new prefill under a press starts from (after :meth:`reset`)."""
        return DynamicSlidingWindowLayer(self.sliding_window)

    def reset(self) -> None:
        super().reset()
        self.positions = self.positions[..., :0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.positions = self.positions[indices, ...]

    def nbytes(self) -> int:
        """As :meth:`CompressedLayer.nbytes`, plus the ``[B, H, P]`` int64 positions."""
        return super().nbytes() + tensor_bytes(self.positions)

    def to_record(self) -> dict:
        return {**super().to_record(), "positions": self.positions, "sliding_window": self.sliding_window}

    @classmethod
    def from_record(cls, record: dict) -> SlidingCompressedLayer:
        layer = cls(record["keys"], record["values"], record["valid"], record["logical_length"],
                    record["sliding_window"], record["positions"])
        layer.compressed_length = record["compressed_length"]
        return layer

    @classmethod
    def check_record(cls, record: dict, batch: int, heads: int, head_dim: int, length: int) -> None:
        super().check_record(record, batch, heads, head_dim, length)
        keys, positions, window = record["keys"], record["positions"], record["sliding_window"]
        if not (positions.dtype == torch.long and positions.shape == keys.shape[:3]
                and bool(((positions >= 0) & (positions < length)).all())):
            raise ValueError(f"positions: must be int64 [{batch}, {heads}, {keys.shape[2]}] with values in "
                             f"[0, {length})")
        check_int("sliding_window", window, minimum=1)


class SlidingPrefillLayer(DynamicLayer):
    """Holds a whole prefill of a sliding-window layer that is about to be compressed (a ``DynamicSlidingWindowLayer``
    keeps only its last ``sliding_window - 1`` tokens); :func:`like_source` turns the compressed result into a
    :class:`SlidingCompressedLayer`."""

    def __init__(self, sliding_window: int):
        super().__init__()
        self.sliding_window = sliding_window


def stored_positions(layer) -> torch.Tensor:
    """``[B, H, P]`` long: the position of every entry a sliding-window layer stores (its last ``P`` tokens, unless
    it records them, as a :class:`SlidingCompressedLayer` does)."""
    if getattr(layer, "positions", None) is not None:
        return layer.positions
    b, h, p = layer.keys.shape[:3]
    seen = layer.get_seq_length()
    return torch.arange(seen - p, seen, device=layer.keys.device).expand(b, h, p)


def _deep_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable through dicts, lists, tuples and object attributes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in seen:
            return 0
        seen.add(obj.data_ptr())
        return tensor_bytes(obj)
    if isinstance(obj, dict):
        return sum(_deep_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_deep_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _deep_bytes(vars(obj), seen)
    return 0


def full_keys_values(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``[B, H, S, D]`` keys and values of a freshly prefilled layer (dequantized for quantized layers)."""
    if isinstance(layer, BaseQuantizedLayer) and layer._quantized_keys is not None:
        keys, values = layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)
        if layer.keys is not None and layer.keys.numel():  # residual, full-precision part
            keys, values = torch.cat([keys, layer.keys], dim=-2), torch.cat([values, layer.values], dim=-2)
        return keys, values
    return layer.keys, layer.values


def requantize(source, compressed):
    """Store a compressed layer back in the quantized form of ``source`` when the prefill used a quantized cache."""
    if not isinstance(source, BaseQuantizedLayer):
        return compressed
    if compressed.per_head:
        raise ValueError("per-head budgets (ragged layers) cannot be combined with a quantized cache; "
                         "use an allocator that keeps the same count for every head")
    inner = copy.copy(source)
    inner.reset()
    inner.update(compressed.keys, compressed.values)
    return QuantizedCompressedLayer(inner, compressed.valid, compressed.logical_length, compressed.num_kv_heads)


def like_source(source, compressed):
    """The compressed layer made from ``source`` (the layer it was selected from), stored like ``source``: quantized
    again for a quantized cache (:func:`requantize`), sliding-window for a sliding-window layer.

    Raises:
        ValueError: per-head budgets (a ragged layer) or a quantized cache on a sliding-window layer.
    """
    selected = getattr(compressed, "selected", None)
    if selected is not None:
        compressed.selected = None  # needed only here
    window = getattr(source, "sliding_window", None)
    if window is None:
        return requantize(source, compressed)
    if compressed.per_head:
        raise ValueError("per-head budgets (ragged layers) are not supported on sliding-window layers; use an "
                         "allocator that keeps the same count for every head (not head_adaptive)")
    if isinstance(source, BaseQuantizedLayer) or selected is None:
        raise ValueError("a sliding-window layer can only be compressed from a DynamicCache (not a quantized cache)")
    positions = stored_positions(source).gather(-1, selected.to(source.keys.device)).contiguous()
    layer = SlidingCompressedLayer(compressed.keys, compressed.values, compressed.valid, compressed.logical_length,
                                   int(window), positions)
    layer.compressed_length = compressed.compressed_length
    return layer


def tensor_bytes(t: torch.Tensor | None) -> int:
    """``numel * element_size`` of a tensor, 0 for ``None``."""
    return 0 if t is None else t.numel() * t.element_size()


def layer_bytes(layer) -> int:
    """Bytes held by one cache layer (keys, values and any index metadata)."""
    if hasattr(layer, "nbytes"):
        return layer.nbytes()
    if isinstance(layer, BaseQuantizedLayer):
        return _deep_bytes(vars(layer))
    return tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))


def cache_bytes(cache: Cache) -> int:
    """Total bytes held by every layer of a transformers ``Cache``."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def full_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes an uncompressed ``DynamicCache(config=config)`` holds after prefilling ``seq_len`` tokens.

    Every layer stores keys and values ``[B, H_kv, L, D]``: ``L = seq_len`` for full-attention layers and
    ``L = min(seq_len, sliding_window - 1)`` for sliding-window layers (what transformers' sliding cache layer keeps).
    So the total is ``2 * B * H_kv * D * element_size * sum(L over layers)``.

    Args:
        config: the model config (a multimodal config's text config is used).
        seq_len: number of prefilled tokens ``S``.
        batch_size: ``B``.
        dtype: dtype of the cached keys and values (the model's dtype).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    window = getattr(text, "sliding_window", None)
    tokens = 0
    for kind in layer_types(text):
        if kind == "sliding_attention" and window:
            tokens += min(seq_len, window - 1)
        else:
            tokens += seq_len
    return 2 * batch_size * kv_heads * head_dim * element * tokens


def prefill(model, input_ids: torch.Tensor, **forward_kwargs) -> DynamicCache:
    """A new ``DynamicCache(config=model.config)`` holding ``input_ids`` ``[B, S]`` after one forward of ``model``
    (compressed when a press is installed on it); ``forward_kwargs`` go to the forward (e.g. ``logits_to_keep=1``)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, **{CACHE_KWARG: cache}, use_cache=True, **forward_kwargs)
    return cache


def kept_fraction(cache) -> float:
    """Fraction of the context's KV pairs kept, over the compressed layers of ``cache`` (those with
    ``kept_entries``), 1.0 if none."""
    counts = [layer.kept_entries() for layer in cache.layers if hasattr(layer, "kept_entries")]
    total = sum(t for _, t in counts)
    return sum(k for k, _ in counts) / total if total else 1.0


RECORD_CLASSES = {cls.RECORD_KIND: cls for cls in (CompressedLayer, SlidingCompressedLayer, RaggedLayer)}
"""Storage kinds that can be saved: ``record["kind"]`` -> the class whose ``from_record`` rebuilds it."""


from . import attention as _attention  # noqa: E402,F401  registers kvpress_like_sdpa / kvpress_like_eager
