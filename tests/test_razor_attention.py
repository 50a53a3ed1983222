"""RazorAttention: head profiling, head choice, kept entries and compensation tokens against naive references written
from the paper (arXiv 2407.15891), budget invariants, and end-to-end use on tiny models (inside and after the ``with``
block, saved and loaded)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import left_pad, random_ids, tiny_model, torch_threads
from transformers import DynamicCache

from kvpress_like import create_press, press
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG, RaggedLayer, cache_bytes
from kvpress_like.compressors.razor_attention import (
    HeadProfile,
    RazorAttentionPress,
    profile_heads,
    profiling_ids,
    recent_window,
    retrieval_heads,
)
from kvpress_like.saved_cache import load_cache, save_cache

PERIOD, REPEATS = 12, 3


@pytest.fixture(autouse=True)
def _single_thread():
    with torch_threads(1):
        yield


def make_model(arch="llama", attn="sdpa", seed=0):
    return tiny_model(arch, attn, seed=seed, initializer_range=0.2, vocab_size=512)


# -- head profile ------------------------------------------------------------------------------------------------------
def naive_profile(model, period, repeats, seed):
    """Echo / induction scores from the full eager attention maps, by explicit loops over heads, queries and keys."""
    ids, offset = profiling_ids(model.config, period, repeats, seed)
    with torch.no_grad():
        maps = model(ids, output_attentions=True, use_cache=False).attentions  # per layer [1, H_q, T, T]
    t = ids.shape[1]
    h_q, h_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    echo, induction = torch.zeros(len(maps), h_kv), torch.zeros(len(maps), h_kv)
    for layer, weights in enumerate(maps):
        per_query_head = []
        for head in range(h_q):
            e = i = 0.0
            for q in range(offset + period, t):
                for m in range(1, repeats):
                    if q - m * period >= offset:
                        e += float(weights[0, head, q, q - m * period])
                        i += float(weights[0, head, q, q - m * period + 1])
            per_query_head.append((e / (t - offset - period), i / (t - offset - period)))
        group = h_q // h_kv
        for kv in range(h_kv):
            members = per_query_head[kv * group:(kv + 1) * group]
            echo[layer, kv] = max(x[0] for x in members)
            induction[layer, kv] = max(x[1] for x in members)
    return echo, induction


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_profile_matches_naive_attention_maps(arch):
    model = make_model(arch, "eager")
    profile = profile_heads(model, PERIOD, REPEATS, seed=1)
    echo, induction = naive_profile(model, PERIOD, REPEATS, seed=1)
    torch.testing.assert_close(profile.echo, echo, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(profile.induction, induction, rtol=1e-4, atol=1e-6)
    assert profile.tokens == PERIOD * REPEATS + (model.config.bos_token_id is not None)
    assert profile_heads(model, PERIOD, REPEATS, seed=1) is profile  # cached per model and settings


def test_profiling_input_repeats_one_random_block_without_special_tokens():
    config = make_model().config
    ids, offset = profiling_ids(config, 50, 4, seed=3)
    assert offset == 1 and ids[0, 0] == config.bos_token_id and ids.shape == (1, 201)
    body = ids[0, 1:].view(4, 50)
    assert (body == body[0]).all()
    assert not set(body[0].tolist()) & {config.bos_token_id, config.eos_token_id}
    assert torch.equal(profiling_ids(config, 50, 4, seed=3)[0], ids)


def test_retrieval_heads_are_the_union_of_the_top_fractions():
    g = torch.Generator().manual_seed(0)
    echo, induction = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    chosen = retrieval_heads(HeadProfile((0, 1, 2, 3, 4), echo, induction, 10), 0.14, 0.01)
    by_induction = sorted(range(20), key=lambda i: -float(induction.flatten()[i]))[:3]  # ceil(0.14 * 20) = 3
    by_echo = sorted(range(20), key=lambda i: -float(echo.flatten()[i]))[:1]  # ceil(0.01 * 20) = 1
    assert set(chosen.flatten().nonzero().flatten().tolist()) == set(by_induction) | set(by_echo)
    assert not retrieval_heads(HeadProfile((0,), echo[:1], induction[:1], 10), 0.0, 0.0).any()


# -- budget ------------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), ratio=st.floats(0.01, 0.95), heads=st.integers(1, 40), data=st.data(),
       n_sink=st.integers(0, 8), window=st.integers(0, 50), compensation=st.booleans())
def test_recent_window_fills_the_budget(n, ratio, heads, data, n_sink, window, compensation):
    n_retrieval = data.draw(st.integers(0, heads))
    sinks = min(n_sink, n)

    def entries(w):  # one non-retrieval head
        return sinks + w + (1 if compensation and n - sinks - w > 0 else 0)

    budget = heads * keep_count(n, ratio)
    try:
        w = recent_window(n, ratio, n_retrieval, heads, n_sink, window, compensation)
    except ValueError as error:
        assert "at most" in str(error)
        assert n_retrieval * n + (heads - n_retrieval) * (sinks + compensation) > budget
        return
    assert 0 <= w <= n - sinks
    total = n_retrieval * n + (heads - n_retrieval) * entries(w)
    if window < w < n - sinks:  # set by the budget: it fits, and one more recent token does not (or costs nothing)
        assert total <= budget
        more = n_retrieval * n + (heads - n_retrieval) * entries(w + 1)
        assert more > budget or entries(w + 1) == entries(w)
    if w == window and window < n - sinks:
        assert recent_window(n, ratio, n_retrieval, heads, n_sink, 0, compensation) <= window


# -- the compressed layers ---------------------------------------------------------------------------------------------
def head_entries(layer: RaggedLayer):
    """``{(b, h): (keys [n, D], values [n, D])}`` of a ragged layer's compressed part."""
    lengths = layer.lengths
    keys, values = layer.flat_keys, layer.flat_values
    out, at = {}, 0
    for b in range(lengths.shape[0]):
        for h in range(lengths.shape[1]):
            n = int(lengths[b, h])
            out[b, h] = (keys[at:at + n], values[at:at + n])
            at += n
    return out


