"""Budget invariants of every registered allocator, over many shapes (hypothesis).

Scores are prepared as ``Press.layer_scores`` prepares them (``+inf`` on protected tokens, ``-inf`` on padding);
layer-scope allocators are called once per compressible layer, model-scope ones once with every layer's scores;
counts then go through ``select_top`` exactly as the prefill flow does. The budget of a row with ``n`` real tokens
and ``n_protected`` protected ones is ``n_layers * H * max(n - floor(ratio * n), n_protected)`` in total over the
layers and heads (``per_layer``: the same with each layer's own ratio).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import torch_threads

from kvpress_like import (
    DynamicAllocator,
    HeadAdaptiveAllocator,
    KVComposeAllocator,
    PerLayerAllocator,
    PyramidAllocator,
    list_allocators,
)
from kvpress_like.allocators import keep_count
from kvpress_like.allocators.base import distribute
from kvpress_like.plugins.builtin import ALLOCATORS
from kvpress_like.press import select_top
from kvpress_like.registry import get_allocator_class

# Every allocator the library registers. Third-party plugins (tests/test_plugin_distribution.py installs one for a
# while) may register allocators with other budget rules, so the registry's full list is not parametrized over.
BUILTIN = sorted(cls.name for cls in ALLOCATORS)

N_MODEL_LAYERS = 8  # decoder layers of the imaginary model; the compressible ones are a subset
EQUAL_PER_LAYER = {"uniform", "pyramid", "kvcompose", "dynamic", "per_layer"}  # every head of a layer keeps the same
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def test_every_builtin_allocator_is_covered():
    assert BUILTIN == ["dynamic", "head_adaptive", "kvcompose", "per_layer", "pyramid", "uniform"]
    assert set(BUILTIN) <= set(list_allocators())


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------


def protected_tokens(valid: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """``[B, S]``: first ``n_sink`` and last ``window`` real tokens of each row (written independently here)."""
    out = torch.zeros_like(valid)
    for row in range(valid.shape[0]):
        real = valid[row].nonzero().flatten().tolist()
        for rank, pos in enumerate(real):
            out[row, pos] = rank < n_sink or rank >= len(real) - window
    return out


def prepare(raw: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Like ``Press.layer_scores``: ``+inf`` on protected, ``-inf`` on padding."""
    return raw.masked_fill(protected[:, None, :], math.inf).masked_fill(~valid[:, None, :], -math.inf)


@st.composite
def cases(draw, ratio=None):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 4))
    s = draw(st.integers(1, 80))
    n_layers = draw(st.integers(1, 5))
    layers = sorted(draw(st.lists(st.integers(0, N_MODEL_LAYERS - 1), min_size=n_layers, max_size=n_layers,
                                  unique=True)))
    if ratio is None:
        # ratios within ~1e-9 of 1 make keep_count return 0: see test_budget_is_at_least_one_for_ratio_near_one
        ratio = draw(st.one_of(st.floats(0.0, 1.0 - 1e-6),
                               st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 0.99])))
    layer_ratios = draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.75, 0.9]), min_size=N_MODEL_LAYERS,
                                 max_size=N_MODEL_LAYERS))
    n_sink = draw(st.integers(0, 5))
    window = draw(st.integers(0, 10))
    n_pad = [draw(st.integers(0, s - 1)) for _ in range(b)]  # left padding, at least one real token per row
    valid = torch.tensor([[False] * p + [True] * (s - p) for p in n_pad], dtype=torch.bool)
    protected = protected_tokens(valid, n_sink, window)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["randn", "ties", "scaled"]))
    scores = []
    for _ in layers:
        if kind == "ties":  # coarse scores with many exact ties
            raw = torch.randint(0, 3, (b, h, s), generator=generator).float()
        elif kind == "scaled":  # heads and layers on different scales
            raw = torch.randn(b, h, s, generator=generator) * torch.rand(1, h, 1, generator=generator) * 10
        else:
            raw = torch.randn(b, h, s, generator=generator)
        scores.append(prepare(raw, valid, protected))
    return dict(b=b, h=h, s=s, layers=layers, ratio=ratio, layer_ratios=layer_ratios, valid=valid,
                protected=protected, scores=scores)


