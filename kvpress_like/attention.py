"""The attention functions kvpress_like registers once with transformers, by name: ``kvpress_like_sdpa`` and
``kvpress_like_eager``.

transformers builds one attention mask per forward, sized for one cache layer and indexed by logical positions, so it
cannot say which stored entries of each row (and, in a ragged layer, of each KV head) of each compressed layer are
real. These functions read that from the cache layer the forward just updated:

* a dense compressed layer (:class:`~kvpress_like.cache.CompressedLayer`, quantized or sliding-window too): the layer's
  own mask (:meth:`attended_mask`: its valid slots, the new tokens' padding and causality read from the model's mask)
  and then transformers' sdpa, or the model's own eager function;
* a ragged per-head layer (:class:`~kvpress_like.cache.RaggedLayer`): ``kvpress_like_sdpa`` attends over the layer as
  stored (:func:`~kvpress_like.kernels.ragged_attention.ragged_layer_attention`); ``kvpress_like_eager`` over its padded
  view with a per-head mask;
* anything else (an uncompressed layer, no cache): exactly transformers' sdpa / the model's eager function.

``press(model, p)`` switches the model to the matching name on entering and back on exit (the registered functions
never change, so a compiled forward is not recompiled at every press). A compressed cache used outside a press works
after ``model.set_attn_implementation("kvpress_like_sdpa")``; with plain ``sdpa``/``eager`` its layers raise an error
unless plain attention gives exactly the same result (see :func:`kvpress_like.cache.check_attention`).

Importing :mod:`kvpress_like.cache` imports this module, so the names are registered whenever a compressed layer
exists.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .forward_notes import KVPRESS_ATTENTION, note_kvpress_mask, updated_layer
from .kernels.ragged_attention import ragged_layer_attention

SDPA = KVPRESS_ATTENTION["sdpa"]
EAGER = KVPRESS_ATTENTION["eager"]
PLAIN = {name: plain for plain, name in KVPRESS_ATTENTION.items()}  # registered name -> transformers' name

_QUERY_OBSERVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> fn(query)


def observe_queries(module: torch.nn.Module, fn: Callable[[torch.Tensor], None] | None) -> None:
    """Call ``fn(query)`` with the post-RoPE queries ``[B, H_q, q, D]`` that ``kvpress_like_sdpa`` receives for
    ``module`` (``fn=None`` stops)."""
    if fn is None:
        _QUERY_OBSERVERS.pop(module, None)
    else:
        _QUERY_OBSERVERS[module] = fn


def _groups(query: torch.Tensor, key: torch.Tensor) -> int:
    """Query heads per KV head, from the tensors themselves (``[B, H_q, q, D]`` and ``[B, H_kv, P, D]``)."""
    return query.shape[1] // key.shape[1]


def kvpress_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """``kvpress_like_sdpa``: transformers' ``sdpa_attention_forward`` signature; ``query`` ``[B, H_q, q, D]``, ``key``
    and ``value`` what the cache layer's ``update`` returned; returns ``([B, q, H_q, D], None)``."""
    observer = _QUERY_OBSERVERS.get(module)
    if observer is not None:
        observer(query)
    layer = updated_layer(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q = query.shape[2]
    if getattr(layer, "attends_as_stored", False):  # ragged: `key`/`value` are its storage
        if kwargs.get("softcap") is not None:
            raise ValueError("`sdpa` attention does not support `softcap`; load the model with "
                             "attn_implementation='eager'")
        layer.record_new_tokens(attention_mask, q)
        out = ragged_layer_attention(query, layer, kwargs.get("scaling"))  # [B, H_q, q, D]
        return out.transpose(1, 2).contiguous(), None
    mask = layer.attended_mask(attention_mask, q, None, _groups(query, key))
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _model_eager(module) -> Callable:
    """The model's own eager attention function (``eager_attention_forward`` of its modeling module)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}'s module defines no eager_attention_forward; "
                         f"{EAGER!r} cannot be used for this model")
    return fn


def kvpress_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """``kvpress_like_eager``: the model's eager attention with, on a compressed layer, the layer's own additive
    mask (per query head for ragged and sliding-window layers)."""
    eager = _model_eager(module)
    layer = updated_layer(key)
    if layer is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    mask = layer.attended_mask(attention_mask, query.shape[2], query.dtype, _groups(query, key))
    return eager(module, query, key, value, mask, **kwargs)


def _kvpress_sdpa_mask(*args, **kwargs):
    """transformers' ``sdpa_mask``, noting that this forward is attended by ``kvpress_like_sdpa``."""
    note_kvpress_mask(SDPA)
    return sdpa_mask(*args, **kwargs)


def _kvpress_eager_mask(*args, **kwargs):
    """transformers' ``eager_mask``, noting that this forward is attended by ``kvpress_like_eager``."""
    note_kvpress_mask(EAGER)
    return eager_mask(*args, **kwargs)


AttentionInterface.register(SDPA, kvpress_sdpa_attention)
AttentionInterface.register(EAGER, kvpress_eager_attention)
AttentionMaskInterface.register(SDPA, _kvpress_sdpa_mask)
AttentionMaskInterface.register(EAGER, _kvpress_eager_mask)
