"""Every supported architecture, with sdpa and eager attention: ratio 0 is a no-op, ratio 0.5 really shrinks the cache.

Reference values (kept counts, bytes, sliding layers) are computed here from the config and a run without a press,
never from the package's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import (
    ARCHITECTURES,
    SLIDING_ARCHITECTURES,
    cached_tiny_model,
    full_attention_layers,
    prefill,
    random_ids,
    torch_threads,
)
from transformers import DynamicCache

import kvpress_like
from kvpress_like import CompressedLayer, KnormPress, SnapKVPress, StreamingLLMPress, press
from kvpress_like.cache import CACHE_KWARG, SlidingCompressedLayer

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


# -- every layer sliding-window (Mistral-7B-v0.1 style): compressed when the prefill fits in the window ----------------
SLIDING_WINDOW = 64


def _greedy(model, ids, cache, steps: int, attention_mask=None):
    """Greedy loop with explicit positions; returns (tokens, last-position logits of every forward)."""
    n = ids.shape[1]
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    out = model(ids, **{CACHE_KWARG: cache}, position_ids=torch.arange(n)[None], **kwargs)
    logits, tokens = [out.logits[0, -1]], [int(out.logits[0, -1].argmax())]
    for step in range(steps):
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        out = model(torch.tensor([[tokens[-1]]]), **{CACHE_KWARG: cache}, position_ids=torch.tensor([[n + step]]),
                    **kwargs)
        logits.append(out.logits[0, -1])
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES)
def test_all_sliding_ratio_zero_generates_exactly_like_no_press(arch, impl):
    """A model whose every layer is sliding-window is accepted; ratio 0 changes nothing, also past the window."""
    model = cached_tiny_model(arch, impl)
    ids = random_ids(40, seed=11)
    with torch.no_grad():
        reference = model.generate(ids, do_sample=False, max_new_tokens=40)  # 80 tokens > the 64-token window
        with press(model, KnormPress(ratio=0.0)):
            out = model.generate(ids, do_sample=False, max_new_tokens=40)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES)
@pytest.mark.parametrize("n", [40, SLIDING_WINDOW])  # shorter than the window, and exactly the window
def test_all_sliding_half_ratio_keeps_half_in_sliding_layers(arch, n):
    model = cached_tiny_model(arch, "sdpa")
    ids = random_ids(n, seed=12)
    cache = prefill(model, ids, KnormPress(ratio=0.5))
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        assert isinstance(layer, SlidingCompressedLayer) and layer.is_sliding
        assert layer.sliding_window == SLIDING_WINDOW
        assert layer.keys.shape[2] == n - n // 2 and layer.get_seq_length() == n
        assert layer.positions.shape == layer.keys.shape[:3]
        assert bool(((layer.positions >= 0) & (layer.positions < n)).all())
        assert bool((layer.positions.diff(dim=-1) > 0).all())  # kept tokens in ascending order, no repeat
    with torch.no_grad(), press(model, KnormPress(ratio=0.5)):
        out = model.generate(ids, do_sample=False, max_new_tokens=8, return_dict_in_generate=True)
    assert out.sequences.shape == (1, n + 8)
    assert all(layer.keys.shape[2] == n - n // 2 + 7 for layer in out.past_key_values.layers)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES)
def test_all_sliding_compressed_layer_hides_entries_older_than_the_window(arch, impl):
    """StreamingLLM keeps the same tokens in every head and layer, so the model without a press, with those tokens
    masked out, is an exact reference: decoding 60 tokens past a 40-token context crosses the 64-token window, where
    the kept sinks (positions 0, 1) and then the kept recent tokens must stop being attended."""
    model = cached_tiny_model(arch, impl)
    n, steps = 40, 60
    ids = random_ids(n, seed=13)
    p = StreamingLLMPress(ratio=0.5, n_sink=2)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        with press(model, p):
            tokens, logits = _greedy(model, ids, cache, steps)
        kept = torch.zeros(1, n, dtype=torch.long)
        kept[0, :2] = 1
        kept[0, -(n - n // 2 - 2):] = 1
        ref_tokens, ref_logits = _greedy(model, ids, DynamicCache(config=model.config), steps,
                                         attention_mask=torch.ones(1, n, dtype=torch.long))
        # the reference masks the evicted tokens from the first decoding step on (the prefill saw them all)
        ref_cache = DynamicCache(config=model.config)
        model(ids, **{CACHE_KWARG: ref_cache}, position_ids=torch.arange(n)[None])
        mask = kept.clone()
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            out = model(torch.tensor([[tokens[step]]]), **{CACHE_KWARG: ref_cache}, attention_mask=mask,
                        position_ids=torch.tensor([[n + step]]))
            torch.testing.assert_close(logits[step + 1], out.logits[0, -1], atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == n + steps
    assert ref_tokens[0] == tokens[0]
    # without the window the same cache would attend differently once it is crossed: the test can tell
    loose = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        _greedy(model, ids, loose, 0)
        for layer in loose.layers:
            layer.sliding_window = 10**6
        _, loose_logits = _greedy(model, torch.tensor([tokens[:steps]]), loose, 0)
    assert not torch.allclose(loose_logits[-1], logits[steps], atol=1e-3)


@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES)
def test_all_sliding_prefill_longer_than_the_window_is_refused_clearly(arch):
    model = cached_tiny_model(arch, "sdpa")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, KnormPress(ratio=0.5)):
        with pytest.raises(ValueError, match=r"the prefill has 80 tokens, more than the sliding window \(64\)"):
            model(random_ids(80, seed=14), **{CACHE_KWARG: cache})
    assert all(type(layer).__name__ == "DynamicSlidingWindowLayer" and layer.get_seq_length() == 0
               for layer in cache.layers)  # refused before anything was stored
    with torch.no_grad(), press(model, KnormPress(ratio=0.0)):  # ratio 0 compresses nothing: any length works
        model(random_ids(80, seed=14), **{CACHE_KWARG: DynamicCache(config=model.config)})


def test_all_sliding_limits_raise_clear_errors():
    """Outside the block, per-head budgets, quantized caches: each a clear error, never a silent wrong result."""
    from transformers import QuantizedCache

    model = cached_tiny_model("mistral_sliding", "sdpa")
    ids = random_ids(30, seed=15)
    cache = prefill(model, ids, KnormPress(ratio=0.5))
    with torch.no_grad(), pytest.raises(ValueError, match="sliding window.*press\\(model, p\\).*kvpress_like_sdpa"):
        model(random_ids(1, seed=16), **{CACHE_KWARG: cache})  # plain sdpa outside the block
    with torch.no_grad(), press(model, KnormPress(ratio=0.5)):  # inside a block the same cache works
        model(random_ids(1, seed=16), **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="per-head budgets .* not supported on sliding-window layers"):
        prefill(model, ids, KnormPress(ratio=0.5, allocator="head_adaptive"))
    with pytest.raises(ValueError, match="only supported for models with only full attention layers"):
        QuantizedCache(backend="fp8", config=model.config)  # transformers refuses it itself


def test_all_sliding_chunked_prefill_decoding_press_and_saved_cache(tmp_path):
    """The other paths that build compressed layers keep them sliding: chunked prefill (one chunk = one-shot),
    decoding-time compression, and a saved then loaded cache continues exactly like the original."""
    from kvpress_like import DecodingPress, chunked_prefill, load_cache, save_cache

    model = cached_tiny_model("mistral_sliding", "sdpa")
    ids = random_ids(40, seed=17)
    one_shot = prefill(model, ids, KnormPress(ratio=0.5))
    chunked = chunked_prefill(model, KnormPress(ratio=0.5), ids, chunk_size=64)
    for a, b in zip(one_shot.layers, chunked.layers, strict=True):
        assert isinstance(b, SlidingCompressedLayer)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)
    in_chunks = chunked_prefill(model, KnormPress(ratio=0.5), ids, chunk_size=16)
    assert all(isinstance(layer, SlidingCompressedLayer) and layer.keys.shape[2] == 20 for layer in in_chunks.layers)

    with torch.no_grad(), press(model, DecodingPress(scorer=KnormPress(), target=16, interval=8)):
        out = model.generate(ids, do_sample=False, max_new_tokens=40, return_dict_in_generate=True)
    for layer in out.past_key_values.layers:
        assert isinstance(layer, SlidingCompressedLayer) and 16 <= layer.keys.shape[2] < 24
        assert bool((layer.positions < 40 + 39).all())

    save_cache(tmp_path / "c.kvp", one_shot, model, ids, KnormPress(ratio=0.5))
    loaded, _, _ = load_cache(tmp_path / "c.kvp", model)
    assert all(isinstance(layer, SlidingCompressedLayer) for layer in loaded.layers)
    with torch.no_grad(), press(model, KnormPress(ratio=0.5)):
        cont = random_ids(30, seed=18)  # 40 + 30 tokens: past the window
        expected = model(cont, **{CACHE_KWARG: one_shot}).logits
        got = model(cont, **{CACHE_KWARG: loaded}).logits
    assert torch.equal(expected, got)