def make_allocator(name: str, case: dict):
    if name == "per_layer":
        return PerLayerAllocator(ratios=case["layer_ratios"])
    return get_allocator_class(name)()


def all_counts(allocator, case: dict) -> list[torch.Tensor]:
    """``[B, H]`` counts of every compressible layer, calling the allocator as the prefill flow does."""
    valid, protected, ratio, layers = case["valid"], case["protected"], case["ratio"], case["layers"]
    if allocator.scope == "model":
        counts = allocator.allocate_model([s.clone() for s in case["scores"]], valid, protected, ratio, layers)
        assert isinstance(counts, list) and len(counts) == len(layers)
        return counts
    assert allocator.scope == "layer"
    return [allocator.allocate(scores.clone(), valid, protected, ratio, idx, layers)
            for scores, idx in zip(case["scores"], layers)]


def expected_totals(name: str, case: dict) -> list[int]:
    """Entries kept per row over every layer and head."""
    n_real = case["valid"].sum(-1).tolist()
    n_prot = case["protected"].sum(-1).tolist()
    h, layers = case["h"], case["layers"]
    if name == "per_layer":
        return [sum(h * max(keep_count(n, case["layer_ratios"][idx]), p) for idx in layers)
                for n, p in zip(n_real, n_prot)]
    return [len(layers) * h * max(keep_count(n, case["ratio"]), p) for n, p in zip(n_real, n_prot)]


# ---------------------------------------------------------------------------------------------------------------------
# Every allocator
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
@SETTINGS
@given(case=cases())
def test_budget_bounds_and_selection(name, case):
    allocator = make_allocator(name, case)
    b, h, s = case["b"], case["h"], case["s"]
    valid, protected = case["valid"], case["protected"]
    originals = [x.clone() for x in case["scores"]]
    counts = all_counts(allocator, case)
    n_real = valid.sum(-1)
    n_prot = protected.sum(-1)

    totals = torch.zeros(b, dtype=torch.long)
    for scores, original, layer_counts in zip(case["scores"], originals, counts):
        assert torch.equal(scores, original), "the allocator modified the scores in place"
        assert layer_counts.shape == (b, h) and layer_counts.dtype == torch.long
        assert bool((layer_counts >= 1).all()), layer_counts
        assert bool((layer_counts <= n_real[:, None]).all()), (layer_counts, n_real)
        assert bool((layer_counts >= n_prot[:, None]).all()), (layer_counts, n_prot)
        if name in EQUAL_PER_LAYER:
            assert bool((layer_counts == layer_counts[:, :1]).all()), layer_counts
        totals += layer_counts.sum(-1)

        indices, slot_valid = select_top(scores, layer_counts)
        assert torch.equal(slot_valid.sum(-1), layer_counts)
        for row in range(b):
            for head in range(h):
                kept = indices[row, head][slot_valid[row, head]]
                assert kept.tolist() == sorted(set(kept.tolist())), "kept tokens must be distinct and ascending"
                kept_mask = torch.zeros(s, dtype=torch.bool)
                kept_mask[kept] = True
                assert not bool((kept_mask & ~valid[row]).any()), "a padding token was kept"
                assert not bool((protected[row] & ~kept_mask).any()), "a protected token was evicted"
    assert totals.tolist() == expected_totals(name, case)


@pytest.mark.parametrize("name", BUILTIN)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(ratio=0.0))
def test_ratio_zero_keeps_everything(name, case):
    if name == "per_layer":
        case = {**case, "layer_ratios": [0.0] * N_MODEL_LAYERS}
    counts = all_counts(make_allocator(name, case), case)
    n_real = case["valid"].sum(-1)
    for layer_counts in counts:
        assert torch.equal(layer_counts, n_real[:, None].expand_as(layer_counts))


