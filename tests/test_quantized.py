"""Presses on transformers' ``QuantizedCache`` (fp8 backend, pure PyTorch): compressed layers stay quantized."""

from __future__ import annotations

import pytest
import torch
from tiny_models import cached_tiny_model, full_attention_layers, random_ids, torch_threads
from transformers import DynamicCache, QuantizedCache

from kvpress_like import (
    DecodingPress,
    KnormPress,
    PerLayerAllocator,
    StreamingLLMPress,
    create_press,
    list_presses,
    press,
    save_cache,
)
from kvpress_like.allocators.base import keep_count
from kvpress_like.cache import CACHE_KWARG, QuantizedCompressedLayer

LLAMA = dict(arch="llama", initializer_range=0.2)
N = 100  # above SnapKV's and ChunkKV's 64-token observation window


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def fp8_cache(model):
    return QuantizedCache(backend="fp8", config=model.config)


def dequantized(layer) -> tuple[torch.Tensor, torch.Tensor]:
    inner = layer.inner
    return inner._dequantize(inner._quantized_keys), inner._dequantize(inner._quantized_values)


# razor_attention stores ragged per-head layers, which a quantized cache cannot hold: it raises a clear error
# (tests/test_razor_attention.py::test_quantized_cache_is_refused_clearly)
PRESSES = [name for name in list_presses() if name not in ("decoding", "calibrated", "razor_attention")]


@pytest.mark.parametrize("name", PRESSES)
def test_every_press_compresses_a_quantized_cache_and_decodes(name):
    """Before the fix every press raised ``AttributeError: 'Fp8QuantizedLayer' object has no attribute 'dtype'``."""
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=3)
    cache = fp8_cache(model)
    p = create_press(name, ratio=0.5)
    with press(model, p), torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
        for idx in full_attention_layers(model.config):
            layer = cache.layers[idx]
            assert isinstance(layer, QuantizedCompressedLayer)
            assert layer.physical_length == layer.compressed_length < N
            assert layer.inner._quantized_keys[0].dtype == torch.float8_e4m3fn
        assert cache.get_seq_length() == N
        out = model.generate(torch.cat([ids, random_ids(3, seed=4)], dim=1), **{CACHE_KWARG: cache},
                             max_new_tokens=4, do_sample=False)
    assert out.shape[1] == N + 3 + 4
    assert cache.get_seq_length() == N + 3 + 3


@pytest.mark.parametrize("allocator", ["pyramid", "per_layer", "kvcompose", "dynamic"])
def test_allocators_keeping_one_count_per_layer_work(allocator):
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=9)
    if allocator == "per_layer":
        allocator = PerLayerAllocator(ratios=[0.25, 0.5, 0.75])
    plain, quantized = DynamicCache(config=model.config), fp8_cache(model)
    with press(model, StreamingLLMPress(ratio=0.5, allocator=allocator)), torch.no_grad():
        model(ids, **{CACHE_KWARG: plain})
        model(ids, **{CACHE_KWARG: quantized})
        model(ids[:, :1], **{CACHE_KWARG: quantized})
    for ref, layer in zip(plain.layers, quantized.layers):
        assert isinstance(layer, QuantizedCompressedLayer)
        assert layer.compressed_length == ref.keys.shape[2] == layer.physical_length - 1


def test_generate_with_cache_implementation_quantized():
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="quantized",
                  cache_config={"backend": "fp8"}, return_dict_in_generate=True)
    with press(model, KnormPress(ratio=0.5)), torch.no_grad():
        out = model.generate(ids, **kwargs)
    layers = out.past_key_values.layers
    assert all(isinstance(layers[i], QuantizedCompressedLayer) for i in full_attention_layers(model.config))
    assert layers[0].compressed_length == keep_count(N, 0.5)


def test_quantized_compression_keeps_what_a_dynamic_cache_keeps():
    """Same kept entries as on a plain cache (up to fp8 rounding: twice, at the prefill and when the kept entries are
    stored back) and close next-token logits. StreamingLLM's choice depends on positions only, not on fp8 keys."""
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=6, distinct=True)
    step = random_ids(1, seed=7)
    p = StreamingLLMPress(ratio=0.5)
    plain, quantized = DynamicCache(config=model.config), fp8_cache(model)
    with press(model, p), torch.no_grad():
        model(ids, **{CACHE_KWARG: plain})
        model(ids, **{CACHE_KWARG: quantized})
        for idx in full_attention_layers(model.config):
            keys, values = dequantized(quantized.layers[idx])
            ref = plain.layers[idx]
            assert keys.shape == ref.keys.shape
            scale = ref.keys.abs().amax()
            torch.testing.assert_close(keys, ref.keys, atol=0.1 * scale, rtol=0.15)
            torch.testing.assert_close(values, ref.values, atol=0.1 * ref.values.abs().amax(), rtol=0.15)
        expected = model(step, **{CACHE_KWARG: plain}).logits
        got = model(step, **{CACHE_KWARG: quantized}).logits
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_limits_are_clear_errors(tmp_path):
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=8)
    cache = fp8_cache(model)
    with press(model, KnormPress(ratio=0.5, allocator="head_adaptive")), torch.no_grad():
        with pytest.raises(ValueError, match="cannot be combined with a quantized cache"):
            model(ids, **{CACHE_KWARG: cache})
    cache = fp8_cache(model)
    with press(model, DecodingPress(scorer=KnormPress(), target=8, interval=4)), torch.no_grad():
        with pytest.raises(ValueError, match="does not support quantized caches"):
            model(ids, **{CACHE_KWARG: cache})
    cache = fp8_cache(model)
    with press(model, KnormPress(ratio=0.5)), torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    with pytest.raises(NotImplementedError, match="not supported"):
        cache.crop(N - 1)
    with pytest.raises(TypeError, match="QuantizedCache"):
        save_cache(tmp_path / "c.kvc", cache, model, ids)


def test_reset_then_reuse_under_a_press_compresses_again_quantized():
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(N, seed=10)
    cache = fp8_cache(model)
    with press(model, StreamingLLMPress(ratio=0.5)), torch.no_grad():
        first = model(ids, **{CACHE_KWARG: cache}).logits
        kept = [dequantized(layer) for layer in cache.layers]
        cache.reset()
        assert cache.get_seq_length() == 0
        second = model(ids, **{CACHE_KWARG: cache}).logits
    torch.testing.assert_close(second, first)
    for layer, (keys, values) in zip(cache.layers, kept):
        assert isinstance(layer, QuantizedCompressedLayer)
        again = dequantized(layer)
        assert torch.equal(again[0], keys) and torch.equal(again[1], values)
