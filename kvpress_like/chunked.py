"""Chunked prefill with compression: prefill a context longer than memory allows, chunk by chunk.

The context is fed in chunks of ``chunk_size`` tokens. After each chunk's attention, every compressible layer scores
the chunk's new entries with the press's scorer (on the chunk's own hidden states and queries, so every scorer
works, Compactor and leverage included), then keeps the best ``keep_count(tokens seen, ratio)`` entries per KV head
among the entries it already held and the new ones, by the score each entry got when its chunk arrived. The cache
never holds more than the running budget plus one chunk, so the peak KV memory is about
``(1 - ratio) * S + chunk_size`` entries per head instead of ``S``.

Differences from one-shot compression (the same press on the whole context at once):

* each chunk is scored on its own: attention-based scorers only see the chunk's queries and keys, and leverage is
  computed within the chunk; scores of different chunks are compared as they are (Compactor's are standardised per
  chunk, so they are on one scale);
* the first ``n_sink`` tokens of the context stay protected; the ``window`` most recent tokens are protected after
  each chunk (at the end: the context's last ``window`` tokens, as in one-shot compression);
* budgets are uniform over the heads of a layer (dense storage); head-adaptive and model-scope allocators, and
  presses with their own selection (ChunkKV) or decoding-time compression, are refused.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from .allocators import keep_count
from .allocators.uniform import UniformAllocator
from .cache import CACHE_KWARG, like_source
from .checks import check_int
from .context import press as press_context
from .press import Press, select_top, store_dense


class _ChunkedPress(Press):
    """Internal: compresses after every chunk's forward (``compresses_prefill`` is off; ``after_forward`` acts).

    The scores and positions of the entries each layer holds are run state: they live in the installation's
    per-prefill ``hooks.state`` (the first chunk is the prefill; later chunks extend it), not on this press."""

    name = "chunked_prefill"
    is_plain_scorer = False
    acts_while_decoding = True  # after_forward compresses after every forward
    reads_whole_prefill = True

    def __init__(self, inner: Press):
        super().__init__(ratio=0.0)
        self.inner = inner

    def compresses_prefill(self) -> bool:
        return False

    def after_forward(self, hooks, module, kwargs, cache, was_prefill) -> None:
        idx = hooks.layer_idx
        layer = cache.layers[idx]
        seen = layer.get_seq_length()
        chunk = kwargs["hidden_states"].shape[1]
        keys, values = layer.keys, layer.values  # [B, H, P_old + chunk, D]: the kept entries, then the chunk
        batch, heads = keys.shape[:2]
        all_valid = torch.ones(batch, chunk, dtype=torch.bool, device=keys.device)
        ctx = hooks.context(module, kwargs, keys[:, :, -chunk:], values[:, :, -chunk:], all_valid)
        new_scores = self.inner.score(ctx).float()
        if new_scores.shape != (batch, heads, chunk) or torch.isnan(new_scores).any():
            raise ValueError(f"{type(self.inner).__name__}.score returned shape {tuple(new_scores.shape)} or NaN; "
                             f"expected {(batch, heads, chunk)} finite scores")
        new_positions = torch.arange(seen - chunk, seen, device=keys.device).expand(batch, heads, chunk)
        carried = hooks.state.setdefault("chunked_carried", {})  # layer -> (scores, positions) [B, H, P]
        old_scores, old_positions = carried.get(idx, (new_scores[..., :0], new_positions[..., :0]))
        scores = torch.cat([old_scores, new_scores], dim=-1)
        positions = torch.cat([old_positions, new_positions], dim=-1)
        protected = (positions < self.inner.n_sink) | (positions >= seen - self.inner.window)
        ranked = scores.masked_fill(protected, math.inf)
        keep = min(max(keep_count(seen, self.inner.ratio), int(protected.sum(-1).max())), scores.shape[-1])
        counts = torch.full((batch, heads), keep, dtype=torch.long, device=keys.device)
        indices, slot_valid = select_top(ranked, counts)
        cache.layers[idx] = like_source(layer, store_dense(keys, values, indices, slot_valid, seen))
        carried[idx] = (scores.gather(-1, indices), positions.gather(-1, indices))


def check_press(p: Press) -> None:
    """Raise unless chunked prefill supports press ``p`` (a press that scores tokens, with the uniform allocator).

    Raises:
        TypeError: ``p`` is not a press.
        ValueError: it is not a plain scorer (``Press.is_plain_scorer``: it selects, installs hooks or acts while
            decoding by itself), or uses another allocator.
    """
    if not isinstance(p, Press):
        raise TypeError(f"chunked_prefill needs a Press; got {type(p).__name__}")
    if not p.is_plain_scorer or not isinstance(p.allocator_instance, UniformAllocator):
        reason = ("is not a plain scorer (it selects, installs hooks or acts while decoding by itself)"
                  if not p.is_plain_scorer else "uses allocator " + p.allocator_instance.name)
        raise ValueError(f"chunked prefill supports presses that score tokens with the uniform allocator; "
                         f"{type(p).__name__} {reason}")


def _check(model, p: Press, input_ids: torch.Tensor, chunk_size: int) -> None:
    check_press(p)
    check_int("chunk_size", chunk_size, minimum=1)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [batch, seq_len] tensor (rows of equal length, no padding)")


def chunked_prefill(model, p: Press, input_ids: torch.Tensor, chunk_size: int = 2048,
                    cache: DynamicCache | None = None) -> DynamicCache:
    """Prefill ``input_ids`` in chunks, compressing every compressible layer to the running budget after each.

    Args:
        model: a supported causal LM (no press installed on it).
        p: the press whose scorer, ratio, ``n_sink`` and ``window`` are used (uniform allocator).
        input_ids: ``[B, S]`` context tokens, rows of equal length (no padding).
        chunk_size: tokens per forward; peak KV memory is about ``(1 - ratio) * S + chunk_size`` entries per head.
        cache: an empty cache to fill (default: a new ``DynamicCache``).

    Returns:
        The cache: every compressible layer holds ``keep_count(S, ratio)`` entries per KV head (dense) and keeps
        the logical length ``S``, so decoding continues at the right positions without a press installed.

    Raises:
        ValueError: a bad chunk size or input, a press or allocator chunked prefill does not support, or a
            non-empty cache.
    """
    _check(model, p, input_ids, chunk_size)
    cache = DynamicCache(config=model.config) if cache is None else cache
    if cache.get_seq_length() != 0:
        raise ValueError("chunked_prefill needs an empty cache")
    extra = {"logits_to_keep": 1}  # no [S, vocab] logits: only memory for the cache and one chunk's activations
    with torch.no_grad(), press_context(model, _ChunkedPress(p)):
        for start in range(0, input_ids.shape[1], chunk_size):
            model(input_ids=input_ids[:, start:start + chunk_size], **{CACHE_KWARG: cache}, use_cache=True, **extra)
    return cache