@pytest.mark.parametrize("name", BUILTIN)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_rows_are_allocated_independently(name, case):
    """A row's counts do not depend on the other rows of the batch (each row has its own budget)."""
    allocator = make_allocator(name, case)
    together = all_counts(allocator, case)
    for row in range(case["b"]):
        alone = {**case, "valid": case["valid"][row : row + 1], "protected": case["protected"][row : row + 1],
                 "scores": [s[row : row + 1] for s in case["scores"]]}
        for layer_together, layer_alone in zip(together, all_counts(allocator, alone)):
            assert torch.equal(layer_together[row : row + 1], layer_alone)


# ---------------------------------------------------------------------------------------------------------------------
# Allocator-specific shapes of the budget
# ---------------------------------------------------------------------------------------------------------------------


def uniform_budget(case: dict, row: int) -> tuple[int, int, int]:
    n = int(case["valid"][row].sum())
    p = int(case["protected"][row].sum())
    return n, p, max(keep_count(n, case["ratio"]), p)


@SETTINGS
@given(case=cases())
def test_pyramid_decreases_with_depth_and_averages_to_uniform(case):
    beta = 20.0
    counts = all_counts(PyramidAllocator(beta=beta), case)
    per_layer = torch.stack([c[:, 0] for c in counts], dim=1)  # [B, L]
    n_layers = len(case["layers"])
    for row in range(case["b"]):
        n, p, budget = uniform_budget(case, row)
        profile = per_layer[row].tolist()
        assert all(a >= b for a, b in zip(profile, profile[1:])), profile
        assert sum(profile) == n_layers * budget  # mean over layers == uniform budget
        free = budget - p
        if n_layers > 1 and p > 0 and p + free * (2 - 1 / beta) <= n:  # unconstrained: the paper's linear profile
            for i, count in enumerate(profile):
                ideal = p + free * ((2 - 1 / beta) - i * (2 - 2 / beta) / (n_layers - 1))
                assert abs(count - ideal) < 1, (profile, i, ideal)


NEAR_ONE = 0.9999999999999998  # the largest float below 1: a valid ratio


def test_keep_count_is_at_least_one_for_ratio_near_one():
    assert keep_count(1, NEAR_ONE) >= 1


@pytest.mark.parametrize("name", ["uniform", "pyramid", "head_adaptive", "kvcompose", "dynamic"])
def test_budget_is_at_least_one_for_ratio_near_one(name):
    valid = torch.ones(1, 1, dtype=torch.bool)
    protected = torch.zeros(1, 1, dtype=torch.bool)
    case = dict(valid=valid, protected=protected, ratio=NEAR_ONE, layers=[0], scores=[torch.zeros(1, 1, 1)])
    for layer_counts in all_counts(make_allocator(name, case), case):
        assert int(layer_counts.min()) >= 1


def test_pyramid_profile_example():
    """Four layers, 100 tokens, ratio 0.5, no protected token: budgets 2F - F/beta .. F/beta around F = 50."""
    valid = torch.ones(1, 100, dtype=torch.bool)
    protected = torch.zeros(1, 100, dtype=torch.bool)
    scores = torch.randn(1, 2, 100)
    allocator = PyramidAllocator(beta=20)
    counts = [int(allocator.allocate(scores, valid, protected, 0.5, i, [0, 1, 2, 3])[0, 0]) for i in range(4)]
    assert sum(counts) == 200
    assert counts[0] > counts[1] > counts[2] > counts[3]
    assert abs(counts[0] - 97.5) <= 2 and abs(counts[3] - 2.5) <= 2


