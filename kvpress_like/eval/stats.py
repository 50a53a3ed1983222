"""95 % intervals for evaluation scores: Wilson for accuracies, paired bootstrap for differences on shared samples."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Z95 = 1.959964


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``(nan, nan)`` for ``n = 0``)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(scores: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of ``scores`` in [0, 1]: Wilson when every score is 0 or 1, else a bootstrap."""
    if all(s in (0, 1) for s in scores):
        return wilson_interval(sum(scores), len(scores))
    return _bootstrap(scores, n_boot, seed)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over shared samples with its 95 % bootstrap interval, and the counts of discordant pairs
    (``a_only``: ``a`` right and ``b`` wrong; ``b_only`` the reverse) for binary scores."""

    mean: float
    low: float
    high: float
    n: int
    a_only: int
    b_only: int


def paired_difference(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> PairedDifference:
    """Paired difference ``a - b`` of two presses' scores on the same samples (``a[i]``, ``b[i]`` one sample).

    The interval resamples samples (pairs) with replacement ``n_boot`` times (percentile interval, seeded).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same samples; got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    if not diffs:
        return PairedDifference(math.nan, math.nan, math.nan, 0, 0, 0)
    low, high = _bootstrap(diffs, n_boot, seed)
    return PairedDifference(sum(diffs) / len(diffs), low, high, len(diffs),
                            sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))


def _bootstrap(values: list[float], n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of ``values`` over ``n_boot`` seeded resamples."""
    if not values:
        return math.nan, math.nan
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[min(n_boot - 1, int(0.975 * n_boot))]
