"""Ragged per-head storage (head-adaptive budgets) and the memory accounting of compressed caches.

The key test proves that decoding over a :class:`RaggedLayer` is exactly attention over the *full* cache with the
evicted (layer, KV head, token) entries masked out: the reference is built here without the package, from an
uncompressed prefill, a per-layer per-head additive mask injected into each attention module of an eager copy of
the model, and explicit logical positions (fp32, within 1e-5); and in fp64 with sdpa on both sides, within 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import cached_tiny_model, full_attention_layers, left_pad, random_ids, tiny_model, torch_threads
from transformers import DynamicCache

from kvpress_like import (
    CompactorPress,
    CompressedLayer,
    PerLayerAllocator,
    RaggedLayer,
    SnapKVPress,
    cache_bytes,
    press,
)
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG, build_mask, cache_in
from kvpress_like.plugins.builtin import ALLOCATORS
from kvpress_like.press import select_top, store, store_ragged

BUILTIN = sorted(cls.name for cls in ALLOCATORS)  # not list_allocators(): third-party plugins have other budgets
INIT = dict(initializer_range=0.2)  # sharper attention: well separated scores
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def kv_shape(model) -> tuple[int, int, int]:
    """``(H_kv, groups, head_dim)`` of a model."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads, head_dim


def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


# =====================================================================================================================
# (b) THE key test: ragged decoding == full-cache attention with exactly the evicted entries masked
# =====================================================================================================================


def kept_from_layer(layer, full_keys: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]`` bool: which prefill entries a compressed layer holds, found by matching its stored keys against
    the full cache's keys ``[B, H, S, D]`` of the same prefill without a press (the stored keys are gathered copies,
    bit for bit, so each matches exactly one)."""
    b, h, s, _ = full_keys.shape
    kept = torch.zeros(b, h, s, dtype=torch.bool)
    if isinstance(layer, RaggedLayer):
        segments = layer.flat_keys.split(layer.lengths.flatten().tolist())
        stored = {(row, head): segments[row * h + head] for row in range(b) for head in range(h)}
    else:
        assert isinstance(layer, CompressedLayer)
        part = slice(0, layer.compressed_length)
        stored = {(row, head): layer.keys[row, head, part][layer.valid[row, part]]
                  for row in range(b) for head in range(h)}
    for (row, head), keys in stored.items():
        if keys.shape[0] == 0:
            continue
        equal = (keys[:, None, :] == full_keys[row, head][None]).all(-1)  # [kept, S]
        assert bool((equal.sum(-1) == 1).all()), "every stored key must be exactly one of the prefill's keys"
        tokens = equal.float().argmax(-1)
        assert tokens.tolist() == sorted(set(tokens.tolist())), "kept entries must be distinct and in token order"
        kept[row, head, tokens] = True
    return kept


class MaskedFullAttention:
    """Forward pre-hooks on every attention module of ``ref_model`` (eager or sdpa): a single-token forward over the
    full cache gets a 4D additive mask ``[B, H_q, 1, S + t + 1]`` specific to its layer, hiding exactly that layer's
    evicted entries per KV head (``~kept[l]`` ``[B, H_kv, S]``) and the prompt's padding; prefill forwards (more
    than one token) keep transformers' own causal mask. Use as a context manager."""

    def __init__(self, ref_model, kept: list[torch.Tensor], prompt_valid: torch.Tensor):
        self.model, self.kept, self.prompt_valid = ref_model, kept, prompt_valid
        self.groups = kv_shape(ref_model)[1]
        self.handles = []

    def _hook(self, idx: int):
        def hook(module, args, kwargs):
            if kwargs["hidden_states"].shape[1] != 1:
                return None
            s = self.prompt_valid.shape[1]
            seen = cache_in(kwargs).layers[idx].get_seq_length()  # S + t tokens before this one
            layer_kept = self.kept[idx]
            b, h, _ = layer_kept.shape
            appended = torch.ones(b, h, seen - s + 1, dtype=torch.bool)  # decoded tokens and the current one
            allowed = torch.cat([layer_kept & self.prompt_valid[:, None, :], appended], dim=-1)
            allowed = allowed.repeat_interleave(self.groups, dim=1)[:, :, None, :]  # [B, H_q, 1, S + t + 1]
            dtype = kwargs["hidden_states"].dtype
            kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype).masked_fill(
                ~allowed, torch.finfo(dtype).min)
            return args, kwargs

        return hook

    def __enter__(self):
        self.handles = [attn.register_forward_pre_hook(self._hook(idx), with_kwargs=True)
                        for idx, attn in enumerate(attention_modules(self.model))]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def reference_decode(ref_model, full_cache, kept: list[torch.Tensor], prompt_valid, tokens, start: int):
    """Logits ``[steps, B, V]`` of feeding ``tokens`` ``[B, steps]`` one by one to ``ref_model`` over the
    uncompressed ``full_cache`` with the evicted entries masked (:class:`MaskedFullAttention`), at the logical
    positions ``start + t``."""
    logits = []
    with MaskedFullAttention(ref_model, kept, prompt_valid):
        for step in range(tokens.shape[1]):
            positions = torch.full((tokens.shape[0], 1), start + step, dtype=torch.long)
            out = ref_model(tokens[:, step : step + 1], **{CACHE_KWARG: full_cache}, position_ids=positions)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


KEY_PRESSES = {
    "snapkv": lambda: SnapKVPress(ratio=0.6, window=4, allocator="head_adaptive"),
    "compactor": lambda: CompactorPress(ratio=0.6, window=4, n_sink=0, blending=0.3, leverage_kernel_size=1,
                                        allocator="head_adaptive"),  # parameters under which every model is ragged
}
STEPS = 6