@SETTINGS
@given(case=cases(), alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_head_adaptive_keeps_alpha_of_uniform_budget_per_head(case, alpha):
    allocator = HeadAdaptiveAllocator(alpha=alpha)
    for scores, idx in zip(case["scores"], case["layers"]):
        counts = allocator.allocate(scores, case["valid"], case["protected"], case["ratio"], idx, case["layers"])
        for row in range(case["b"]):
            _, _, budget = uniform_budget(case, row)
            assert int(counts[row].sum()) == case["h"] * budget
            assert int(counts[row].min()) >= math.floor(alpha * budget + 1e-6) - 1, (counts[row], alpha, budget)
            if alpha == 1.0:
                assert counts[row].tolist() == [budget] * case["h"]


def test_head_adaptive_moves_budget_to_the_winning_head():
    """Head 0 outscores head 1 everywhere: it wins the top-k, head 1 keeps about ``alpha * B``."""
    scores = torch.stack([torch.arange(10.0) + 100, torch.arange(10.0)])[None]  # [1, 2, 10]
    valid = torch.ones(1, 10, dtype=torch.bool)
    protected = torch.zeros(1, 10, dtype=torch.bool)
    counts = HeadAdaptiveAllocator(alpha=0.2).allocate(scores, valid, protected, 0.5, 0, [0])[0].tolist()
    assert sum(counts) == 10 and counts[0] > counts[1] >= 1


def test_head_adaptive_matches_adakv_formula_when_no_bound_binds():
    scores = torch.stack([torch.arange(10.0) + 100, torch.arange(10.0)])[None]
    valid = torch.ones(1, 10, dtype=torch.bool)
    protected = torch.zeros(1, 10, dtype=torch.bool)
    # B = 5; head 0 wins all 10 of the top-10: c = [10, 0]; capacity = [10 * 0.8 + 0.2 * 5, 0 * 0.8 + 0.2 * 5]
    counts = HeadAdaptiveAllocator(alpha=0.2).allocate(scores, valid, protected, 0.5, 0, [0])[0].tolist()
    assert counts == [9, 1]


@pytest.mark.parametrize("cls", [KVComposeAllocator, DynamicAllocator])
def test_model_scope_allocator_moves_budget_to_the_layer_with_higher_scores(cls):
    valid = torch.ones(1, 40, dtype=torch.bool)
    protected = torch.zeros(1, 40, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(1, 2, 40, generator=generator)
    high = torch.rand(1, 2, 40, generator=generator) + 0.5
    counts = cls().allocate_model([low, high], valid, protected, 0.5, [0, 1])
    assert int(counts[0].sum() + counts[1].sum()) == 2 * 2 * 20
    assert int(counts[1][0, 0]) > int(counts[0][0, 0])


def test_kvcompose_with_saturated_scores_keeps_protected_tokens():
    """``Press.layer_scores`` clamps a scorer's ``+inf`` to ``finfo.max``; every layer must still keep >= 1 token."""
    big = torch.finfo(torch.float32).max
    valid = torch.ones(1, 6, dtype=torch.bool)
    protected = torch.zeros(1, 6, dtype=torch.bool)
    protected[0, -1] = True
    scores = [prepare(torch.full((1, 2, 6), big), valid, protected) for _ in range(2)]
    counts = KVComposeAllocator().allocate_model(scores, valid, protected, 0.5, [0, 1])
    for layer_counts in counts:
        assert int(layer_counts.min()) >= 1


def test_per_layer_uses_the_ratio_of_each_model_layer():
    valid = torch.ones(1, 20, dtype=torch.bool)
    protected = torch.zeros(1, 20, dtype=torch.bool)
    scores = torch.randn(1, 3, 20)
    allocator = PerLayerAllocator(ratios=[0.9, 0.5, 0.0])
    counts = [allocator.allocate(scores, valid, protected, 0.3, idx, [1, 2]) for idx in (1, 2)]
    assert counts[0].tolist() == [[10, 10, 10]] and counts[1].tolist() == [[20, 20, 20]]
    with pytest.raises(ValueError, match="ratios"):
        allocator.allocate(scores, valid, protected, 0.3, 3, [3])


# ---------------------------------------------------------------------------------------------------------------------
# distribute
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def distribute_cases(draw):
    n = draw(st.integers(1, 8))
    positive = st.one_of(st.floats(0.001, 100), st.integers(1, 5).map(float))
    weights = draw(st.one_of(st.lists(positive, min_size=n, max_size=n), st.just([0.0] * n)))
    lower = draw(st.lists(st.integers(0, 10), min_size=n, max_size=n))
    upper = [lo + draw(st.integers(0, 30)) for lo in lower]
    total = draw(st.integers(sum(lower), sum(upper)))
    return weights, lower, upper, total


@settings(max_examples=400, deadline=None)
@given(case=distribute_cases())
def test_distribute_sum_is_exact_and_bounds_hold(case):
    weights, lower, upper, total = case
    result = distribute(total, weights, lower, upper)
    assert all(isinstance(x, int) for x in result)
    assert sum(result) == total
    assert all(lo <= x <= up for x, lo, up in zip(result, lower, upper)), (result, lower, upper)


@settings(max_examples=400, deadline=None)
@given(case=distribute_cases())
def test_distribute_is_monotone_in_weights_for_equal_bounds(case):
    weights, _, _, _ = case
    n = len(weights)
    total = 7 * n
    result = distribute(total, weights, [1] * n, [12] * n)
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j]:
                assert result[i] >= result[j], (weights, result)


@settings(max_examples=400, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=8),
    total=st.integers(0, 500),
)
def test_distribute_is_proportional_when_unconstrained(weights, total):
    result = distribute(total, weights, [0] * len(weights), [10_000] * len(weights))
    weight_sum = sum(weights)
    assert sum(result) == total
    for x, w in zip(result, weights):
        assert abs(x - total * w / weight_sum) < 1, (result, weights)


