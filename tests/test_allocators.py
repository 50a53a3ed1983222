"""Allocator and selection invariants over many shapes (hypothesis).

The prefill flow is replayed exactly as ``Press.compress`` runs it: protected tokens from ``Press.protected_mask``,
scores set to ``+inf`` on protected tokens and ``-inf`` on padding, counts from the allocator, then ``select_top``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import torch_threads

from kvpress_like import CompressedLayer, KnormPress, UniformAllocator, list_allocators
from kvpress_like.allocators import keep_count
from kvpress_like.press import select_top, store_dense


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 4))
    s = draw(st.integers(1, 80))
    ratio = draw(st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([0.0, 0.5, 0.25, 0.9, 0.99])))
    n_sink = draw(st.integers(0, 5))
    window = draw(st.integers(0, 10))
    style = draw(st.sampled_from(["left", "right", "random"]))
    rows = []
    for _ in range(b):
        if style == "random":
            row = draw(st.lists(st.booleans(), min_size=s, max_size=s))
            if not any(row):
                row[draw(st.integers(0, s - 1))] = True
        else:
            n_pad = draw(st.integers(0, s - 1))
            row = [False] * n_pad + [True] * (s - n_pad) if style == "left" else [True] * (s - n_pad) + [False] * n_pad
        rows.append(row)
    valid = torch.tensor(rows, dtype=torch.bool)
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())  # coarse scores with many exact ties
    generator = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(0, 3, (b, h, s), generator=generator).float()
    else:
        scores = torch.randn(b, h, s, generator=generator)
    return dict(b=b, h=h, s=s, ratio=ratio, n_sink=n_sink, window=window, valid=valid, scores=scores)


def run_flow(case):
    """Replays Press.compress up to selection; returns (press, protected, masked scores, counts, indices, slots)."""
    p = KnormPress(ratio=case["ratio"], n_sink=case["n_sink"], window=case["window"])
    valid, scores = case["valid"], case["scores"]
    protected = p.protected_mask(valid)
    masked = scores.masked_fill(protected[:, None, :], math.inf).masked_fill(~valid[:, None, :], -math.inf)
    # (scores, valid, protected, ratio, layer_idx, compressible layers): one compressible layer, index 0
    counts = UniformAllocator().allocate(masked, valid, protected, p.ratio, 0, (0,))
    indices, slot_valid = select_top(masked, counts)
    return p, protected, masked, counts, indices, slot_valid


def expected_protected(valid_row: list[bool], n_sink: int, window: int) -> set[int]:
    real = [i for i, v in enumerate(valid_row) if v]
    return set(real[:n_sink]) | set(real[max(len(real) - window, 0) :] if window else [])


@SETTINGS
@given(cases())
def test_uniform_allocation_and_selection_invariants(case):
    p, protected, masked, counts, indices, slot_valid = run_flow(case)
    b, h, s = case["b"], case["h"], case["s"]
    valid = case["valid"]
    assert counts.shape == (b, h) and counts.dtype == torch.long
    assert indices.shape[:2] == (b, h) and slot_valid.shape == indices.shape
    assert indices.shape[2] == int(counts.max())
    for row in range(b):
        valid_row = valid[row].tolist()
        n = sum(valid_row)
        prot = expected_protected(valid_row, case["n_sink"], case["window"])
        assert set(torch.nonzero(protected[row]).flatten().tolist()) == prot
        # documented count: n - floor(ratio * n) (1e-9 guards float error, see allocators/base.py), never below the
        # protected tokens nor below one
        want = max(n - math.floor(case["ratio"] * n + 1e-9), len(prot), 1)
        if case["ratio"] == 0:
            assert want == n
        for head in range(h):
            count = int(counts[row, head])
            assert count == want
            assert 1 <= count <= n
            assert int(slot_valid[row, head].sum()) == count
            assert slot_valid[row, head, :count].all() and not slot_valid[row, head, count:].any()
            kept = indices[row, head, :count].tolist()
            assert kept == sorted(kept) and len(set(kept)) == count, "ascending and unique"
            assert all(0 <= i < s for i in kept)
            assert all(valid_row[i] for i in kept), "padding kept"
            assert prot <= set(kept), "a protected token was dropped"
            if case["ratio"] == 0:
                assert set(kept) == {i for i in range(s) if valid_row[i]}
            # the non-protected kept tokens are the best-scored ones
            raw = case["scores"][row, head]
            kept_free = [raw[i].item() for i in kept if i not in prot]
            dropped = [raw[i].item() for i in range(s) if valid_row[i] and i not in kept]
            if kept_free and dropped:
                assert min(kept_free) >= max(dropped)


@SETTINGS
@given(cases())
def test_store_dense_gathers_exactly_the_selected_entries(case):
    _, _, _, counts, indices, slot_valid = run_flow(case)
    b, h, s = case["b"], case["h"], case["s"]
    keys = torch.randn(b, h, s, 3)
    values = torch.randn(b, h, s, 3)
    layer = store_dense(keys, values, indices, slot_valid)
    assert isinstance(layer, CompressedLayer)
    assert layer.keys.shape == (b, h, int(counts.max()), 3)
    assert layer.get_seq_length() == s
    assert torch.equal(layer.valid, slot_valid[:, 0])
    for row in range(b):
        count = int(counts[row, 0])
        for head in range(h):
            kept = indices[row, head, :count]
            assert torch.equal(layer.keys[row, head, :count], keys[row, head, kept])
            assert torch.equal(layer.values[row, head, :count], values[row, head, kept])


@SETTINGS
@given(st.integers(0, 10_000), st.integers(0, 99))
def test_keep_count_matches_decimal_ratio(n, percent):
    """For a ratio written as a decimal (k/100), the removed count is floor(k * n / 100) computed exactly."""
    ratio = percent / 100
    assert keep_count(n, ratio) == n - math.floor(Fraction(percent, 100) * n)


def test_keep_count_examples():
    assert keep_count(10, 0.3) == 7  # 0.3 * 10 == 3.0000000000000004
    assert keep_count(100, 0.29) == 71  # 0.29 * 100 == 28.999999999999996 in floats
    assert keep_count(7, 0.5) == 4
    assert keep_count(1, 0.99) == 1
    assert keep_count(0, 0.5) == 0


def test_uniform_allocator_is_registered():
    assert "uniform" in list_allocators()
    assert isinstance(KnormPress(ratio=0.5)._allocator, UniformAllocator)


def test_allocator_instance_is_accepted():
    allocator = UniformAllocator()
    p = KnormPress(ratio=0.5, allocator=allocator)
    assert p._allocator is allocator
    assert p.to_dict()["allocator"] == "uniform"


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_rows_with_different_lengths_get_their_own_budget(ratio):
    valid = torch.tensor([[True] * 12, [False] * 5 + [True] * 7, [False] * 11 + [True]])
    scores = torch.randn(3, 2, 12).masked_fill(~valid[:, None], -math.inf)
    protected = torch.zeros_like(valid)
    counts = UniformAllocator().allocate(scores, valid, protected, ratio, 0, (0,))
    expected = [max(n - math.floor(ratio * n), 1) for n in (12, 7, 1)]
    assert counts.tolist() == [[c, c] for c in expected]
