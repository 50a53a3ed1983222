"""CompressedLayer: logical vs physical length, masks, crop, batch reshuffles, bytes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import cached_tiny_model, full_attention_layers, random_ids, torch_threads
from transformers import DynamicCache

from kvpress_like import CompressedLayer, KnormPress, cache_bytes, press
from kvpress_like.cache import CACHE_KWARG

B, H, D = 3, 2, 4


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def make_layer(p=5, logical=12, valid=None, seed=0) -> CompressedLayer:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, p, D, generator=generator)
    values = torch.randn(B, H, p, D, generator=generator)
    if valid is None:
        valid = torch.ones(B, p, dtype=torch.bool)
    return CompressedLayer(keys, values, valid, logical)


def ragged_valid(p=5) -> torch.Tensor:
    """Row 0 uses every slot, row 1 all but the last, row 2 only the first two."""
    valid = torch.ones(B, p, dtype=torch.bool)
    valid[1, -1] = False
    valid[2, 2:] = False
    return valid


# -- construction ------------------------------------------------------------------------------------------------------
def test_constructor_validates_shapes():
    keys = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError):
        CompressedLayer(keys, torch.zeros(1, 2, 4, 4), torch.ones(1, 3, dtype=torch.bool), 5)
    with pytest.raises(ValueError):
        CompressedLayer(keys[0], keys[0], torch.ones(1, 3, dtype=torch.bool), 5)
    with pytest.raises(ValueError, match="valid"):
        CompressedLayer(keys, keys, torch.ones(1, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="valid"):
        CompressedLayer(keys, keys, torch.ones(1, 4, dtype=torch.bool), 5)


def test_lengths():
    layer = make_layer(p=5, logical=12)
    assert layer.get_seq_length() == 12
    assert layer.physical_length == 5
    assert layer.compressed_length == 5
    assert layer.is_initialized


# -- update ------------------------------------------------------------------------------------------------------------
def test_update_appends_and_grows_logical_length():
    layer = make_layer(p=5, logical=12, valid=ragged_valid())
    old_keys, old_values = layer.keys.clone(), layer.values.clone()
    new_k, new_v = torch.randn(B, H, 2, D), torch.randn(B, H, 2, D)
    keys, values = layer.update(new_k, new_v)
    assert keys.shape == values.shape == (B, H, 7, D)
    assert torch.equal(keys[:, :, :5], old_keys) and torch.equal(keys[:, :, 5:], new_k)
    assert torch.equal(values[:, :, :5], old_values) and torch.equal(values[:, :, 5:], new_v)
    assert keys is layer.keys and values is layer.values
    assert layer.get_seq_length() == 14
    assert layer.physical_length == 7
    assert layer.compressed_length == 5
    assert torch.equal(layer.valid, torch.cat([ragged_valid(), torch.ones(B, 2, dtype=torch.bool)], dim=1))
    layer.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    assert layer.get_seq_length() == 15 and layer.physical_length == 8 and layer.valid.shape == (B, 8)


def test_appended_tokens_are_written_into_reserved_room(monkeypatch):
    """Decoding steps write into room reserved after the stored entries (no copy of the layer per step) and give what
    ``torch.cat`` would, through crops, a reset storage (batch reordering) and running out of room."""
    monkeypatch.setattr(CompressedLayer, "APPEND_RESERVE", 3)
    layer = make_layer(p=5, logical=12)
    want_k, want_v = layer.keys.clone(), layer.values.clone()
    starts = set()
    for step, q in enumerate([1, 1, 1, 1, 3, 1]):
        if step == 3:
            layer.crop(-2)
            want_k, want_v = want_k[:, :, :-2], want_v[:, :, :-2]
        if step == 5:
            layer.reorder_cache(torch.tensor([2, 0, 1]))
            want_k, want_v = want_k[[2, 0, 1]], want_v[[2, 0, 1]]
        new_k, new_v = torch.randn(B, H, q, D), torch.randn(B, H, q, D)
        keys, values = layer.update(new_k, new_v)
        want_k, want_v = torch.cat([want_k, new_k], 2), torch.cat([want_v, new_v], 2)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        starts.add(keys.data_ptr())
    # storages: the first append's (room for 5 + 1 + 3), filled in place until 3 more tokens do not fit, and the one
    # after reordering
    assert len(starts) == 3


def test_update_uses_pending_valid_once():
    layer = make_layer(p=3, logical=3)
    layer.pending_valid = torch.tensor([[True, True], [False, True], [True, False]])
    layer.update(torch.randn(B, H, 2, D), torch.randn(B, H, 2, D))
    assert layer.valid[:, 3:].tolist() == [[True, True], [False, True], [True, False]]
    assert layer.pending_valid is None
    layer.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    assert layer.valid[:, 5].all()


# -- masks -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, logical, q", [(5, 12, 1), (5, 12, 4), (7, 7, 2), (1, 40, 3)])
def test_get_mask_sizes(p, logical, q):
    layer = make_layer(p=p, logical=logical)
    kv_length, kv_offset = layer.get_mask_sizes(q)
    assert kv_length == p + q  # what is physically attended to: stored entries plus the new tokens
    assert kv_offset == logical - p  # new token i sits at logical position logical + i = kv_offset + (p + i)
    assert kv_offset + kv_length == logical + q


def test_attention_mask_none_when_nothing_to_hide():
    layer = make_layer()
    assert layer.attention_mask(None, 1, None) is None
    assert layer.attention_mask(None, 1, torch.float32) is None


@pytest.mark.parametrize("q", [1, 3])
def test_attention_mask_bool_without_incoming(q):
    valid = ragged_valid()
    layer = make_layer(valid=valid)
    mask = layer.attention_mask(None, q, None)
    assert mask.dtype == torch.bool and mask.shape == (B, 1, q, 5 + q)
    for row in range(B):
        for i in range(q):
            assert mask[row, 0, i, :5].tolist() == valid[row].tolist()
            assert mask[row, 0, i, 5:].tolist() == [j <= i for j in range(q)]  # causal among new tokens


def test_attention_mask_float_without_incoming():
    valid = ragged_valid()
    layer = make_layer(valid=valid)
    mask = layer.attention_mask(None, 2, torch.float32)
    assert mask.dtype == torch.float32 and mask.shape == (B, 1, 2, 7)
    expected = layer.attention_mask(None, 2, None)
    assert torch.equal(mask == 0, expected)
    assert bool((mask[~expected] == torch.finfo(torch.float32).min).all())
    half = layer.attention_mask(None, 2, torch.float16)
    assert half.dtype == torch.float16 and bool((half[~expected] == torch.finfo(torch.float16).min).all())


def test_attention_mask_keeps_incoming_new_token_columns_bool():
    valid = ragged_valid()
    layer = make_layer(valid=valid)
    q, kv = 2, 9  # an incoming mask as transformers built it: [B, 1, q, kv], only its last q columns matter
    incoming = torch.zeros(B, 1, q, kv, dtype=torch.bool)
    incoming[..., -q:] = torch.tensor([[True, False], [True, True]])
    incoming[1, ..., -q] = False  # row 1: the first new token is padding
    mask = layer.attention_mask(incoming, q, None)
    assert mask.dtype == torch.bool and mask.shape == (B, 1, q, 5 + q)
    assert torch.equal(mask[..., 5:], incoming[..., -q:])
    assert torch.equal(mask[..., :5], valid[:, None, None, :].expand(B, 1, q, 5))


def test_attention_mask_keeps_incoming_new_token_columns_float():
    valid = ragged_valid()
    layer = make_layer(valid=valid)
    q, kv = 2, 7
    neg = torch.finfo(torch.float64).min
    incoming = torch.full((B, 1, q, kv), neg, dtype=torch.float64)
    incoming[..., -q:] = torch.tensor([[0.0, neg], [0.0, 0.0]], dtype=torch.float64)
    mask = layer.attention_mask(incoming, q, None)
    assert mask.dtype == torch.float64 and mask.shape == (B, 1, q, 5 + q)
    assert torch.equal(mask[..., 5:], incoming[..., -q:])
    past = mask[..., :5]
    assert torch.equal(past == 0, valid[:, None, None, :].expand(B, 1, q, 5))
    assert bool((past[past != 0] == neg).all())


# -- crop --------------------------------------------------------------------------------------------------------------
def test_crop_appended_tokens():
    layer = make_layer(p=5, logical=12, valid=ragged_valid())
    before_keys = layer.keys.clone()
    layer.update(torch.randn(B, H, 3, D), torch.randn(B, H, 3, D))
    layer.crop(0)
    assert layer.physical_length == 8 and layer.get_seq_length() == 15
    layer.crop(-2)
    assert layer.physical_length == 6 and layer.get_seq_length() == 13
    assert layer.values.shape[2] == 6 and layer.valid.shape == (B, 6)
    layer.crop(-1)
    assert torch.equal(layer.keys, before_keys)
    assert torch.equal(layer.valid, ragged_valid())
    assert layer.get_seq_length() == 12


def test_crop_into_compressed_part_raises():
    layer = make_layer(p=5, logical=12)
    layer.update(torch.randn(B, H, 2, D), torch.randn(B, H, 2, D))
    with pytest.raises(ValueError, match="compressed"):
        layer.crop(-3)
    assert layer.physical_length == 7 and layer.get_seq_length() == 14  # unchanged by the failed crop
    with pytest.raises(ValueError):
        layer.crop(3)  # positive counts are not a number of tokens to remove
    fresh = make_layer(p=5, logical=12)
    with pytest.raises(ValueError, match="compressed"):
        fresh.crop(-1)


def test_cache_crop_then_redecode_gives_same_logits():
    """Cropping appended tokens of a compressed cache (what assisted decoding does) and re-feeding them is exact."""
    model = cached_tiny_model("llama", "eager")
    ids, extra = random_ids(24, seed=61), random_ids(3, seed=62)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, KnormPress(ratio=0.5)):
        model(ids, **{CACHE_KWARG: cache})
        first = model(extra, **{CACHE_KWARG: cache}).logits
        cache.crop(-3)
        assert cache.get_seq_length() == 24
        assert all(layer.physical_length == 12 for layer in cache.layers)
        again = model(extra, **{CACHE_KWARG: cache}).logits
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)


# -- batch reshuffles keep `valid` aligned with the rows ---------------------------------------------------------------
def row_signature(layer: CompressedLayer):
    return [(layer.keys[row, 0, 0, 0].item(), layer.valid[row].tolist()) for row in range(layer.keys.shape[0])]


def test_batch_select_indices_keeps_valid_consistent():
    layer = make_layer(valid=ragged_valid())
    original = row_signature(layer)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert layer.keys.shape[0] == layer.values.shape[0] == layer.valid.shape[0] == 2
    assert row_signature(layer) == [original[2], original[0]]
    assert layer.get_seq_length() == 12


def test_batch_repeat_interleave_keeps_valid_consistent():
    layer = make_layer(valid=ragged_valid())
    original = row_signature(layer)
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == layer.values.shape[0] == layer.valid.shape[0] == 2 * B
    assert row_signature(layer) == [sig for sig in original for _ in range(2)]
    # and new tokens still line up with every row afterwards
    layer.update(torch.randn(2 * B, H, 1, D), torch.randn(2 * B, H, 1, D))
    assert layer.valid.shape == (2 * B, 6)


def test_reorder_cache_keeps_valid_consistent():
    layer = make_layer(valid=ragged_valid())
    original = row_signature(layer)
    layer.reorder_cache(torch.tensor([1, 1, 2]))
    assert row_signature(layer) == [original[1], original[1], original[2]]


# -- bytes -------------------------------------------------------------------------------------------------------------
def test_nbytes_counts_keys_values_and_valid():
    layer = make_layer(p=5)
    assert layer.nbytes() == 2 * B * H * 5 * D * 4 + B * 5
    layer.update(torch.randn(B, H, 2, D), torch.randn(B, H, 2, D))  # reserves room for APPEND_RESERVE more tokens
    assert layer.nbytes() == 2 * B * H * (7 + CompressedLayer.APPEND_RESERVE) * D * 4 + B * 7
    cache = DynamicCache()
    cache.layers = [layer]
    assert cache_bytes(cache) == layer.nbytes()


def test_cache_bytes_of_real_compressed_cache():
    model = cached_tiny_model("gemma3", "sdpa")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, KnormPress(ratio=0.75)):
        model(random_ids(32, seed=63), **{CACHE_KWARG: cache})
    compressible = full_attention_layers(model.config)
    total = 0
    for idx, layer in enumerate(cache.layers):
        size = layer.keys.numel() * 4 + layer.values.numel() * 4
        if idx in compressible:
            assert layer.keys.shape[2] == 8
            size += layer.valid.numel()
        total += size
    assert cache_bytes(cache) == total


# -- reset -------------------------------------------------------------------------------------------------------------
def test_reset_empties_the_layer():
    layer = make_layer()
    layer.reset()
    assert layer.get_seq_length() == 0


def test_reset_layer_answers_mask_queries_like_an_empty_layer():
    layer = make_layer()
    layer.reset()
    assert layer.get_mask_sizes(4) == (4, 0)


def test_cache_reset_then_reuse_under_press():
    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(20, seed=64)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, KnormPress(ratio=0.5)):
        first = model(ids, **{CACHE_KWARG: cache}).logits
        cache.reset()
        assert cache.get_seq_length() == 0
        second = model(ids, **{CACHE_KWARG: cache}).logits
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    assert cache.get_seq_length() == 20
    assert all(layer.keys.shape[2] == 10 for layer in cache.layers)


@pytest.mark.parametrize("allocator", ["uniform", "head_adaptive"])
@pytest.mark.parametrize("decoded", [False, True], ids=["after_prefill", "after_decoding"])
def test_cache_reset_then_reuse_without_press_equals_a_fresh_cache(allocator, decoded):
    """A reset compressed cache used after the ``with`` block grows like a fresh cache (it raised IndexError)."""
    model = cached_tiny_model("llama", "sdpa", initializer_range=0.2)
    ids = random_ids(20, seed=65)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model, KnormPress(ratio=0.5, allocator=allocator)):
            model(ids, **{CACHE_KWARG: cache})
            if decoded:
                model(ids[:, :1], **{CACHE_KWARG: cache})
        cache.reset()
        fresh = DynamicCache(config=model.config)
        for step in (ids, ids[:, :1], ids[:, 1:3]):
            torch.testing.assert_close(model(step, **{CACHE_KWARG: cache}).logits,
                                       model(step, **{CACHE_KWARG: fresh}).logits, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == fresh.get_seq_length() == 23