def test_distribute_saturates_then_redistributes():
    assert distribute(10, [10, 1, 1], [0, 0, 0], [4, 10, 10]) == [4, 3, 3]
    assert distribute(6, [1, 1, 1], [2, 2, 2], [2, 2, 2]) == [2, 2, 2]
    assert distribute(5, [0, 0], [0, 0], [5, 5]) in ([3, 2], [2, 3])  # zero weights: as equal as possible


def test_distribute_is_proportional_when_bounds_do_not_bind():
    assert distribute(10, [9, 1], [1, 1], [10, 10]) == [9, 1]


def test_distribute_sum_is_exact_with_zero_weights():
    assert sum(distribute(2, [0.0, 1.0, 0.0], [0, 0, 0], [0, 0, 2])) == 2  # returns [0, 0, 1]


def test_dynamic_total_is_exact_when_winning_layers_saturate():
    valid = torch.ones(1, 10, dtype=torch.bool)
    protected = torch.zeros(1, 10, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    high = torch.rand(1, 2, 10, generator=generator) + 10  # layer 0 wins every slot of the global top-k
    low = torch.rand(1, 2, 10, generator=generator)
    counts = DynamicAllocator(radio_max=1.0).allocate_model([high, low], valid, protected, 0.5, [0, 1])
    # radio_max=1 caps each layer at the uniform budget (5): the only exact split is uniform; got [5, 5] and [2, 2]
    assert [c.tolist() for c in counts] == [[[5, 5]], [[5, 5]]]


@pytest.mark.parametrize(
    "total, lower, upper",
    [(2, [1, 1, 1], [5, 5, 5]), (16, [1, 1, 1], [5, 5, 5]), (-1, [0], [3]), (1, [0, 0], [0, 0])],
)
def test_distribute_raises_when_infeasible(total, lower, upper):
    with pytest.raises(ValueError, match="cannot distribute"):
        distribute(total, [1.0] * len(lower), lower, upper)
