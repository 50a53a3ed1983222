"""CurDKV press: value-guided scores from sketched key and value row norms.

Paper: "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition" (CurDKV), arXiv 2509.15038.
The attention output error is bounded by how well the values are kept, so a token's score combines its key and
value: with a seeded Gaussian projection ``R`` (``D x r``, r = 20, entries ``N(0, 1/r)``), ``l_K = ||(K R)_j||^2``,
``l_V = ||(V R)_j||^2`` and ``score_j = l_K * l_V`` normalised to sum 1 over the row's real tokens; the first 4
tokens are always kept (``n_sink = 4``).

Departures: scores use the cached (post-RoPE) keys; the projection is shared by keys and values of a layer and
seeded per layer (``seed + layer_idx``). The adaptive variant of the paper is obtained with
``allocator="head_adaptive"`` once that allocator exists, not inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press
from .leverage import gaussian_sketch


def cur_scores(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, sketch_size: int, seed: int):
    """``[B, H, S]`` normalised ``||(K R)_j||^2 * ||(V R)_j||^2`` (0 on padding); inputs ``[B, H, S, D]``."""
    projection = gaussian_sketch(keys.shape[-1], sketch_size, seed, keys.device)
    key_norms = (keys.float() @ projection).square().sum(-1)
    value_norms = (values.float() @ projection).square().sum(-1)
    scores = key_norms * value_norms * valid[:, None, :]
    return scores / scores.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass
class CURPress(Press):
    """Keeps tokens whose sketched key and value norms are jointly largest.

    Args:
        sketch_size: projection width ``r`` (20 in the paper).
        seed: base seed of the projection.
    """

    name = "cur"
    supports_decoding = True
    n_sink: int = 4
    sketch_size: int = 20
    seed: int = 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return cur_scores(ctx.keys, ctx.values, ctx.valid, self.sketch_size, self.seed + ctx.layer_idx)