def prefill(model, ids, mask, p=None):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if p is None:
            model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
        else:
            with press(model, p):
                model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
    return cache


@pytest.mark.parametrize("ratio, compensation, window", [(0.4, True, 0), (0.6, True, 0), (0.5, False, 0),
                                                         (0.6, True, 30)])
def test_kept_entries_and_compensation_tokens_match_naive_reference(ratio, compensation, window):
    model = make_model()
    rows = [random_ids(70, seed=2, vocab=512)[0], random_ids(51, seed=3, vocab=512)[0]]
    ids, mask = left_pad(rows)
    p = RazorAttentionPress(ratio=ratio, n_sink=3, window=window, compensation=compensation, profile_period=PERIOD,
                            profile_repeats=REPEATS, induction_fraction=0.2, echo_fraction=0.1)
    full = prefill(model, ids, mask)
    cache = prefill(model, ids, mask, p)
    # naive reference of the paper's rule, from the profile
    profile = profile_heads(model, PERIOD, REPEATS, 0)
    scores_i, scores_e = profile.induction.flatten().tolist(), profile.echo.flatten().tolist()
    total = len(scores_i)
    chosen = set(sorted(range(total), key=lambda i: -scores_i[i])[:math.ceil(0.2 * total)])
    chosen |= set(sorted(range(total), key=lambda i: -scores_e[i])[:math.ceil(0.1 * total)])
    h = model.config.num_key_value_heads
    for row, tokens in enumerate(rows):
        n = len(tokens)
        budget = total * keep_count(n, ratio)
        per_other = (budget - len(chosen) * n) // (total - len(chosen))
        w = min(max(per_other - 3 - compensation, window), n - 3)
        kept_total = 0
        for layer_idx, (layer, ref) in enumerate(zip(cache.layers, full.layers, strict=True)):
            assert isinstance(layer, RaggedLayer) and layer.get_seq_length() == ids.shape[1]
            entries = head_entries(layer)
            start = ids.shape[1] - n  # left padding
            for head in range(h):
                keys, values = entries[row, head]
                real_k, real_v = ref.keys[row, head, start:], ref.values[row, head, start:]
                if layer_idx * h + head in chosen:
                    want_k, want_v = real_k, real_v
                else:
                    dropped = range(3, n - w)
                    want_k = [real_k[:3]]
                    want_v = [real_v[:3]]
                    if compensation:
                        want_k.append(sum(real_k[i].double() for i in dropped)[None].float() / len(dropped))
                        want_v.append(sum(real_v[i].double() for i in dropped)[None].float() / len(dropped))
                    want_k, want_v = torch.cat(want_k + [real_k[n - w:]]), torch.cat(want_v + [real_v[n - w:]])
                torch.testing.assert_close(keys, want_k, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(values, want_v, rtol=1e-5, atol=1e-6)
                kept_total += len(keys)
        assert kept_total <= budget or w == window  # the window floor may keep more than the ratio asks
    d = model.config.hidden_size // model.config.num_attention_heads
    entries = sum(int(layer.lengths.sum()) for layer in cache.layers)
    assert cache_bytes(cache) == entries * d * 2 * 4 + len(cache.layers) * 2 * h * 8  # kept entries + lengths only


def test_generate_inside_equals_outside_and_after_save_load(tmp_path):
    model = make_model()
    ids = random_ids(80, seed=4, vocab=512)
    follow = random_ids(5, seed=5, vocab=512)
    p = RazorAttentionPress(ratio=0.5, profile_period=PERIOD, profile_repeats=REPEATS, induction_fraction=0.2)
    cache = DynamicCache(config=model.config)
    with press(model, p), torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
        save_cache(tmp_path / "razor.pt", cache, model, ids, p)
        inside = model(follow, **{CACHE_KWARG: cache}).logits
        out = model.generate(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}, max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 86)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: full})
        uncompressed = model(follow, **{CACHE_KWARG: full}).logits
    assert not torch.allclose(inside, uncompressed, atol=1e-4)  # the compression did change what is attended
    loaded, loaded_ids, meta = load_cache(tmp_path / "razor.pt", model)
    assert torch.equal(loaded_ids, ids) and meta["press"]["press"] == "razor_attention"
    model.set_attn_implementation("kvpress_like_sdpa")
    try:
        with torch.no_grad():
            cache.crop(-5)
            outside = model(follow, **{CACHE_KWARG: cache}).logits
            after_load = model(follow, **{CACHE_KWARG: loaded}).logits
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(outside, inside, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_load, inside, rtol=1e-5, atol=1e-5)


