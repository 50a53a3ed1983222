"""What attends the current forward: notes shared by the cache layers (:mod:`kvpress_like.cache`) and the attention
functions kvpress_like registers (:mod:`kvpress_like.attention`), per thread.

It imports nothing from the package, so that both modules can use it without importing each other.
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch

# ------------------------------------------------------------------------------------------ who attends this forward
# transformers builds one attention mask per forward (``create_causal_mask``): it asks the cache's first full-attention
# layer for its sizes (``get_mask_sizes``), then calls the mask function registered for ``config._attn_implementation``.
# That mask cannot say which stored entries of each row (and head) of each compressed layer are real, so compressed
# layers are attended by the attention functions :mod:`kvpress_like.attention` registers once by name
# (``kvpress_like_sdpa``, ``kvpress_like_eager``), whose mask functions note it here. A compressed layer's ``update``
# then knows whether the forward's attention is one of those or plain ``sdpa``/``eager``, and refuses plain attention
# when plain attention would not give the same result.
KVPRESS_ATTENTION = {"sdpa": "kvpress_like_sdpa", "eager": "kvpress_like_eager"}  # plain name -> registered name
_FORWARD = threading.local()  # .mask: [mode, physical, logical, q] of the last mask query; .updated


def _asked_by_mask_creation() -> bool:
    """Whether the running ``get_mask_sizes`` was called by transformers' mask creation (``masking_utils``), not by a
    direct caller."""
    frame = sys._getframe(2)
    for _ in range(4):  # layer.get_mask_sizes <- Cache.get_mask_sizes (<- a wrapping cache) <- masking_utils
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == "transformers.masking_utils":
            return True
        frame = frame.f_back
    return False


def note_mask_query(layer, query_length: int) -> None:
    """Called by a compressed layer's ``get_mask_sizes``: when transformers is building the mask of a forward of ``q``
    new tokens over a cache whose layers have seen ``layer.logical_length`` tokens, notes plain attention unless
    :func:`note_kvpress_mask` follows (the registered mask functions call it)."""
    if not _asked_by_mask_creation():
        return
    _FORWARD.mask = ["plain", layer.physical_length, layer.logical_length, query_length]
    _FORWARD.extended = []  # compressed layers this forward extended under plain attention (to undo on a refusal)


def note_kvpress_mask(name: str) -> None:
    """Called by the mask functions registered by :mod:`kvpress_like.attention`: this forward attends with ``name``."""
    noted = getattr(_FORWARD, "mask", None)
    if noted is not None:
        noted[0] = name


def forward_attention(layer, query_length: int) -> str | None:
    """What attends the forward that is appending ``q`` tokens to ``layer``: ``"plain"`` (transformers' own
    sdpa/eager), a registered kvpress name, or ``None`` when no mask was built for it (a direct caller: the last mask
    query of this thread was for another number of tokens seen or new)."""
    noted = getattr(_FORWARD, "mask", None)
    if noted is None or noted[2] != layer.logical_length or noted[3] != query_length:
        return None
    return noted[0]


def mask_physical_length() -> int | None:
    """Entries held by the layer the forward's mask was sized for."""
    noted = getattr(_FORWARD, "mask", None)
    return None if noted is None else noted[1]


def note_update(layer, keys: torch.Tensor) -> None:
    """Remember that ``layer``'s ``update`` just returned ``keys`` (the registered attention function looks it up)."""
    _FORWARD.updated = (weakref.ref(layer), weakref.ref(keys))


def updated_layer(keys: torch.Tensor):
    """The compressed layer whose last ``update`` returned ``keys`` (and forget it), or ``None``."""
    noted = getattr(_FORWARD, "updated", None)
    if noted is None or noted[1]() is not keys:
        return None
    _FORWARD.updated = None
    return noted[0]()



def note_extended(layer) -> None:
    """Remember that this forward, attended by plain attention, appended its new tokens to ``layer``."""
    _FORWARD.extended.append(weakref.ref(layer))


def take_extended() -> list:
    """The layers :func:`note_extended` remembered for this forward (forgotten now)."""
    layers = [ref() for ref in getattr(_FORWARD, "extended", [])]
    _FORWARD.extended = []
    return [layer for layer in layers if layer is not None]
