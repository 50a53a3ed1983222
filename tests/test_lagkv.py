"""LagKV: scores against a naive reference written from the paper, invariants, and end-to-end on a tiny model.

The reference below loops over rows, heads, partitions, tokens and channels in float64, from the paper's description
(arXiv 2504.04704, section 3): min/max per channel over the next partition, min-max normalisation, standard deviation
over channels, softmax over the partition's tokens, key score plus value score.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import cached_tiny_model, left_pad, random_ids, torch_threads
from transformers import DynamicCache

from kvpress_like import create_press, press
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG, CompressedLayer, RaggedLayer
from kvpress_like.compressors.lagkv import LagKVPress, lagkv_scores


@pytest.fixture(autouse=True)
def _single_thread():
    with torch_threads(1):
        yield


def naive_scores(keys, values, valid, n_sink, lag, weight):
    """Float64 loops: ``[B, H, S]`` scores (0 on padding)."""
    b, h, s, d = keys.shape
    out = torch.zeros(b, h, s, dtype=torch.float64)
    for row in range(b):
        real = [i for i in range(s) if valid[row, i]]
        n = len(real)
        start = min(n_sink, n)
        complete = (n - start) // lag
        n_scored = (complete - 1) * lag if complete >= 2 else 0
        others = real[:start] + real[start + n_scored:]
        for head in range(h):
            for j, pos in enumerate(others):
                out[row, head, pos] = 1 + weight + (j + 1) / len(others)
            for p in range(complete - 1):
                part = real[start + p * lag:start + (p + 1) * lag]
                ref = real[start + (p + 1) * lag:start + (p + 2) * lag]
                total = [0.0] * lag
                for states, w in ((keys, 1.0), (values, weight)):
                    spreads = []
                    for pos in part:
                        normalised = []
                        for c in range(d):
                            column = [float(states[row, head, r, c]) for r in ref]
                            low, high = min(column), max(column)
                            normalised.append((float(states[row, head, pos, c]) - low) / max(high - low, 1e-6))
                        mean = sum(normalised) / d
                        spreads.append(math.sqrt(sum((x - mean) ** 2 for x in normalised) / (d - 1)))
                    exps = [math.exp(x - max(spreads)) for x in spreads]
                    for i, e in enumerate(exps):
                        total[i] += w * e / sum(exps)
                for i, pos in enumerate(part):
                    out[row, head, pos] = total[i]
    return out


def random_kv(b, h, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)


@pytest.mark.parametrize("s, lag, n_sink, weight, pads", [
    (40, 5, 3, 1.0, (0, 0)),
    (41, 4, 0, 0.5, (0, 7)),
    (23, 6, 2, 2.0, (3, 0)),
    (12, 5, 4, 1.0, (0, 1)),  # fewer than two partitions after the sinks: nothing scored, all by position
])
def test_scores_match_naive_reference(s, lag, n_sink, weight, pads):
    keys, values = random_kv(2, 3, s, 8, seed=s)
    valid = torch.ones(2, s, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    got = lagkv_scores(keys, values, valid, n_sink, lag, weight)
    want = naive_scores(keys, values, valid, n_sink, lag, weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()


@settings(max_examples=25, deadline=None)
@given(s=st.integers(2, 60), lag=st.integers(2, 9), n_sink=st.integers(0, 5), weight=st.floats(0, 3),
       seed=st.integers(0, 1000))
def test_invariants(s, lag, n_sink, weight, seed):
    keys, values = random_kv(1, 2, s, 6, seed)
    valid = torch.ones(1, s, dtype=torch.bool)
    scores = lagkv_scores(keys, values, valid, n_sink, lag, weight)
    start = min(n_sink, s)
    complete = (s - start) // lag
    scored = (complete - 1) * lag if complete >= 2 else 0
    top = 1 + weight
    # each scored partition's scores are two softmaxes: they sum to 1 + weight
    parts = scores[0, :, start:start + scored].reshape(2, -1, lag) if scored else scores[0, :, :0].reshape(2, 0, lag)
    torch.testing.assert_close(parts.sum(-1), torch.full(parts.shape[:2], top), rtol=1e-5, atol=1e-5)
    # tokens without a successor partition (and sinks) rank above every scored token, later ones higher
    rest = torch.cat([scores[0, :, :start], scores[0, :, start + scored:]], dim=-1)
    assert (rest > top).all() and (rest.diff(dim=-1) > 0).all()
    if scored:
        assert (parts <= top + 1e-6).all()
    # min-max normalisation: a positive per-channel affine map of keys and values changes nothing
    g = torch.Generator().manual_seed(seed + 1)
    scale, shift = torch.rand(1, 2, 1, 6, generator=g) * 3 + 0.2, torch.randn(1, 2, 1, 6, generator=g) * 5
    moved = lagkv_scores(keys * scale + shift, values * scale - shift, valid, n_sink, lag, weight)
    torch.testing.assert_close(moved, scores, rtol=1e-3, atol=1e-4)


def test_padding_does_not_change_a_row():
    keys, values = random_kv(1, 2, 30, 8, seed=3)
    alone = lagkv_scores(keys, values, torch.ones(1, 30, dtype=torch.bool), 2, 5, 1.0)
    padded_k = torch.cat([torch.randn(1, 2, 6, 8), keys], dim=2)
    padded_v = torch.cat([torch.randn(1, 2, 6, 8), values], dim=2)
    valid = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 30, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(lagkv_scores(padded_k, padded_v, valid, 2, 5, 1.0)[..., 6:], alone)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="lag_size"):
        LagKVPress(ratio=0.5, lag_size=1)
    with pytest.raises(ValueError, match="value_weight"):
        LagKVPress(ratio=0.5, value_weight=-1.0)
    assert create_press("lagkv", ratio=0.25) == LagKVPress(ratio=0.25)


# -- end to end on a tiny model ---------------------------------------------------------------------------------------
LLAMA = dict(arch="llama", initializer_range=0.2)
N, LAG, SINK = 70, 8, 3


def full_cache(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    return cache


def test_prefill_keeps_the_reference_top_k_and_generates():
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=4)
    full = full_cache(model, ids)
    p = LagKVPress(ratio=0.5, n_sink=SINK, lag_size=LAG)
    cache = DynamicCache(config=model.config)
    with press(model, p):
        out = model.generate(ids, **{CACHE_KWARG: cache}, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, N + 6)
    keep = keep_count(N, 0.5)
    valid = torch.ones(1, N, dtype=torch.bool)
    for layer, ref in zip(cache.layers, full.layers, strict=True):
        assert isinstance(layer, CompressedLayer) and layer.compressed_length == keep
        want = naive_scores(ref.keys, ref.values, valid, SINK, LAG, 1.0)
        want[..., :SINK] = math.inf
        kept = want.topk(keep, dim=-1).indices.sort(dim=-1).values
        expected = ref.keys.gather(2, kept[..., None].expand(-1, -1, -1, ref.keys.shape[-1]))
        torch.testing.assert_close(layer.keys[:, :, :keep], expected)
    assert cache.get_seq_length() == N + 5  # positions continue as without compression


def test_generate_after_the_block_equals_inside():
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=5)
    cache = DynamicCache(config=model.config)
    follow = random_ids(4, seed=6)
    with press(model, LagKVPress(ratio=0.6, n_sink=SINK, lag_size=LAG)), torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
        inside = model(follow, **{CACHE_KWARG: cache}).logits
    cache.crop(-4)
    model.set_attn_implementation("kvpress_like_sdpa")
    try:
        with torch.no_grad():
            outside = model(follow, **{CACHE_KWARG: cache}).logits
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(outside, inside, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("allocator", ["head_adaptive", "pyramid", "kvcompose", "dynamic"])
def test_composes_with_allocators(allocator):
    model = cached_tiny_model(**LLAMA)
    ids, mask = left_pad([random_ids(N, seed=7)[0], random_ids(N - 13, seed=8)[0]])
    cache = DynamicCache(config=model.config)
    with press(model, LagKVPress(ratio=0.5, n_sink=SINK, lag_size=LAG, allocator=allocator)):
        out = model.generate(ids, attention_mask=mask, **{CACHE_KWARG: cache}, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, N + 4)
    heads = model.config.num_key_value_heads
    kept = [layer.lengths.sum(-1) if isinstance(layer, RaggedLayer) else layer.valid[:, :layer.compressed_length]
            .sum(-1) * heads for layer in cache.layers]
    total = torch.stack(kept).sum(0)  # per row, over layers and heads
    for row, n in enumerate((N, N - 13)):
        assert int(total[row]) == len(cache.layers) * heads * keep_count(n, 0.5)
