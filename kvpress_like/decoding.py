"""Decoding-time compression: keep every compressible layer's cache near a target size during long generation.

After each forward of a layer whose cache holds ``target + interval`` entries or more, the wrapped scorer scores
every stored entry and the layer is cut back to its best ``target`` entries per KV head (protected tokens of the
scorer included). The cache therefore stays within ``[target, target + interval)`` entries per head between
compressions, and positions continue as without compression (the layer keeps its logical length).

The wrapped press may also compress the prefill with its own ratio (``compress_prefill=True``): the
prefill-plus-decoding combination. Scorers that need every token's hidden state (Compactor, leverage, observed
attention, expected attention, ...) cannot score entries whose hidden states are gone; usable scorers declare
``supports_decoding = True`` (knorm, random, streaming_llm, cur, snapkv, tova). Window scorers (SnapKV, TOVA) see
the queries of the most recent tokens, kept in a small buffer per layer on the cache itself (not on the press, so
one press can decode several caches in turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import BaseQuantizedLayer

from .cache import like_source, valid_tokens
from .checks import check_int
from .press import Press, as_press, select_top, store_dense


def recent_tokens(cache) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The buffer of ``cache``'s latest tokens: layer index -> ``(hidden [B, w, hidden], cos, sin [B or 1, w, rot])``.

    It is run state, so it lives on the cache (copied with it), never on the press: one press may decode several
    caches, of different batch sizes, in turn.
    """
    recent = getattr(cache, "_kvpress_recent_tokens", None)
    if recent is None:
        recent = {}
        cache._kvpress_recent_tokens = recent
    return recent


@dataclass
class DecodingPress(Press):
    """Compress the cache back to ``target`` entries per head every time it reaches ``target + interval``.

    Args:
        scorer: the press, registry name or :class:`~kvpress_like.scorer.Scorer` (wrapped in a
            :class:`~kvpress_like.press.ScorerPress`) whose scores choose the entries; it must support decoding.
        target: entries per KV head kept after each compression (>= 1).
        interval: growth allowed between compressions (>= 1).
        compress_prefill: also compress each context's prefill with ``scorer`` (at the scorer's own ratio).
    """

    name = "decoding"
    is_plain_scorer = False
    acts_while_decoding = True
    scorer: Press | str = "knorm"
    target: int = 1024
    interval: int = 64
    compress_prefill: bool = False
    needs = property(lambda self: self.scorer.needs)  # what its scorer reads

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        if self.ratio != 0:
            raise ValueError("DecodingPress has no ratio of its own: set the prefill ratio on its scorer")
        self.scorer = as_press(self.scorer)
        if not self.scorer.supports_decoding:
            raise ValueError(
                f"{type(self.scorer).__name__} cannot score while decoding (it needs every token's hidden state); "
                "use one of: knorm, random, streaming_llm, cur, snapkv, tova"
            )
        for name in ("target", "interval"):
            check_int(name, getattr(self, name), minimum=1)
        protected = self.scorer.n_sink + self.scorer.window
        if self.target < protected:
            raise ValueError(f"target ({self.target}) must be at least the scorer's protected tokens "
                             f"(n_sink + window = {protected}); lower the scorer's window or raise the target")

    def check_supported(self) -> None:
        """Refuse what would be ignored: the wrapper's own allocator and protected tokens (the scorer's are used),
        and a prefill compressed by a scorer whose allocator selects every layer at once (model scope)."""
        ignored = [name for name, default in (("allocator", "uniform"), ("n_sink", 0), ("window", 0))
                   if (self.allocator_instance.name if name == "allocator" else getattr(self, name)) != default]
        if ignored:
            raise ValueError(f"DecodingPress uses its scorer's allocator and protected tokens; set "
                             f"{', '.join(ignored)} on the scorer (e.g. DecodingPress(scorer=KnormPress(window=..., "
                             "allocator=...)))")
        selects_at_once = self.scorer.allocator_instance.scope == "model" or self.scorer.defers_selection
        if self.compress_prefill and selects_at_once:
            raise ValueError(f"DecodingPress(compress_prefill=True) compresses the prefill layer by layer; the "
                             f"scorer's allocator {self.scorer.allocator_instance.name!r} selects every layer at once. "
                             "Use a layer-scope allocator on the scorer (uniform, pyramid, head_adaptive, ...)")

    def compresses_prefill(self) -> bool:
        return self.compress_prefill and self.scorer.ratio > 0

    def compress(self, ctx):
        return self.scorer.compress(ctx)

    def score(self, ctx):
        return self.scorer.score(ctx)

    def after_forward(self, hooks, module, kwargs, cache, was_prefill) -> None:
        """Buffer the latest hidden states, then cut the layer back to ``target`` when it has grown too large."""
        idx = hooks.layer_idx
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        keep = max(getattr(self.scorer, "window", 1), 1)
        recent = recent_tokens(cache)
        if not was_prefill and idx in recent:
            old_hidden, old_cos, old_sin = recent[idx]
            hidden, cos, sin = (torch.cat([a, b], dim=1) for a, b in ((old_hidden, hidden), (old_cos, cos),
                                                                       (old_sin, sin)))
        recent[idx] = (hidden[:, -keep:], cos[:, -keep:], sin[:, -keep:])
        layer = cache.layers[idx]
        # a compressed layer says whether it can be cut again (dense ones can; ragged and quantized ones cannot)
        problem = getattr(layer, "recompress_problem", None)
        if problem is None and isinstance(layer, BaseQuantizedLayer):  # transformers' own quantized layers
            problem = "decoding-time compression does not support quantized caches"
        if problem:
            raise ValueError(problem)
        physical = layer.keys.shape[2]
        if physical < self.target + self.interval:
            return
        valid = getattr(layer, "valid", None)  # a compressed layer knows its real slots
        if valid is None:  # a plain layer holds every token: its padding is what this forward's mask hides
            valid = valid_tokens(kwargs.get("attention_mask"), layer.keys.shape[0], physical, layer.keys.device)
        recent_hidden, recent_cos, recent_sin = recent[idx]
        ctx = hooks.context(module, kwargs, layer.keys, layer.values, valid, recent_hidden, (recent_cos, recent_sin))
        scores, protected = self.scorer.layer_scores(ctx)
        counts = valid.sum(-1).clamp(max=self.target).clamp(min=protected.sum(-1).clamp(min=1))
        counts = counts[:, None].expand(scores.shape[0], scores.shape[1])
        indices, slot_valid = select_top(scores, counts)
        cut = store_dense(layer.keys, layer.values, indices, slot_valid, layer.get_seq_length())
        cache.layers[idx] = like_source(layer, cut)  # a sliding-window layer stays one
