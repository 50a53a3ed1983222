"""The allocator interface: how many entries each head of a layer keeps.

Budget convention (exact, documented once here): a row with ``n`` real (non-padding) context tokens keeps
``n - floor(ratio * n)`` entries per head on average over the layer's heads, and never fewer than its protected
tokens (``min(n, n_sink + window)``) nor fewer than one.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch


def keep_count(n_tokens: int, ratio: float) -> int:
    """Entries kept out of ``n_tokens`` at ``ratio``: ``n - floor(ratio * n)`` (1e-9 guards float error)."""
    return n_tokens - math.floor(ratio * n_tokens + 1e-9)


def row_budgets(valid: torch.Tensor, protected: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-row, per-head keep count before any per-head reallocation.

    Args:
        valid: ``[B, S]`` bool, real (non-padding) context tokens.
        protected: ``[B, S]`` bool, tokens that must be kept (subset of ``valid``).
        ratio: fraction of each row's real tokens to remove, in [0, 1).

    Returns:
        ``[B]`` long: ``max(keep_count(n_b, ratio), n_protected_b)``.
    """
    n_real = valid.sum(-1).tolist()
    n_prot = protected.sum(-1).tolist()
    return torch.tensor([max(keep_count(n, ratio), p) for n, p in zip(n_real, n_prot)], dtype=torch.long)


class Allocator:
    """Decides per-head keep counts for one layer from that layer's scores (a layer-scope allocator).

    Subclasses set ``name`` and implement :meth:`allocate`.
    """

    name: ClassVar[str] = ""

    def allocate(
        self, scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, ratio: float, layer_idx: int,
        num_layers: int,
    ) -> torch.Tensor:
        """Keep counts for every head.

        Args:
            scores: ``[B, H_kv, S]`` fp32 scores (higher = keep); padding is ``-inf``, protected tokens ``+inf``.
            valid: ``[B, S]`` bool, real tokens.
            protected: ``[B, S]`` bool, always-kept tokens.
            ratio: the press's ratio.
            layer_idx: index of this layer in the model.
            num_layers: number of decoder layers in the model.

        Returns:
            ``[B, H_kv]`` long, each entry in ``[max(1, n_protected_b), n_real_b]``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