def check_ragged_decoding(model, ref_model, p, atol: float) -> None:
    """Greedy decoding under ``p`` (manual loop and ``generate``, default positions) against masked full attention
    in ``ref_model`` (same weights), logits within ``atol`` at every step."""
    ids = random_ids(40, seed=13, distinct=True)  # a seed where both presses give ragged layers in every model
    s = ids.shape[1]

    # compressed run: manual loop with default positions
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        out = model(ids, **{CACHE_KWARG: cache})
        manual_logits, tokens = [out.logits[:, -1]], []
        for _ in range(STEPS):
            tokens.append(manual_logits[-1].argmax(-1, keepdim=True))
            manual_logits.append(model(tokens[-1], **{CACHE_KWARG: cache}).logits[:, -1])
    tokens = torch.cat(tokens, dim=1)  # [1, STEPS]
    ragged = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    assert ragged, "a head-adaptive press must produce at least one ragged layer"
    assert any(len(set(layer.lengths.flatten().tolist())) > 1 for layer in ragged), "heads keep equal counts"
    assert cache.get_seq_length() == s + STEPS

    # the reference: the full cache, the kept entries read back from the compressed cache, masked decoding
    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full_out = model(ids, **{CACHE_KWARG: full_cache})
    torch.testing.assert_close(manual_logits[0], full_out.logits[:, -1], rtol=0, atol=atol)  # prefill is uncompressed
    kept = [kept_from_layer(layer, full_cache.layers[idx].keys) for idx, layer in enumerate(cache.layers)]
    h_kv = kv_shape(model)[0]
    budget = keep_count(s, p.ratio)
    for layer_kept in kept:  # head-adaptive: the layer total is exact, the window is always kept
        assert int(layer_kept.sum()) == h_kv * budget
        assert bool(layer_kept[..., -p.window :].all())
    prompt_valid = torch.ones(1, s, dtype=torch.bool)
    with torch.no_grad():
        reference = reference_decode(ref_model, full_cache, kept, prompt_valid, tokens, start=s)
    for step in range(STEPS):
        torch.testing.assert_close(manual_logits[step + 1], reference[step], rtol=0, atol=atol,
                                   msg=lambda m, step=step: f"decode step {step}: {m}")

    # the masking matters: the same decode over the full, unmasked cache differs
    unmasked_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        ref_model(ids, **{CACHE_KWARG: unmasked_cache})
        unmasked = reference_decode(ref_model, unmasked_cache, [torch.ones_like(k) for k in kept], prompt_valid,
                                    tokens, start=s)
    assert float((unmasked - reference).abs().max()) > 1e-3

    # model.generate under the press: same tokens, same logits at every step
    with torch.no_grad(), press(model, p):
        generated = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert generated.sequences[:, s:].tolist() == tokens.tolist()
    gen_atol = max(atol, 1e-5)  # generate returns fp32 logits whatever the model's dtype
    torch.testing.assert_close(generated.logits[0], manual_logits[0].float(), rtol=0, atol=gen_atol)
    for step in range(1, STEPS):
        torch.testing.assert_close(generated.logits[step], reference[step - 1].float(), rtol=0, atol=gen_atol)


@pytest.mark.parametrize("press_name", sorted(KEY_PRESSES))
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "mistral"])
def test_ragged_decoding_equals_masked_full_attention(arch, impl, press_name):
    """fp32, reference in an eager copy of the model. fp32 noise is ~1e-5 on these models even without compression
    (incremental vs one-shot decoding), so the fp64 test below is the sharp one."""
    model = cached_tiny_model(arch, impl, **INIT)
    ref_model = cached_tiny_model(arch, "eager", **INIT)
    check_ragged_decoding(model, ref_model, KEY_PRESSES[press_name](), ATOL)


_FP64_MODELS: dict = {}


@pytest.mark.parametrize("press_name", sorted(KEY_PRESSES))
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "mistral"])
def test_ragged_decoding_equals_masked_full_attention_fp64(arch, press_name):
    """fp64 with sdpa on both sides (eager softmaxes in fp32 even for fp64 models): masking an entry and not storing
    it must agree to rounding, so even an entry with a tiny attention weight kept or dropped wrongly shows."""
    if arch not in _FP64_MODELS:
        _FP64_MODELS[arch] = tiny_model(arch, "sdpa", **INIT).double()
    model = _FP64_MODELS[arch]
    check_ragged_decoding(model, model, KEY_PRESSES[press_name](), 1e-12)


@pytest.mark.parametrize("impl, atol", [("sdpa", 1e-10), ("eager", 1e-5)])  # eager softmaxes in fp32
def test_multi_token_forward_on_ragged_cache_equals_token_by_token(impl, atol):
    """New tokens fed together attend to the kept entries of every head and causally to each other."""
    model = tiny_model("qwen3", impl, **INIT).double()
    p = SnapKVPress(ratio=0.6, window=4, allocator="head_adaptive")
    ids = random_ids(40, seed=13, distinct=True)
    new = torch.tensor([[7, 9, 11, 13]])
    results = []
    for chunked in (False, True):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model, p):
            model(ids, **{CACHE_KWARG: cache})
            assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
            if chunked:
                logits = model(new, **{CACHE_KWARG: cache}).logits
            else:
                logits = torch.cat([model(new[:, i : i + 1], **{CACHE_KWARG: cache}).logits for i in range(4)], 1)
        assert cache.get_seq_length() == 44
        results.append(logits)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=atol)


