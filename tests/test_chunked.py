"""Chunked prefill with compression: one chunk equals one-shot, memory stays within budget + chunk, decoding
continues at the right positions, unsupported presses are refused."""

import pytest
import torch
from tiny_models import ARCHITECTURES, cached_tiny_model, full_attention_layers, prefill, random_ids
from transformers import DynamicCache

from kvpress_like import create_press
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG, CompressedLayer
from kvpress_like.chunked import chunked_prefill

PRESSES = ("knorm", "snapkv", "compactor", "leverage", "cur", "expected_attention", "streaming_llm")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", PRESSES)
def test_a_single_chunk_is_one_shot_compression(arch, name):
    model = cached_tiny_model(arch, "sdpa", perturb_norms=True)
    ids = random_ids(90, seed=3)
    p = create_press(name, ratio=0.6)
    one_shot = prefill(model, ids, p)
    chunked = chunked_prefill(model, p, ids, chunk_size=90)
    for idx in full_attention_layers(model.config):
        assert torch.equal(chunked.layers[idx].keys, one_shot.layers[idx].keys)
        assert torch.equal(chunked.layers[idx].values, one_shot.layers[idx].values)


@pytest.mark.parametrize("chunk_size", [7, 16, 50])
@pytest.mark.parametrize("name", ["knorm", "compactor", "snapkv"])
def test_cache_never_exceeds_running_budget_plus_chunk(name, chunk_size):
    model = cached_tiny_model("llama", "sdpa")
    n, ratio = 120, 0.75
    p = create_press(name, ratio=ratio, **({"window": 4} if name == "snapkv" else {}))
    sizes = []  # (tokens seen, stored entries) of layer 0 after each chunk, read before the next chunk's forward

    def record(module, args, kwargs):
        layer = kwargs[CACHE_KWARG].layers[0] if kwargs[CACHE_KWARG].layers else None
        if layer is not None and layer.get_seq_length():
            sizes.append((layer.get_seq_length(), layer.keys.shape[2]))

    handle = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        cache = chunked_prefill(model, p, random_ids(n, seed=4), chunk_size=chunk_size)
    finally:
        handle.remove()
    assert len(sizes) == -(-n // chunk_size) - 1
    for seen, stored in sizes:
        assert seen % chunk_size == 0
        protected = min(seen, p.n_sink + p.window)
        assert stored == max(keep_count(seen, ratio), protected)  # cut back to the running budget after each chunk
    for idx in full_attention_layers(model.config):
        layer = cache.layers[idx]
        assert isinstance(layer, CompressedLayer)
        assert layer.keys.shape[2] == max(keep_count(n, ratio), p.n_sink + p.window)
        assert layer.get_seq_length() == n


def test_sinks_and_final_window_are_kept():
    model = cached_tiny_model("qwen3", "sdpa", perturb_norms=True)
    n = 100
    ids = random_ids(n, seed=6)
    p = create_press("knorm", ratio=0.8, n_sink=3, window=5)
    full = prefill(model, ids)
    cache = chunked_prefill(model, p, ids, chunk_size=13)
    idx = full_attention_layers(model.config)[0]  # first layer: its keys do not depend on earlier compression
    kept = cache.layers[idx].keys[0]  # [H, P, D]
    reference = full.layers[idx].keys[0]  # [H, S, D]
    for h in range(kept.shape[0]):
        positions = torch.cdist(kept[h], reference[h]).argmin(-1).tolist()  # where each kept key came from
        assert positions == sorted(set(positions))
        assert set(range(3)) | set(range(n - 5, n)) <= set(positions)
        assert len(positions) == max(keep_count(n, 0.8), 8)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_ratio_zero_gives_the_full_cache_and_same_next_tokens(arch):
    model = cached_tiny_model(arch, "sdpa")
    ids = random_ids(60, seed=8)
    p = create_press("knorm", ratio=0.0)
    cache = chunked_prefill(model, p, ids, chunk_size=16)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        expected = model(ids, **{CACHE_KWARG: full}).logits[:, -1]
        step = torch.tensor([[3]])
        got = model(step, **{CACHE_KWARG: cache}).logits[:, -1]
        ref = model(step, **{CACHE_KWARG: full}).logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert expected.shape == got.shape


def test_decoding_after_chunked_prefill_uses_logical_positions():
    """Decoding after chunked prefill equals decoding on a cache that holds exactly the kept entries."""
    model = cached_tiny_model("llama", "sdpa")
    n = 80
    ids = random_ids(n, seed=9)
    p = create_press("knorm", ratio=0.5)
    cache = chunked_prefill(model, p, ids, chunk_size=20)
    step = torch.tensor([[7]])
    # the same kept entries in a plain cache layer, positions given explicitly
    plain = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        plain.update(layer.keys.clone(), layer.values.clone(), idx)
    with torch.no_grad():
        got = model(step, **{CACHE_KWARG: cache}).logits
        ref = model(step, **{CACHE_KWARG: plain}, position_ids=torch.tensor([[n]])).logits
        wrong = model(step, **{CACHE_KWARG: DynamicCache(config=model.config)}).logits
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, wrong)


def test_refuses_what_it_does_not_support():
    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(40, seed=1)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(model, create_press("knorm", ratio=0.5), ids, chunk_size=0)
    with pytest.raises(ValueError, match="uniform allocator"):
        chunked_prefill(model, create_press("knorm", ratio=0.5, allocator="head_adaptive"), ids, chunk_size=8)
    with pytest.raises(ValueError, match="uniform allocator"):
        chunked_prefill(model, create_press("chunkkv", ratio=0.5), ids, chunk_size=8)
    with pytest.raises(ValueError, match="input_ids"):
        chunked_prefill(model, create_press("knorm", ratio=0.5), ids[0], chunk_size=8)
    with pytest.raises(TypeError, match="Press"):
        chunked_prefill(model, "knorm", ids, chunk_size=8)
    cache = prefill(model, ids)
    with pytest.raises(ValueError, match="empty cache"):
        chunked_prefill(model, create_press("knorm", ratio=0.5), ids, chunk_size=8, cache=cache)
