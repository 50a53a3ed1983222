"""Storage layers carry their own capabilities (kvpress_like.cache): what every compressed layer class declares is
what it does, and the callers that use it (kept fraction, save/load, batch stacking) need nothing else.

Kinds: dense (uniform allocator), ragged per-head (head_adaptive), sliding-window (every layer sliding), quantized
(fp8 QuantizedCache).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import cached_tiny_model, random_ids
from transformers import DynamicCache, QuantizedCache

import kvpress_like
from kvpress_like import KnormPress
from kvpress_like.allocators import keep_count
from kvpress_like.cache import (
    CACHE_KWARG,
    RECORD_CLASSES,
    CompressedLayer,
    QuantizedCompressedLayer,
    RaggedLayer,
    SlidingCompressedLayer,
    kept_fraction,
)

S, RATIO, DECODED = 40, 0.5, 3
KINDS = {  # kind -> (model arguments, allocator, cache factory, layer class)
    "dense": (dict(arch="llama"), "uniform", None, CompressedLayer),
    "ragged": (dict(arch="llama"), "head_adaptive", None, RaggedLayer),
    "sliding": (dict(arch="mistral_sliding"), "uniform", None, SlidingCompressedLayer),
    "quantized": (dict(arch="llama"), "uniform", "fp8", QuantizedCompressedLayer),
}


def compressed(kind: str, decoded: int = DECODED):
    """``(model, cache)``: ``S`` tokens prefilled under knorm at ``RATIO``, then ``decoded`` tokens appended."""
    model_args, allocator, backend, _ = KINDS[kind]
    model = cached_tiny_model(**model_args)
    cache = DynamicCache(config=model.config) if backend is None else QuantizedCache(backend=backend,
                                                                                        config=model.config)
    with torch.no_grad(), kvpress_like.press(model, KnormPress(ratio=RATIO, allocator=allocator)):
        model(input_ids=random_ids(S, seed=5), **{CACHE_KWARG: cache}, use_cache=True)
        for step in range(decoded):
            model(input_ids=torch.tensor([[7 + step]]), **{CACHE_KWARG: cache}, use_cache=True)
    return model, cache


@pytest.mark.parametrize("kind", list(KINDS))
def test_kept_entries_counts_the_compressed_context_only(kind):
    """Naive count: one row of ``S`` real tokens keeps ``keep_count(S, RATIO)`` entries per KV head on average (the
    budget convention), whatever the storage; tokens appended afterwards count in neither number."""
    model, cache = compressed(kind)
    heads = model.config.num_key_value_heads
    layers = [layer for layer in cache.layers if hasattr(layer, "kept_entries")]
    assert layers and all(isinstance(layer, KINDS[kind][3]) for layer in layers)
    for layer in layers:
        assert layer.get_seq_length() == S + DECODED
        assert layer.kept_entries() == (heads * keep_count(S, RATIO), heads * S)
    assert kept_fraction(cache) == pytest.approx(keep_count(S, RATIO) / S)


@pytest.mark.parametrize("kind", ["dense", "ragged", "sliding"])
def test_record_round_trip_gives_the_same_layer(kind):
    """``from_record(to_record())`` rebuilds a layer holding the same tensors and lengths, which the next forward
    attends to exactly as the original."""
    model, cache = compressed(kind)
    copy = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if hasattr(layer, "to_record"):
            record = layer.to_record()
            assert record["kind"] == type(layer).RECORD_KIND and RECORD_CLASSES[record["kind"]] is type(layer)
            assert set(type(layer).RECORD_TENSORS) <= set(record)
            type(layer).check_record(record, 1, model.config.num_key_value_heads, layer_head_dim(model), S + DECODED)
            rebuilt = type(layer).from_record({k: v.clone() if torch.is_tensor(v) else v for k, v in record.items()})
            for name, value in record.items():
                again = rebuilt.to_record()[name]
                assert torch.equal(again, value) if torch.is_tensor(value) else again == value
            copy.layers[i] = rebuilt
        else:
            copy.layers[i] = layer
    ids = torch.tensor([[11]])
    with torch.no_grad(), kvpress_like.press(model, KnormPress(ratio=RATIO)):
        a = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True).logits
        b = model(input_ids=ids, **{CACHE_KWARG: copy}, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def layer_head_dim(model) -> int:
    return getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads


def test_check_record_names_the_field():
    _, cache = compressed("dense")
    record = dict(cache.layers[0].to_record())
    record["valid"] = record["valid"].long()
    with pytest.raises(ValueError, match=r"^valid: must be bool \[1, "):
        CompressedLayer.check_record(record, 1, record["keys"].shape[1], record["keys"].shape[3], S + DECODED)


@pytest.mark.parametrize("kind, croppable, reorderable, per_head", [
    ("dense", True, True, False),
    ("ragged", True, False, True),
    ("sliding", True, True, False),
    ("quantized", False, False, False),
])
def test_flags_say_what_the_layer_does(kind, croppable, reorderable, per_head):
    _, cache = compressed(kind)
    layer = next(layer for layer in cache.layers if hasattr(layer, "kept_entries"))
    assert (layer.is_croppable, layer.is_reorderable, layer.per_head) == (croppable, reorderable, per_head)
    if croppable:
        layer.crop(-1)
        assert layer.get_seq_length() == S + DECODED - 1
    else:
        with pytest.raises(NotImplementedError):
            layer.crop(-1)
    if reorderable:
        layer.reorder_cache(torch.tensor([0]))
    else:
        with pytest.raises(NotImplementedError):
            layer.reorder_cache(torch.tensor([0]))
    assert (layer.recompress_problem is None) == (kind in ("dense", "sliding"))


def test_a_new_storage_kind_saves_and_loads_through_record_classes(tmp_path, monkeypatch):
    """A layer class with its own RECORD_KIND, added to RECORD_CLASSES, is saved and loaded by save_cache/load_cache
    without any change to them."""

    class TaggedLayer(CompressedLayer):
        RECORD_KIND = "tagged"

    monkeypatch.setitem(RECORD_CLASSES, "tagged", TaggedLayer)
    model, cache = compressed("dense", decoded=0)
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = TaggedLayer.from_record(layer.to_record())
    path = tmp_path / "tagged.kvc"
    kvpress_like.save_cache(path, cache, model, random_ids(S, seed=5))
    loaded, _, _ = kvpress_like.load_cache(path, model)
    assert all(type(layer) is TaggedLayer for layer in loaded.layers)
    for a, b in zip(cache.layers, loaded.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.valid, b.valid)


def test_stack_rows_stacks_only_what_it_can():
    _, a = compressed("dense", decoded=0)
    _, b = compressed("dense", decoded=0)
    layers = [a.layers[0], b.layers[0]]
    assert layers[0].row_stack_key() == layers[1].row_stack_key() is not None
    stacked = CompressedLayer.stack_rows(layers)
    assert stacked.keys.shape[0] == 2 and torch.equal(stacked.keys[1:], b.layers[0].keys)
    assert stacked.kept_entries() == (2 * a.layers[0].kept_entries()[0], 2 * a.layers[0].kept_entries()[1])
    _, sliding = compressed("sliding", decoded=0)
    assert sliding.layers[0].row_stack_key() is None  # more state (positions): never stacked
    with pytest.raises(ValueError, match="stack_rows takes one-row dense"):
        CompressedLayer.stack_rows([a.layers[0], sliding.layers[0]])
