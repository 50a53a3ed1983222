"""ChunkKV press: keep whole chunks of tokens, shared by every head of a layer, with layer-wise index reuse.

Paper: Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
arXiv 2502.00299. Token scores from an inner scorer (SnapKV by default) are averaged over the heads of the layer and
summed within chunks of ``chunk_size`` consecutive tokens (10 by default); the best chunks are kept, identical for
all heads. Layer-wise index reuse: consecutive layers are grouped by ``reuse_group`` (layer ``l`` is in group
``l // reuse_group``); the first compressed layer of a group selects and the others reuse its indices without
scoring.

Chunks start at each row's first real token, so left padding in a batch does not shift them.

The reused indices are run state: they live in the installation's per-prefill ``ctx.state`` (cleared when the next
prefill starts), never on the press. Reuse needs the layer-by-layer flow, so ``reuse_group > 1`` is refused with
model-scope allocators (which select every layer at once, after the whole prefill).

Departures: to hit the exact budget, the last chunk that does not fit whole is filled with its best tokens
(chunks are ranked first, tokens inside a chunk by their own score); protected tokens (the inner scorer's
observation window) count against the budget like any other token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import check_int
from ..press import LayerContext, Press, as_press, store
from .non_causal_attention import roll_rows
from .snapkv import SnapKVPress


@dataclass
class ChunkKVPress(Press):
    """Keeps the highest-scoring chunks of ``chunk_size`` tokens.

    Args:
        scorer: the press, registry name or :class:`~kvpress_like.scorer.Scorer` whose scores are aggregated per
            chunk.
        chunk_size: tokens per chunk.
        reuse_group: consecutive layers sharing one selection (1 = no reuse).
        window: last tokens always kept (defaults to SnapKV's observation window).
    """

    name = "chunkkv"
    is_plain_scorer = False  # compress() selects whole chunks
    window: int = 64
    scorer: Press | str = field(default_factory=SnapKVPress)
    chunk_size: int = 10
    reuse_group: int = 1
    needs = property(lambda self: self.scorer.needs)  # what its scorer reads

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        self.scorer = as_press(self.scorer)
        for name in ("chunk_size", "reuse_group"):
            check_int(name, getattr(self, name), minimum=1)

    def check_supported(self) -> None:
        """Raise when ``reuse_group > 1`` meets an allocator that would silently ignore it (model scope)."""
        if self.reuse_group > 1 and (self.allocator_instance.scope == "model" or self.defers_selection):
            raise ValueError(
                f"ChunkKVPress(reuse_group={self.reuse_group}) reuses one layer's selection in the next layers, which "
                f"needs a layer-scope allocator; allocator {self.allocator_instance.name!r} selects every layer at "
                "once. Use reuse_group=1 with it, or a layer-scope allocator (uniform, pyramid, head_adaptive, ...)"
            )

    def score(self, ctx: LayerContext) -> torch.Tensor:
        token = self.scorer.score(ctx).float().mean(1)  # [B, S]
        token = token.masked_fill(~ctx.valid, 0.0)
        b, s = token.shape
        pad = (~ctx.valid).long().cumprod(-1).sum(-1)  # chunks start at each row's first real token
        n_chunks = -(-s // self.chunk_size)
        extra = n_chunks * self.chunk_size - s
        aligned = torch.nn.functional.pad(roll_rows(token, pad, 1), (0, extra))
        real = torch.nn.functional.pad(roll_rows(ctx.valid, pad, 1), (0, extra))
        chunk = aligned.view(b, n_chunks, self.chunk_size).sum(-1)
        chunk = chunk.masked_fill(~real.view(b, n_chunks, self.chunk_size).any(-1), float("-inf"))
        rank = (-chunk).argsort(-1).argsort(-1).float()  # 0 = best chunk; padding-only chunks last
        per_token = roll_rows(-rank.repeat_interleave(self.chunk_size, dim=-1)[:, :s], -pad, 1)
        masked = token.masked_fill(~ctx.valid, float("inf"))
        low = masked.min(-1, keepdim=True).values
        high = token.masked_fill(~ctx.valid, float("-inf")).max(-1, keepdim=True).values
        tie_break = (0.5 * (token - low) / (high - low).clamp(min=1e-12)).clamp(0, 0.5)  # in [0, 0.5]
        return (per_token + tie_break)[:, None, :].expand(b, ctx.keys.shape[1], s)

    def compress(self, ctx: LayerContext):
        """Select (or reuse the selection of this layer's group, kept in ``ctx.state`` for this prefill) and store."""
        group = ctx.layer_idx // self.reuse_group
        reused = ctx.state.get("chunkkv_reused")  # (group, indices [B, H, P], slot_valid [B, H, P])
        if self.reuse_group > 1 and reused is not None and reused[0] == group:
            indices, slot_valid = reused[1], reused[2]
        else:
            indices, slot_valid = self.select(ctx)
            ctx.state["chunkkv_reused"] = (group, indices, slot_valid)
        return store(ctx.keys, ctx.values, indices, slot_valid)
