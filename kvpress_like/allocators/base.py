"""The allocator interface: how many entries each head of a layer keeps.

Budget convention (exact, documented once here): a row with ``n`` real (non-padding) context tokens keeps
``n - floor(ratio * n)`` entries per head on average over the layer's heads, and never fewer than its protected
tokens (``min(n, n_sink + window)``) nor fewer than one.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import ClassVar

import torch


def keep_count(n_tokens: int, ratio: float) -> int:
    """Entries kept out of ``n_tokens`` at ``ratio``: ``n - floor(ratio * n)`` (1e-9 guards float error), and at
    least 1 when ``n_tokens >= 1``."""
    return max(n_tokens - math.floor(ratio * n_tokens + 1e-9), min(n_tokens, 1))


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
    """Decides per-head keep counts.

    A *layer-scope* allocator (``scope = "layer"``) implements :meth:`allocate` and decides inside one layer, right
    after that layer's prefill. A *model-scope* allocator (``scope = "model"``) implements :meth:`allocate_model`
    and sees every compressible layer's scores before any layer is pruned (peak memory: the full cache of the
    context plus one ``[B, H_kv, S]`` fp32 score tensor per layer).
    Subclasses set ``name`` and ``scope``, and keep each constructor argument as a public attribute of the same name
    (:meth:`params`), so that an allocator is configuration: it compares and hashes by its parameters and round-trips
    through :meth:`to_dict` / :func:`kvpress_like.registry.allocator_from_dict`.
    """

    name: ClassVar[str] = ""
    scope: ClassVar[str] = "layer"

    def allocate(
        self, scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, ratio: float, layer_idx: int,
        layers: Sequence[int],
    ) -> torch.Tensor:
        """Keep counts for every head of one layer.

        Args:
            scores: ``[B, H_kv, S]`` fp32 scores (higher = keep); padding is ``-inf``, protected tokens ``+inf``.
            valid: ``[B, S]`` bool, real tokens.
            protected: ``[B, S]`` bool, always-kept tokens.
            ratio: the press's ratio.
            layer_idx: index of this layer in the model.
            layers: indices of every compressible layer of the model, ascending.

        Returns:
            ``[B, H_kv]`` long, each entry in ``[max(1, n_protected_b), n_real_b]`` (0 for a row that is all
            padding).
        """
        raise NotImplementedError(f"{type(self).__name__} is a {self.scope}-scope allocator")

    def allocate_model(
        self, scores: list[torch.Tensor], valid: torch.Tensor, protected: torch.Tensor, ratio: float,
        layers: Sequence[int],
    ) -> list[torch.Tensor]:
        """Keep counts for every head of every compressible layer (model scope).

        Args:
            scores: one ``[B, H_kv, S]`` tensor per compressible layer, in the order of ``layers``.
            valid, protected, ratio: as in :meth:`allocate` (shared by all layers).
            layers: indices of the compressible layers.

        Returns:
            one ``[B, H_kv]`` long tensor per layer.
        """
        raise NotImplementedError(f"{type(self).__name__} is a {self.scope}-scope allocator")

    def params(self) -> dict:
        """The constructor arguments: every public attribute (``{"beta": 20.0}`` for the pyramid allocator)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def default_params(self) -> dict:
        """The constructor's defaults, ``{name: default}`` (parameters without a default are left out)."""
        signature = inspect.signature(type(self).__init__)
        return {name: parameter.default for name, parameter in signature.parameters.items()
                if name != "self" and parameter.default is not inspect.Parameter.empty}

    def to_dict(self) -> dict:
        """JSON-ready description ``{"allocator": name, **params}``."""
        return {"allocator": self.name, **self.params()}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((type(self), repr(sorted(self.params().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def distribute(total: int, weights: list[float], lower: list[int], upper: list[int]) -> list[int]:
    """Integers ``x_i`` in ``[lower_i, upper_i]`` summing exactly to ``total``, proportional to ``weights`` as far as
    the bounds allow: ``x_i = clamp(lam * w_i, lower_i, upper_i)`` with ``lam`` found by bisection, then rounded by
    largest remainder. Entries of weight 0 stay at their lower bound unless the others cannot absorb ``total``.

    Raises:
        ValueError: ``total`` is outside ``[sum(lower), sum(upper)]``.
    """
    if not sum(lower) <= total <= sum(upper):
        raise ValueError(f"cannot distribute {total} between bounds summing to {sum(lower)}..{sum(upper)}")
    n = len(weights)
    w = [max(float(v), 0.0) for v in weights]
    if sum(w) <= 0:
        w = [1.0] * n
    reachable = sum(upper[i] if w[i] > 0 else lower[i] for i in range(n))
    if reachable < total:  # the weighted entries saturate: zero-weight entries absorb the rest, evenly
        w = [v if v > 0 else 0.0 for v in w]
        rest = distribute(total - sum(upper[i] for i in range(n) if w[i] > 0),
                          [1.0 if w[i] == 0 else 0.0 for i in range(n)],
                          [lower[i] if w[i] == 0 else 0 for i in range(n)],
                          [upper[i] if w[i] == 0 else 0 for i in range(n)])
        return [upper[i] if w[i] > 0 else rest[i] for i in range(n)]

    def spread(lam: float) -> list[float]:
        return [min(max(lam * w[i], lower[i]), upper[i]) for i in range(n)]

    low, high = 0.0, 1.0
    while sum(spread(high)) < total:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(spread(mid)) < total else (low, mid)
    x = spread(high)
    result = [min(max(int(math.floor(v + 1e-9)), lower[i]), upper[i]) for i, v in enumerate(x)]
    for i in sorted(range(n), key=lambda i: x[i] - result[i], reverse=True):  # largest remainders first
        if sum(result) >= total:
            break
        if result[i] < upper[i]:
            result[i] += 1
    for i in sorted(range(n), key=lambda i: x[i] - result[i]):  # rounding overshoot (rare): take back
        if sum(result) <= total:
            break
        if result[i] > lower[i]:
            result[i] -= 1
    return result