def test_gemma3_ragged_decoding_same_under_sdpa_and_eager():
    """Gemma3 (its own attention scale, sliding-window layers left uncompressed): decoding on ragged layers through
    the sdpa wrapper (flat storage, the scale it is passed) gives the logits of the eager path (padded view and
    per-head mask)."""
    ids = random_ids(40, seed=11)
    logits = {}
    for impl in ("sdpa", "eager"):
        model = cached_tiny_model("gemma3", impl, **INIT)
        cache = DynamicCache(config=model.config)
        steps = []
        with torch.no_grad(), press(model, KEY_PRESSES["compactor"]()):
            out = model(ids, **{CACHE_KWARG: cache})
            for _ in range(4):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, **{CACHE_KWARG: cache})
                steps.append(out.logits[:, -1])
        assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
        logits[impl] = torch.stack(steps)
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sdpa_decoding_attends_over_ragged_storage_without_the_padded_view(impl, monkeypatch):
    """With sdpa, a decoding step on a ragged layer never builds the padded view or the per-head mask (the
    registered kvpress_like_sdpa attention reads the flat storage); eager still uses them. The logits agree (the tests
    above check each against masked full attention)."""
    from kvpress_like.cache import RaggedLayer

    calls = {"view": 0, "mask": 0}
    padded, mask = RaggedLayer._padded, RaggedLayer.attended_mask  # (the mask asked after the update)

    def counted_padded(self):
        calls["view"] += 1
        return padded(self)

    def counted_mask(self, *args, **kwargs):
        calls["mask"] += 1
        return mask(self, *args, **kwargs)

    monkeypatch.setattr(RaggedLayer, "_padded", counted_padded)
    monkeypatch.setattr(RaggedLayer, "attended_mask", counted_mask)
    model = cached_tiny_model("llama", impl, **INIT)
    ids = random_ids(40, seed=5)
    with torch.no_grad(), press(model, KEY_PRESSES["snapkv"]()):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 43
    if impl == "sdpa":
        assert calls == {"view": 0, "mask": 0}
    else:  # once per ragged layer in each of the two forwards after the prefill
        assert calls["view"] == calls["mask"] > 0 and calls["view"] % 2 == 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_ragged_decoding_with_left_padding_equals_masked_full_attention(impl):
    """Rows of different lengths in one batch: padding is never kept and never attended."""
    model = cached_tiny_model("llama", impl, **INIT)
    ref_model = cached_tiny_model("llama", "eager", **INIT)
    p = SnapKVPress(ratio=0.6, window=4, allocator="head_adaptive")
    ids, mask = left_pad([random_ids(40, seed=21, distinct=True)[0], random_ids(27, seed=22, distinct=True)[0]])
    s = ids.shape[1]
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        out = model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
        logits, tokens = [out.logits[:, -1]], []
        for _ in range(STEPS):
            tokens.append(logits[-1].argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits.append(model(tokens[-1], attention_mask=mask, **{CACHE_KWARG: cache}).logits[:, -1])
    tokens = torch.cat(tokens, dim=1)
    assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)

    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask[:, :s], **{CACHE_KWARG: full_cache})
    prompt_valid = mask[:, :s].bool()
    kept = [kept_from_layer(layer, full_cache.layers[idx].keys) for idx, layer in enumerate(cache.layers)]
    h_kv = kv_shape(model)[0]
    for layer_kept in kept:
        assert not bool((layer_kept & ~prompt_valid[:, None, :]).any()), "a padding entry was kept"
        for row, n in enumerate(prompt_valid.sum(-1).tolist()):
            assert int(layer_kept[row].sum()) == h_kv * keep_count(n, p.ratio)
    with torch.no_grad():
        reference = reference_decode(ref_model, full_cache, kept, prompt_valid, tokens, start=s)
    for step in range(STEPS):
        torch.testing.assert_close(logits[step + 1], reference[step], rtol=0, atol=ATOL)

    # generate (which derives positions from the attention mask) against generate on the masked full cache
    ids_mask = mask[:, :s]
    kwargs = dict(attention_mask=ids_mask, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        with press(model, p):
            compressed = model.generate(ids, **kwargs)
        full = model.generate(ids, **kwargs)
        kept = [kept_from_layer(layer, full.past_key_values.layers[idx].keys[:, :, :s])
                for idx, layer in enumerate(compressed.past_key_values.layers)]
        with MaskedFullAttention(ref_model, kept, prompt_valid):
            masked = ref_model.generate(ids, **kwargs)
    assert torch.equal(compressed.sequences, masked.sequences)
    for step in range(STEPS):
        torch.testing.assert_close(compressed.logits[step], masked.logits[step], rtol=0, atol=ATOL)
    assert float((compressed.logits[1] - full.logits[1]).abs().max()) > 1e-3


# =====================================================================================================================
# (a) Memory accounting of real compressed caches, every allocator
# =====================================================================================================================


def make_press(allocator_name: str, num_layers: int):
    if allocator_name == "per_layer":
        allocator = PerLayerAllocator(ratios=[0.25, 0.5, 0.75, 0.6][:num_layers])
    else:
        allocator = allocator_name
    return SnapKVPress(ratio=0.5, window=4, allocator=allocator)


def expected_kept(p, allocator_name: str, n_real: int, layers: list[int], h: int) -> int:
    """Entries one row keeps over every compressible layer and KV head (window = protected tokens)."""
    n_prot = min(n_real, p.window)
    if allocator_name == "per_layer":
        return sum(h * max(keep_count(n_real, p._allocator.ratios[idx]), n_prot) for idx in layers)
    return len(layers) * h * max(keep_count(n_real, p.ratio), n_prot)


@pytest.mark.parametrize("allocator_name", BUILTIN)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_cache_bytes_of_every_allocator(arch, allocator_name):
    model = cached_tiny_model(arch, "sdpa", **INIT)
    h, _, d = kv_shape(model)
    p = make_press(allocator_name, model.config.num_hidden_layers)
    ids, mask = left_pad([random_ids(40, seed=31)[0], random_ids(29, seed=32)[0]])
    n_real = mask.sum(-1).tolist()
    b, s = ids.shape
    compressible = full_attention_layers(model.config)
    cache = DynamicCache(config=model.config)
    appended = 3
    with torch.no_grad(), press(model, p):
        model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
        for _ in range(appended):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            model(torch.full((b, 1), 5), attention_mask=mask, **{CACHE_KWARG: cache})

    element = 4  # fp32
    expected_bytes = 0
    kept_per_row = [0] * b
    for idx, layer in enumerate(cache.layers):
        if idx not in compressible:  # gemma3 sliding layer: plain keys and values
            assert not isinstance(layer, (CompressedLayer, RaggedLayer))
            expected_bytes += 2 * layer.keys.numel() * element
            continue
        if isinstance(layer, RaggedLayer):
            assert layer.flat_keys.shape == (int(layer.lengths.sum()), d)
            assert layer.tail_keys.shape == (b, h, appended, d)
            room = 1 + RaggedLayer.APPEND_RESERVE  # reserved per head at step 1, not used up
            entries = int(layer.lengths.sum()) + b * h * room
            metadata = b * h * 8 + b * room  # lengths [B, H] int64, tail validity [B, room] bool
            for row in range(b):
                kept_per_row[row] += int(layer.lengths[row].sum())
        else:
            assert isinstance(layer, CompressedLayer)
            per_row = layer.valid[:, : layer.compressed_length].sum(-1).tolist()
            physical = max(per_row) + appended  # no slot beyond the longest row's kept entries
            assert layer.keys.shape == (b, h, physical, d)
            entries = b * h * (physical + CompressedLayer.APPEND_RESERVE - appended + 1)  # room reserved at step 1
            metadata = b * physical  # valid [B, P] bool
            for row in range(b):
                kept_per_row[row] += h * per_row[row]
        expected_bytes += entries * d * 2 * element + metadata
    assert cache_bytes(cache) == expected_bytes
    assert kept_per_row == [expected_kept(p, allocator_name, n, compressible, h) for n in n_real]
    assert cache.get_seq_length() == s + appended


def test_head_adaptive_cache_is_smaller_than_full_cache():
    model = cached_tiny_model("llama", "sdpa", **INIT)
    ids = random_ids(48, seed=41)
    full, compressed = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: full})
        with press(model, SnapKVPress(ratio=0.75, window=4, allocator="head_adaptive")):
            model(ids, **{CACHE_KWARG: compressed})
    h, _, d = kv_shape(model)
    kept_entries = 3 * h * keep_count(48, 0.75)
    assert cache_bytes(full) == 3 * h * 48 * d * 2 * 4
    metadata = sum(layer.lengths.numel() * 8 if isinstance(layer, RaggedLayer) else layer.valid.numel()
                   for layer in compressed.layers)
    assert cache_bytes(compressed) == kept_entries * d * 2 * 4 + metadata