def test_plain_attention_outside_the_block_is_refused():
    model = make_model()
    ids = random_ids(40, seed=6, vocab=512)
    p = RazorAttentionPress(ratio=0.5, profile_period=PERIOD, profile_repeats=REPEATS, induction_fraction=0.2)
    cache = prefill(model, ids, None, p)
    with pytest.raises(ValueError, match="kvpress_like_sdpa"), torch.no_grad():
        model(random_ids(2, seed=7, vocab=512), **{CACHE_KWARG: cache})


# -- errors ------------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="allocator"):
        RazorAttentionPress(ratio=0.5, allocator="pyramid")
    with pytest.raises(ValueError, match="induction_fraction"):
        RazorAttentionPress(ratio=0.5, induction_fraction=1.5)
    with pytest.raises(ValueError, match="profile_period"):
        RazorAttentionPress(ratio=0.5, profile_period=1)
    assert create_press("razor_attention", ratio=0.25) == RazorAttentionPress(ratio=0.25)
    model = make_model()
    p = RazorAttentionPress(ratio=0.9, profile_period=PERIOD, profile_repeats=REPEATS, induction_fraction=0.5)
    with pytest.raises(ValueError, match="removes at most"):
        prefill(model, random_ids(40, seed=8, vocab=512), None, p)
    from kvpress_like.press import LayerContext

    ctx = LayerContext(module=torch.nn.Linear(1, 1), layer_idx=0, num_layers=1, layers=(0,), arch=None,
                       hidden_states=torch.zeros(1, 3, 1), position_embeddings=(None, None),
                       keys=torch.zeros(1, 1, 3, 2), values=torch.zeros(1, 1, 3, 2),
                       valid=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="press\\(model, p\\)"):
        RazorAttentionPress(ratio=0.5).compress(ctx)


