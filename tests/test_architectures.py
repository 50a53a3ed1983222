"""Every supported architecture, with sdpa and eager attention: ratio 0 is a no-op, ratio 0.5 really shrinks the cache.

Reference values (kept counts, bytes, sliding layers) are computed here from the config and a run without a press,
never from the package's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHITECTURES, cached_tiny_model, full_attention_layers, prefill, random_ids, torch_threads

import kvpress_like
from kvpress_like import CompressedLayer, KnormPress, SnapKVPress, StreamingLLMPress, press
from kvpress_like.cache import CACHE_KWARG

IMPLS = ("sdpa", "eager")


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()




@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "make_press",
    [lambda: KnormPress(ratio=0.0), lambda: SnapKVPress(ratio=0.0, window=4), lambda: KnormPress(compression_ratio=0)],
    ids=["knorm", "snapkv", "alias"],
)
def test_ratio_zero_generates_exactly_like_no_press(arch, impl, make_press):
    model = cached_tiny_model(arch, impl)
    ids = random_ids(24, seed=1)
    with torch.no_grad():
        reference = model.generate(ids, do_sample=False, max_new_tokens=8)
        with press(model, make_press()):
            out = model.generate(ids, do_sample=False, max_new_tokens=8)
    assert out.shape == (1, 24 + 8)
    assert torch.equal(out, reference)
    # ratio 0 stores the cache unchanged
    full = prefill(model, ids)
    kept = prefill(model, ids, make_press())
    for layer_full, layer_kept in zip(full.layers, kept.layers, strict=True):
        assert torch.equal(layer_full.keys, layer_kept.keys)
        assert torch.equal(layer_full.values, layer_kept.values)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "n, n_sink, window",
    [(24, 0, 0), (23, 1, 2), (20, 6, 8)],  # even, odd (floor), protected tokens (14) outnumber n - floor(n/2) = 10
)
def test_half_ratio_shrinks_every_compressible_layer(arch, impl, n, n_sink, window):
    model = cached_tiny_model(arch, impl)
    config = model.config
    ids = random_ids(n, seed=2)
    full = prefill(model, ids)
    cache = prefill(model, ids, KnormPress(ratio=0.5, n_sink=n_sink, window=window))

    expected_keep = max(n - math.floor(0.5 * n), min(n, n_sink + window))
    compressible = full_attention_layers(config)
    assert compressible, "every tiny model has at least one full-attention layer"
    if arch == "gemma3":
        assert 0 not in compressible  # gemma3's layer 0 is sliding
    h_kv = config.num_key_value_heads
    expected_bytes = 0
    assert len(cache.layers) == config.num_hidden_layers
    for idx, (layer, ref) in enumerate(zip(cache.layers, full.layers, strict=True)):
        if idx in compressible:
            assert isinstance(layer, CompressedLayer), f"layer {idx} was not compressed"
            d = ref.keys.shape[-1]
            assert layer.keys.shape == (1, h_kv, expected_keep, d)
            assert layer.values.shape == (1, h_kv, expected_keep, d)
            assert layer.valid.shape == (1, expected_keep) and layer.valid.dtype == torch.bool
            assert bool(layer.valid.all())
            assert layer.get_seq_length() == n
            # the memory is really gone: tensors are exactly the kept size, not views over the full ones
            assert layer.keys.untyped_storage().nbytes() == _nbytes(layer.keys)
            expected_bytes += 2 * h_kv * expected_keep * d * layer.keys.element_size() + expected_keep  # + bool valid
        else:
            assert type(layer) is type(ref)
            assert not isinstance(layer, CompressedLayer)
            assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
            expected_bytes += _nbytes(ref.keys) + _nbytes(ref.values)

    assert cache.get_seq_length() == n  # logical length: positions continue as without compression
    measured = sum(
        _nbytes(layer.keys)
        + _nbytes(layer.values)
        + (_nbytes(layer.valid) if isinstance(layer, CompressedLayer) else 0)
        for layer in cache.layers
    )
    assert kvpress_like.cache_bytes(cache) == measured == expected_bytes
    full_bytes = sum(_nbytes(layer.keys) + _nbytes(layer.values) for layer in full.layers)
    assert kvpress_like.cache_bytes(full) == full_bytes
    if expected_keep < n:
        assert kvpress_like.cache_bytes(cache) < full_bytes

    # one more token: every layer's logical length and the cache's length grow by one
    with torch.no_grad():
        model(random_ids(1, seed=3), **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == n + 1
    for idx in compressible:
        assert cache.layers[idx].get_seq_length() == n + 1
        assert cache.layers[idx].keys.shape[2] == expected_keep + 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_under_press_runs_and_keeps_budget(arch):
    """generate() under a real press produces the requested number of tokens with a compressed cache."""
    model = cached_tiny_model(arch, "sdpa")
    ids = random_ids(32, seed=4)
    with torch.no_grad(), press(model, StreamingLLMPress(ratio=0.75, n_sink=2)):
        out = model.generate(ids, do_sample=False, max_new_tokens=8, return_dict_in_generate=True)
    cache = out.past_key_values
    assert out.sequences.shape == (1, 40)
    assert torch.equal(out.sequences[:, :32], ids)
    for idx in full_attention_layers(model.config):
        layer = cache.layers[idx]
        assert isinstance(layer, CompressedLayer)
        # 32 - floor(0.75 * 32) = 8 kept, then 7 decoded tokens appended (the 8th is never fed back)
        assert layer.keys.shape[2] == 8 + 7
        assert layer.get_seq_length() == 32 + 7
    assert cache.get_seq_length() == 32 + 7