# =====================================================================================================================
# (c) RaggedLayer unit tests
# =====================================================================================================================

B, H, S, D = 2, 3, 10, 4
COUNTS = torch.tensor([[3, 5, 1], [4, 4, 2]])


def make_ragged(seed: int = 0):
    """A ragged layer from random keys/values ``[B, H, S, D]``; returns it with the kept indices per head."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, S, D, generator=generator)
    values = torch.randn(B, H, S, D, generator=generator)
    scores = torch.randn(B, H, S, generator=generator)
    indices, slot_valid = select_top(scores, COUNTS)
    layer = store(keys, values, indices, slot_valid)
    assert isinstance(layer, RaggedLayer)
    kept = {(b, h): indices[b, h, : COUNTS[b, h]].tolist() for b in range(B) for h in range(H)}
    return layer, keys, values, kept


def test_store_ragged_keeps_exactly_the_selected_entries_without_padding():
    layer, keys, values, kept = make_ragged()
    assert torch.equal(layer.lengths, COUNTS)
    assert layer.flat_keys.shape == (int(COUNTS.sum()), D)
    offset = 0
    for b in range(B):
        for h in range(H):
            n = int(COUNTS[b, h])
            assert torch.equal(layer.flat_keys[offset : offset + n], keys[b, h, kept[b, h]])
            assert torch.equal(layer.flat_values[offset : offset + n], values[b, h, kept[b, h]])
            offset += n
    assert layer.get_seq_length() == S
    assert layer.padded_length == 5 and layer.physical_length == 5


def test_store_uses_dense_layer_when_heads_agree():
    keys = torch.randn(B, H, S, D)
    indices, slot_valid = select_top(torch.randn(B, H, S), torch.tensor([[3, 3, 3], [2, 2, 2]]))
    assert isinstance(store(keys, keys, indices, slot_valid), CompressedLayer)
    assert isinstance(store_ragged(keys, keys, indices, slot_valid), RaggedLayer)


def test_constructor_validates_lengths():
    with pytest.raises(ValueError, match="lengths"):
        RaggedLayer(torch.zeros(5, D), torch.zeros(5, D), torch.tensor([[2, 2]]), S, (1, 2, S, D))
    with pytest.raises(ValueError, match="lengths"):
        RaggedLayer(torch.zeros(4, D), torch.zeros(4, D), torch.tensor([2, 2]), S, (1, 2, S, D))


def test_update_appends_to_every_head_and_returns_padded_view():
    layer, keys, values, kept = make_ragged()
    generator = torch.Generator().manual_seed(1)
    new_k, new_v = torch.randn(B, H, 2, D, generator=generator), torch.randn(B, H, 2, D, generator=generator)
    out_k, out_v = layer.update(new_k, new_v)
    l_max = int(COUNTS.max())
    assert out_k.shape == out_v.shape == (B, H, l_max + 2, D)
    for b in range(B):
        for h in range(H):
            n = int(COUNTS[b, h])
            assert torch.equal(out_k[b, h, :n], keys[b, h, kept[b, h]])
            assert torch.equal(out_v[b, h, :n], values[b, h, kept[b, h]])
            assert bool(torch.isfinite(out_k[b, h, n:l_max]).all()) and bool(torch.isfinite(out_v[b, h, n:l_max]).all())
    assert torch.equal(out_k[:, :, l_max:], new_k) and torch.equal(out_v[:, :, l_max:], new_v)
    # storage: the flat part is unchanged, the tail holds the appended tokens of every head
    assert torch.equal(layer.lengths, COUNTS) and layer.flat_keys.shape[0] == int(COUNTS.sum())
    assert torch.equal(layer.tail_keys, new_k) and torch.equal(layer.tail_values, new_v)
    assert layer.tail_valid.shape == (B, 2) and bool(layer.tail_valid.all())
    assert layer.get_seq_length() == S + 2
    assert layer.physical_length == l_max + 2
    assert layer.get_mask_sizes(1) == (l_max + 3, S + 2 - (l_max + 2))

    second_k = torch.randn(B, H, 1, D, generator=generator)
    out_k, _ = layer.update(second_k, second_k)
    assert out_k.shape[2] == l_max + 3 and torch.equal(out_k[:, :, -1:], second_k)
    assert layer.get_seq_length() == S + 3


def test_update_uses_pending_valid_once():
    layer, *_ = make_ragged()
    layer.pending_valid = torch.tensor([[True, False], [False, True]])
    layer.update(torch.zeros(B, H, 2, D), torch.zeros(B, H, 2, D))
    layer.update(torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D))
    assert layer.tail_valid.tolist() == [[True, False, True], [False, True, True]]
    assert layer.pending_valid is None


def test_crop_appended_tokens_and_refuse_compressed_part():
    layer, *_ = make_ragged()
    new = torch.randn(B, H, 3, D)
    layer.update(new, new)
    layer.crop(0)
    assert layer.get_seq_length() == S + 3
    layer.crop(-2)
    assert layer.get_seq_length() == S + 1
    assert torch.equal(layer.tail_keys, new[:, :, :1]) and layer.tail_valid.shape == (B, 1)
    assert torch.equal(layer.lengths, COUNTS)
    with pytest.raises(ValueError, match="cannot crop"):
        layer.crop(-2)  # only 1 appended token left: the rest is the compressed context
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)
    assert layer.get_seq_length() == S + 1 and torch.equal(layer.lengths, COUNTS)
    layer.crop(-1)
    assert layer.get_seq_length() == S and layer.physical_length == int(COUNTS.max())
    with pytest.raises(ValueError, match="cannot crop"):
        layer.crop(-1)


def expected_mask(layer, q: int, groups: int, new_block: torch.Tensor) -> torch.Tensor:
    """``[B, H * groups, q, L_max + T + q]`` bool, written out slot by slot."""
    l_max, t = layer.padded_length, layer.tail_keys.shape[2]
    mask = torch.zeros(B, H * groups, q, l_max + t + q, dtype=torch.bool)
    for b in range(B):
        for qh in range(H * groups):
            h = qh // groups  # query head qh reads KV head qh // groups (repeat_kv order)
            mask[b, qh, :, : int(layer.lengths[b, h])] = True
            mask[b, qh, :, l_max : l_max + t] = layer.tail_valid[b]
            mask[b, qh, :, l_max + t :] = new_block[b]
    return mask


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_attention_mask_per_query_head(q, groups):
    layer, *_ = make_ragged()
    layer.pending_valid = torch.tensor([[True, True], [False, True]])  # row 1: a padding token among appended ones
    layer.update(torch.zeros(B, H, 2, D), torch.zeros(B, H, 2, D))
    causal = torch.ones(q, q, dtype=torch.bool).tril()[None].expand(B, q, q)
    mask = layer.attention_mask(None, q, None, groups)
    l_max = int(COUNTS.max())
    assert mask.shape == (B, H * groups, q, l_max + 2 + q) and mask.dtype == torch.bool
    assert torch.equal(mask, expected_mask(layer, q, groups, causal))

    additive = layer.attention_mask(None, q, torch.float32, groups)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, mask)
    assert bool((additive[~mask] == torch.finfo(torch.float32).min).all())

    # an incoming mask: only its last q columns (new tokens among themselves) are used
    incoming = torch.ones(B, 1, q, 7 + q, dtype=torch.bool)
    incoming[..., -q:] = causal[:, None]
    incoming[1, :, :, -q] = False  # row 1's first new token is padding
    mask = layer.attention_mask(incoming, q, None, groups)
    assert torch.equal(mask, expected_mask(layer, q, groups, incoming[:, 0, :, -q:]))
    float_incoming = torch.zeros(incoming.shape).masked_fill(~incoming, torch.finfo(torch.float32).min)
    additive = layer.attention_mask(float_incoming, q, None, groups)
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, mask)


def test_build_mask_matches_attention_mask():
    layer, *_ = make_ragged()
    present = torch.arange(int(COUNTS.max()))[None, None] < COUNTS[..., None]
    assert torch.equal(build_mask(present, None, 1, None), layer.attention_mask(None, 1, None, 1))


@pytest.mark.parametrize(
    "method, args",
    [("reorder_cache", (torch.tensor([1, 0]),)), ("batch_repeat_interleave", (2,)),
     ("batch_select_indices", (torch.tensor([0]),))],
)
def test_batch_reordering_raises_clearly(method, args):
    layer, *_ = make_ragged()
    with pytest.raises(NotImplementedError, match="ragged per-head"):
        getattr(layer, method)(*args)
    cache = DynamicCache()
    cache.layers.append(layer)
    with pytest.raises(NotImplementedError, match="not supported on a ragged"):
        getattr(cache, method)(*args)


def test_beam_search_under_head_adaptive_press_raises_clearly():
    model = cached_tiny_model("llama", "sdpa", **INIT)
    with torch.no_grad(), press(model, SnapKVPress(ratio=0.6, window=4, allocator="head_adaptive")):
        with pytest.raises(NotImplementedError, match="ragged"):
            model.generate(random_ids(32, seed=51), max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)


def test_nbytes_counts_flat_tail_and_metadata():
    layer, *_ = make_ragged()
    assert layer.nbytes() == int(COUNTS.sum()) * D * 2 * 4 + B * H * 8
    layer.update(torch.zeros(B, H, 2, D), torch.zeros(B, H, 2, D))  # room for 2 + APPEND_RESERVE per head
    room = 2 + RaggedLayer.APPEND_RESERVE
    assert layer.nbytes() == int(COUNTS.sum()) * D * 2 * 4 + B * H * 8 + B * H * room * D * 2 * 4 + B * room
    for _ in range(RaggedLayer.APPEND_RESERVE):  # fills the room without growing it
        layer.update(torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D))
    assert layer.nbytes() == int(COUNTS.sum()) * D * 2 * 4 + B * H * 8 + B * H * room * D * 2 * 4 + B * room


def test_reset_empties_the_layer():
    layer, *_ = make_ragged()
    layer.update(torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.physical_length == 0
    assert layer.nbytes() == B * H * 8


def test_reset_layer_answers_mask_queries_like_an_empty_layer():
    layer, *_ = make_ragged()
    layer.reset()
    assert layer.get_mask_sizes(3) == (3, 0)
    out_k, _ = layer.update(torch.ones(B, H, 2, D), torch.ones(B, H, 2, D))
    assert out_k.shape == (B, H, 2, D) and layer.get_seq_length() == 2


def test_cache_reset_then_reuse_under_press():
    model = cached_tiny_model("llama", "sdpa", **INIT)
    p = SnapKVPress(ratio=0.6, window=4, allocator="head_adaptive")
    ids = random_ids(40, seed=13, distinct=True)
    fresh, reused = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(random_ids(30, seed=62), **{CACHE_KWARG: reused})
        model(torch.tensor([[5]]), **{CACHE_KWARG: reused})
        assert any(isinstance(layer, RaggedLayer) for layer in reused.layers)
        reused.reset()
        assert reused.get_seq_length() == 0
        model(ids, **{CACHE_KWARG: reused})
        a = model(torch.tensor([[5]]), **{CACHE_KWARG: reused}).logits
        model(ids, **{CACHE_KWARG: fresh})
        b = model(torch.tensor([[5]]), **{CACHE_KWARG: fresh}).logits
    assert [type(x).__name__ for x in reused.layers] == [type(x).__name__ for x in fresh.layers]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_crop_then_redecode_gives_same_logits():
    """crop of appended tokens on a real ragged cache: decoding the same tokens again gives the same logits."""
    model = cached_tiny_model("qwen3", "sdpa", **INIT)
    cache = DynamicCache(config=model.config)
    tokens = torch.tensor([[7], [9], [11]])
    with torch.no_grad(), press(model, SnapKVPress(ratio=0.6, window=4, allocator="head_adaptive")):
        model(random_ids(40, seed=61), **{CACHE_KWARG: cache})
        assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
        first = [model(t[None], **{CACHE_KWARG: cache}).logits[:, -1] for t in tokens]
        cache.crop(-2)
        assert cache.get_seq_length() == 41
        again = [model(t[None], **{CACHE_KWARG: cache}).logits[:, -1] for t in tokens[1:]]
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(-5)
    for a, b in zip(first[1:], again):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


# =====================================================================================================================
# (d) Model-scope allocators: compress once every compressible layer is prefilled, never while decoding
# =====================================================================================================================


def record_layer_kinds(model, log: list):
    """Forward hooks (registered after the press's, so they run after it) logging the cache's layer kinds."""

    def kind(layer) -> str:
        if isinstance(layer, RaggedLayer):
            return "ragged"
        return "compressed" if isinstance(layer, CompressedLayer) else "full"

    def hook_for(idx):
        def hook(module, args, kwargs, output):
            log.append((idx, [kind(layer) for layer in cache_in(kwargs).layers]))

        return hook

    return [attn.register_forward_hook(hook_for(idx), with_kwargs=True)
            for idx, attn in enumerate(attention_modules(model))]


@pytest.mark.parametrize("allocator_name", ["kvcompose", "dynamic"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_model_scope_allocator_compresses_after_last_layer_only(arch, allocator_name):
    model = cached_tiny_model(arch, "sdpa", **INIT)
    compressible = full_attention_layers(model.config)
    p = SnapKVPress(ratio=0.5, window=4, allocator=allocator_name)
    ids = random_ids(40, seed=71)
    cache = DynamicCache(config=model.config)
    log: list = []
    with torch.no_grad(), press(model, p):
        handles = record_layer_kinds(model, log)
        try:
            model(ids, **{CACHE_KWARG: cache})
            prefill_log, log[:] = list(log), []
            snapshot = {idx: (cache.layers[idx].keys.clone(), cache.layers[idx].physical_length)
                        for idx in compressible}
            model(torch.tensor([[3]]), **{CACHE_KWARG: cache})  # decode step
            model(torch.tensor([[4, 5, 6]]), **{CACHE_KWARG: cache})  # a multi-token forward on the same cache
        finally:
            for handle in handles:
                handle.remove()

    last = compressible[-1]
    for idx, kinds in prefill_log:
        for layer_idx in compressible:
            if layer_idx >= len(kinds):
                continue
            if idx < last:
                assert kinds[layer_idx] == "full", f"layer {layer_idx} compressed before layer {last} was prefilled"
            else:
                assert kinds[layer_idx] == "compressed", kinds  # one count per layer: dense storage
    assert [idx for idx, _ in prefill_log] == list(range(model.config.num_hidden_layers))

    h = kv_shape(model)[0]
    total = sum(int(cache.layers[idx].valid[:, : cache.layers[idx].compressed_length].sum()) * h
                for idx in compressible)
    assert total == len(compressible) * h * keep_count(40, 0.5)
    for idx in compressible:  # decoding appended 1 + 3 tokens, the compressed part is untouched
        layer = cache.layers[idx]
        keys, physical = snapshot[idx]
        assert layer.physical_length == physical + 4 and layer.get_seq_length() == 44
        assert torch.equal(layer.keys[:, :, :physical], keys)
    assert all(kinds[i] == "compressed" for _, kinds in log for i in compressible)


def test_layer_scope_allocator_compresses_each_layer_right_after_its_prefill():
    """Contrast with model scope: under a layer-scope allocator, layer l is compressed before layer l + 1 runs."""
    model = cached_tiny_model("llama", "sdpa", **INIT)
    cache = DynamicCache(config=model.config)
    log: list = []
    with torch.no_grad(), press(model, SnapKVPress(ratio=0.5, window=4, allocator="pyramid")):
        handles = record_layer_kinds(model, log)
        try:
            model(random_ids(40, seed=72), **{CACHE_KWARG: cache})
        finally:
            for handle in handles:
                handle.remove()
    for idx, kinds in log:
        assert kinds[: idx + 1] == ["compressed"] * (idx + 1)


def test_model_scope_counts_equal_allocate_model_on_the_same_scores():
    """The kept counts per layer are exactly what the allocator returns for the press's own scores."""
    model = cached_tiny_model("llama", "sdpa", **INIT)
    ids = random_ids(40, seed=73)
    scores, protected = [], []

    class Recording(SnapKVPress):
        def layer_scores(self, ctx):
            result = super().layer_scores(ctx)
            scores.append(result[0])
            protected.append(result[1])
            return result

    p = Recording(ratio=0.5, window=4, allocator="kvcompose")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **{CACHE_KWARG: cache})
    valid = torch.ones(1, 40, dtype=torch.bool)
    counts = p._allocator.allocate_model(scores, valid, protected[-1], 0.5, [0, 1, 2])
    for layer, layer_counts in zip(cache.layers, counts):
        assert isinstance(layer, CompressedLayer)
        assert int(layer.valid.sum()) == int(layer_counts[0, 0])