# -- every architecture ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
def test_every_architecture(arch):
    """Default settings (256 x 4 profiling tokens) on a left-padded batch: compressible layers become ragged layers
    whose heads keep every real token (retrieval) or sinks + recent window + compensation token; Gemma3's sliding
    layer is left alone; generation continues at the right length."""
    model = tiny_model(arch)
    lengths = (40, 29)
    ids, mask = left_pad([random_ids(n, seed=20 + n)[0] for n in lengths])
    p = create_press("razor_attention", ratio=0.5)
    with torch.no_grad(), press(model, p):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 43)
    retrieval = p.retrieval_heads(model)
    compressible = profile_heads(model).layers
    n_heads, n_retrieval = retrieval.numel(), int(retrieval.sum())
    assert n_retrieval == len(set(retrieval.flatten().nonzero().flatten().tolist())) >= 1
    for idx, layer in enumerate(out.past_key_values.layers):
        if idx not in compressible:
            assert not isinstance(layer, RaggedLayer)
            continue
        assert isinstance(layer, RaggedLayer) and layer.get_seq_length() == 42
        row_in_profile = compressible.index(idx)
        for b, n in enumerate(lengths):
            w = recent_window(n, 0.5, n_retrieval, n_heads, 4, 0, True)
            want = [n if retrieval[row_in_profile, h] or w >= n - 4 else 4 + 1 + w
                    for h in range(layer.lengths.shape[1])]
            assert layer.lengths[b].tolist() == want


# -- what the every-press matrices of test_scorers / test_quantized check, for this head policy ------------------------
class MaxTensorRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (numel) any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_s_by_s_tensor_in_compression_or_profiling():
    from kvpress_like.compressors.razor_attention import copy_attention

    largest = {}

    class Recorded(RazorAttentionPress):
        def compress(self, ctx):
            with MaxTensorRecorder() as rec:
                layer = super().compress(ctx)
            largest[ctx.keys.shape[2]] = max(largest.get(ctx.keys.shape[2], 0), rec.largest)
            return layer

    model = tiny_model("llama", num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                       max_position_embeddings=8192)
    p = Recorded(ratio=0.3, profile_period=PERIOD, profile_repeats=REPEATS, induction_fraction=0.5)
    for seq in (1024, 2048):
        prefill(model, random_ids(seq, seed=seq), None, p)
    assert largest[2048] < 2048 * 2048 / 2 and largest[2048] <= 2.2 * largest[1024], largest
    profiled = {}
    for t in (1024, 2048):
        g = torch.Generator().manual_seed(t)
        q, k = torch.randn(2, t, 16, generator=g), torch.randn(1, t, 16, generator=g)
        with MaxTensorRecorder() as rec:
            copy_attention(q, k, 0.25, 1, 256)
        profiled[t] = rec.largest
    assert profiled[2048] < 2048 * 2048 / 2 and profiled[2048] <= 2.2 * profiled[1024], profiled


def test_same_input_same_cache():
    model = make_model()
    ids, mask = left_pad([random_ids(50, seed=11, vocab=512)[0], random_ids(37, seed=12, vocab=512)[0]])

    def run():
        p = RazorAttentionPress(ratio=0.5, profile_period=PERIOD, profile_repeats=REPEATS, induction_fraction=0.2)
        return prefill(model, ids, mask, p)

    for a, b in zip(run().layers, run().layers, strict=True):
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.flat_keys, b.flat_keys)
        assert torch.equal(a.flat_values, b.flat_values)


def test_quantized_cache_is_refused_clearly():
    from transformers import QuantizedCache

    model = make_model()
    p = RazorAttentionPress(ratio=0.5, profile_period=PERIOD, profile_repeats=REPEATS, induction_fraction=0.2)
    with pytest.raises(ValueError, match="ragged layers"), press(model, p), torch.no_grad():
        model(random_ids(40, seed=13, vocab=512), **{CACHE_KWARG: QuantizedCache(backend="fp8", config=model.config)})


def test_profile_without_bos_token():
    model = tiny_model("llama", "eager", initializer_range=0.2, vocab_size=512, bos_token_id=None)
    ids, offset = profiling_ids(model.config, PERIOD, REPEATS, seed=2)
    assert offset == 0 and ids.shape == (1, PERIOD * REPEATS)
    profile = profile_heads(model, PERIOD, REPEATS, seed=2)
    echo, induction = naive_profile(model, PERIOD, REPEATS, seed=2)
    torch.testing.assert_close(profile.echo, echo, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(profile.induction, induction, rtol=1e-4, atol=1e-6)