# =====================================================================================================================
# (e) Attention over the layer as stored (one contiguous region per head, appended tokens written in place)
# =====================================================================================================================


class NaiveKeySets:
    """What a ragged layer holds, tracked independently of it: per ``(b, h)`` the list of ``(key, value, real)``
    entries (kept entries, then every appended token), and the naive fp64 attention over them."""

    def __init__(self, flat_keys, flat_values, lengths):
        self.sets, offset = {}, 0
        b, h = lengths.shape
        for row in range(b):
            for head in range(h):
                n = int(lengths[row, head])
                self.sets[row, head] = [(flat_keys[offset + i], flat_values[offset + i], True) for i in range(n)]
                offset += n
        self.b, self.h = b, h

    def append(self, keys, values, valid):
        for (row, head), entries in self.sets.items():
            for i in range(keys.shape[2]):
                entries.append((keys[row, head, i], values[row, head, i], bool(valid[row, i])))

    def attention(self, query, scale):
        """``[B, H_q, q, D]``: token ``i`` of the last ``q`` appended attends to the real entries up to its own; 0
        when its own entry is padding."""
        b, h_q, q, d = query.shape
        groups = h_q // self.h
        out = torch.zeros(b, h_q, q, d, dtype=torch.float64)
        for (row, head), entries in self.sets.items():
            for i in range(q):
                own = len(entries) - q + i
                if not entries[own][2]:
                    continue
                seen = [e for e in entries[: own + 1] if e[2]]
                keys = torch.stack([e[0] for e in seen]).double()
                values = torch.stack([e[1] for e in seen]).double()
                for j in range(groups):
                    weights = torch.softmax(query[row, head * groups + j, i].double() @ keys.T * scale, dim=-1)
                    out[row, head * groups + j, i] = weights @ values
        return out


def eager_layer_attention(layer, query, incoming_new: torch.Tensor, q: int, keys, values, mask, scale):
    """Attention over the padded view the eager path gets (``keys``/``values`` from ``update``, ``mask`` from
    ``attention_mask`` asked before it), padding queries zeroed."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    logits = (query @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ values
    return out * layer.tail_valid[:, -q:][:, None, :, None]


# (B, H_kv, groups, D, lengths): single rows, batches, heads that keep nothing, one KV head
REGION_SHAPES = [
    (1, 3, 3, 8, [[5, 0, 9]]),
    (2, 2, 1, 4, [[3, 7], [0, 2]]),
    (3, 1, 4, 6, [[4], [1], [0]]),
    (2, 4, 2, 8, [[1, 6, 2, 0], [5, 5, 3, 8]]),
]


def region_steps(b: int, generator) -> list[tuple[int, torch.Tensor | None]]:
    """A decoding run: ``(q, pending_valid)`` per forward: multi-token forwards, padding among new tokens (rows of a
    batch), then many single tokens (past the reserved room)."""
    padded = torch.rand(b, 3, generator=generator) < 0.4
    padded[:, -1] = False  # the last new token is real (a full row of padding is also checked below)
    steps = [(3, ~padded if b > 1 else None), (1, None), (2, None)]
    if b > 1:
        row_padding = torch.ones(b, 1, dtype=torch.bool)
        row_padding[0] = False  # row 0 feeds a padding token (an ended row in a batch)
        steps.append((1, row_padding))
    return steps + [(1, None)] * 12


@pytest.mark.parametrize("reserve", [2, RaggedLayer.APPEND_RESERVE])
@pytest.mark.parametrize("b, h, groups, d, counts", REGION_SHAPES)
def test_region_attention_equals_naive_masked_attention_fp64(b, h, groups, d, counts, reserve, monkeypatch):
    """sdpa's path (:func:`ragged_layer_attention` over the layer's storage) and eager's (padded view and per-head
    mask) both equal naive attention over each head's kept entries and real appended tokens, in fp64, at every step:
    multi-token forwards (causal among the new tokens), padding among new tokens, padding query tokens (0), and
    appends that outgrow the reserved room (``reserve=2``: many times) or not."""
    from kvpress_like.kernels.ragged_attention import ragged_layer_attention

    monkeypatch.setattr(RaggedLayer, "APPEND_RESERVE", reserve)
    g = torch.Generator().manual_seed(b * 100 + h * 10 + d)
    lengths = torch.tensor(counts)
    n = int(lengths.sum())
    flat_keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    flat_values = torch.randn(n, d, generator=g, dtype=torch.float64)
    layer = RaggedLayer(flat_keys.clone(), flat_values.clone(), lengths, 50, (b, h, 50, d))
    naive = NaiveKeySets(flat_keys, flat_values, lengths)
    scale = 0.7
    rooms = set()
    for q, valid in region_steps(b, g):
        keys = torch.randn(b, h, q, d, generator=g, dtype=torch.float64)
        values = torch.randn(b, h, q, d, generator=g, dtype=torch.float64)
        query = torch.randn(b, h * groups, q, d, generator=g, dtype=torch.float64)
        step_valid = torch.ones(b, q, dtype=torch.bool) if valid is None else valid
        naive.append(keys, values, step_valid)
        expected = naive.attention(query, scale)

        incoming = torch.ones(q, q, dtype=torch.bool).tril()[None, None] & step_valid[:, None, None, :]
        mask = layer.attention_mask(incoming, q, None, groups)  # asked before the update, as the hooks do
        layer.pending_valid = valid
        padded_keys, padded_values = layer.update(keys, values)
        eager = eager_layer_attention(layer, query, incoming, q, padded_keys, padded_values, mask, scale)
        torch.testing.assert_close(eager, expected, rtol=0, atol=1e-12)

        got = ragged_layer_attention(query, layer, scale)
        assert got.shape == (b, h * groups, q, d) and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        rooms.add(layer._room)
        assert layer.tail_keys.shape == (b, h, len(naive.sets[0, 0]) - int(lengths[0, 0]), d)
    assert torch.equal(layer.lengths, lengths) and torch.equal(layer.flat_keys, flat_keys)
    assert len(rooms) > (2 if reserve == 2 else 0), "the room must have grown several times"


def test_region_attention_float32_matches_fp64_and_sdpa_flag_path():
    """fp32 storage (the model's usual dtype): the layer path through ``skip_padded_view`` (``update`` returns the
    storage itself, not a padded copy) agrees with the fp64 reference."""
    from kvpress_like.kernels.ragged_attention import ragged_layer_attention

    g = torch.Generator().manual_seed(5)
    b, h, groups, d = 1, 3, 3, 16
    lengths = torch.tensor([[40, 3, 17]])
    flat = torch.randn(60, d, generator=g), torch.randn(60, d, generator=g)
    layer = RaggedLayer(flat[0].clone(), flat[1].clone(), lengths, 100, (b, h, 100, d))
    naive = NaiveKeySets(*flat, lengths)
    for _ in range(RaggedLayer.APPEND_RESERVE + 5):
        keys, values = torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g)
        naive.append(keys, values, torch.ones(b, 1, dtype=torch.bool))
        layer.skip_padded_view = True
        stored_keys, _ = layer.update(keys, values)
        assert stored_keys.ndim == 2  # the storage, not a padded view
        query = torch.randn(b, h * groups, 1, d, generator=g)
        got = ragged_layer_attention(query, layer)
        torch.testing.assert_close(got.double(), naive.attention(query, d ** -0.5), rtol=0, atol=1e-5)


def test_ragged_layer_fields_can_be_assigned_one_at_a_time():
    """Loading a saved layer assigns its fields one by one (inconsistent in between): the storage is rebuilt at the
    next use, decoding then continues exactly as on the original; inconsistent fields raise at that use."""
    from kvpress_like.kernels.ragged_attention import ragged_layer_attention

    layer, *_ = make_ragged()
    g = torch.Generator().manual_seed(8)
    for q in (2, 1):
        layer.pending_valid = torch.tensor([[True] * q, [False] + [True] * (q - 1)])
        layer.update(torch.randn(B, H, q, D, generator=g), torch.randn(B, H, q, D, generator=g))
    copy = RaggedLayer(layer.flat_keys, layer.flat_values, layer.lengths, 0, (B, H, 0, D))
    for name in ("tail_keys", "tail_values", "tail_valid"):
        setattr(copy, name, getattr(layer, name))
    copy.logical_length = layer.logical_length
    copy.keys = copy.keys.clone()  # an alias of flat_keys
    for name in RaggedLayer.LAYOUT_FIELDS:
        assert torch.equal(getattr(copy, name), getattr(layer, name)), name
    new, query = torch.randn(B, H, 1, D, generator=g), torch.randn(B, 2 * H, 1, D, generator=g)
    for each in (layer, copy):
        each.update(new, new)
    torch.testing.assert_close(ragged_layer_attention(query, copy), ragged_layer_attention(query, layer), rtol=0,
                               atol=0)
    assert copy.get_seq_length() == layer.get_seq_length()
    copy.tail_valid = copy.tail_valid[:, :1]
    with pytest.raises(ValueError, match="tail_valid"):
        copy.update(new, new)


def test_crop_then_append_reuses_the_room():
    """Cropped appended tokens free their room: appending again writes in place, and what was cropped (also its
    padding flag) is never seen again."""
    from kvpress_like.kernels.ragged_attention import ragged_layer_attention

    layer, *_ = make_ragged()
    naive = NaiveKeySets(layer.flat_keys, layer.flat_values, layer.lengths)
    g = torch.Generator().manual_seed(9)
    first = torch.randn(B, H, 3, D, generator=g)
    layer.pending_valid = torch.tensor([[True, True, True], [True, False, True]])
    layer.update(first, first)
    naive.append(first[:, :, :1], first[:, :, :1], torch.ones(B, 1, dtype=torch.bool))
    storage, room = layer._k, layer._room
    layer.crop(-2)
    for _ in range(4):
        new, query = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        layer.update(new, new)
        naive.append(new, new, torch.ones(B, 1, dtype=torch.bool))
        torch.testing.assert_close(ragged_layer_attention(query, layer).double(), naive.attention(query, D ** -0.5),
                                   rtol=0, atol=1e-5)
    assert layer._k is storage and layer._room == room and bool(layer.tail_valid.all())


def test_long_ragged_decoding_past_the_reserved_room_equals_masked_full_attention_fp64():
    """A model decoding more tokens than the room reserved at the first step (the storage is laid out again) gives
    the logits of masked full attention at every step (fp64, sdpa on both sides)."""
    if "llama" not in _FP64_MODELS:
        _FP64_MODELS["llama"] = tiny_model("llama", "sdpa", **INIT).double()
    model = _FP64_MODELS["llama"]
    p = KEY_PRESSES["snapkv"]()
    ids = random_ids(40, seed=13, distinct=True)
    s, steps = ids.shape[1], RaggedLayer.APPEND_RESERVE + 8
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        logits = [model(ids, **{CACHE_KWARG: cache}).logits[:, -1]]
        tokens = []
        for _ in range(steps):
            tokens.append(logits[-1].argmax(-1, keepdim=True))
            logits.append(model(tokens[-1], **{CACHE_KWARG: cache}).logits[:, -1])
    ragged = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    assert ragged and all(layer._room > 1 + RaggedLayer.APPEND_RESERVE for layer in ragged)  # grown past step 1's
    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: full_cache})
        kept = [kept_from_layer(layer, full_cache.layers[idx].keys) for idx, layer in enumerate(cache.layers)]
        reference = reference_decode(model, full_cache, kept, torch.ones(1, s, dtype=torch.bool),
                                     torch.cat(tokens, dim=1), start=s)
    for step in range(steps):
        torch.testing.assert_close(logits[step + 1], reference[step], rtol=0, atol=1e-12)
