"""FastKV (token-selective propagation + GQA-aware KV selection): the scoring criterion against a naive reference, the
prefill's last-token logits against a plain re-implementation of TSP, positions after the prefill, generate, budgets
(hypothesis) and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import random_ids, tiny_model, torch_threads
from transformers import DynamicCache

from kvpress_like import press
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.compressors.fastkv import FastKVPress, gqa_scores
from kvpress_like.press import LayerContext
from kvpress_like.registry import architecture_for

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@pytest.fixture(autouse=True)
def _single_torch_thread():
    with torch_threads(1):
        yield


def model_of(arch: str, impl: str = "sdpa", layers: int = 4):
    return tiny_model(arch, impl, num_hidden_layers=layers, initializer_range=0.2)


# ------------------------------------------------------------------------------------------------ naive references
def naive_scores(queries, keys, scaling, groups, window, kernel, pooling):
    """FastKV's per-KV-head scores written with loops: window softmax (causal inside the window), summed over the
    window, zero-padded pooling over the keys before the window, summed over each KV group's query heads."""
    b_n, h_q, s, _ = queries.shape
    w = min(window, s)
    out = torch.zeros(b_n, h_q // groups, s, dtype=torch.float64)
    for b in range(b_n):
        for h in range(h_q):
            sums = [0.0] * s
            for i in range(s - w, s):
                logits = [float(queries[b, h, i].double() @ keys[b, h // groups, j].double()) * scaling
                          for j in range(i + 1)]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                for j in range(i + 1):
                    sums[j] += exps[j] / sum(exps)
            n = s - w
            for j in range(n):
                near = [sums[k] if 0 <= k < n else 0.0 for k in range(j - kernel // 2, j + kernel // 2 + 1)]
                out[b, h // groups, j] += sum(near) / kernel if pooling == "avg" else max(near)
    return out


def layer_context(model, queries, keys):
    attn = model.model.layers[0].self_attn
    b, _, s, _ = keys.shape
    return LayerContext(module=attn, layer_idx=0, num_layers=1, layers=(0,), arch=architecture_for(model.config),
                        hidden_states=torch.zeros(b, s, model.config.hidden_size), position_embeddings=None,
                        keys=keys, values=keys.clone(), valid=torch.ones(b, s, dtype=torch.bool),
                        projections={"q_rope": queries})


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("s,window,kernel", [(12, 4, 3), (9, 8, 7), (20, 3, 5), (5, 8, 1)])
def test_gqa_scores_match_naive_reference(pooling, s, window, kernel):
    model = model_of("llama", layers=1)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(s * 31 + window)
    queries = torch.randn(2, 4, s, attn.head_dim, generator=gen)
    keys = torch.randn(2, 2, s, attn.head_dim, generator=gen)
    got = gqa_scores(layer_context(model, queries, keys), window, kernel, pooling)
    expected = naive_scores(queries, keys, attn.scaling, 2, window, kernel, pooling)
    assert got.shape == (2, 2, s)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert bool((got[..., max(s - window, 0):] == 0).all())  # the window is scored 0 (the press protects it)


# ----------------------------------------------------------------------------- plain re-implementation of the prefill
def rope(model, hidden, positions):
    return model.model.rotary_emb(hidden, positions)


def naive_tsp_selection(model, layer_idx, hidden_in, positions, window, kernel, pooling, t):
    """The tokens FastKV propagates past ``layer_idx``: its queries and keys recomputed from the layer's input, scored
    by :func:`naive_scores`, summed over every KV head; top ``t`` with the window forced in, ascending."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)
    b, s, _ = x.shape
    if hasattr(attn, "qkv_proj"):
        qkv = attn.qkv_proj(x)
        n_q = attn.config.num_attention_heads * attn.head_dim
        n_k = attn.config.num_key_value_heads * attn.head_dim
        q, k = qkv[..., :n_q], qkv[..., n_q:n_q + n_k]
    else:
        q, k = attn.q_proj(x), attn.k_proj(x)
    q = q.view(b, s, -1, attn.head_dim).transpose(1, 2)
    k = k.view(b, s, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rope(model, hidden_in, positions)

    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    q = q * cos[:, None] + rotate(q) * sin[:, None]
    k = k * cos[:, None] + rotate(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    per_token = naive_scores(q, k, attn.scaling, groups, window, kernel, pooling).sum(dim=1)  # [B, S]
    per_token[:, s - window:] = math.inf
    return per_token.topk(t, dim=-1).indices.sort(dim=-1).values


def plain_fastkv_prefill(model, ids, tsp_layer, t, window=8, kernel=7, pooling="avg"):
    """Last-token logits of FastKV's prefill written plainly: every layer up to ``tsp_layer`` on all tokens, then the
    deeper layers on the selected tokens only (their original positions, causal among themselves), no cache."""
    b, s = ids.shape
    hidden = model.model.embed_tokens(ids)
    positions = torch.arange(s)[None].expand(b, s)
    for i, layer in enumerate(model.model.layers):
        layer_input, n = hidden, hidden.shape[1]
        causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=causal, position_ids=positions,
                       position_embeddings=rope(model, hidden, positions))
        if i == tsp_layer:  # the layer's output, at the tokens its own attention selected, goes on
            chosen = naive_tsp_selection(model, i, layer_input, positions, window, kernel, pooling, t)
            hidden = hidden.gather(1, chosen[..., None].expand(b, t, hidden.shape[-1]))
            positions = positions.gather(1, chosen)
    return model.lm_head(model.model.norm(hidden))[:, -1], chosen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_last_token_logits_match_plain_reimplementation(arch, impl):
    model = model_of(arch, impl)
    ids = random_ids(60, batch=2, seed=3)
    p = FastKVPress(ratio=0.75, tsp_layer=1, tsp_rate=0.3)
    with torch.no_grad():
        expected, chosen = plain_fastkv_prefill(model, ids, tsp_layer=1, t=int(60 * 0.3))
        full = model(ids).logits[:, -1]
        with press(model, p):
            out = model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)})
    torch.testing.assert_close(out.logits[:, -1], expected, rtol=1e-4, atol=1e-5)
    assert (out.logits[:, -1] - full).abs().max() > 1e-3  # propagation changed the result (the test can fail)
    assert out.logits.shape[:2] == (2, 60)
    dropped = torch.ones(2, 60, dtype=torch.bool).scatter(1, chosen, False)
    assert bool(torch.isnan(out.logits[dropped]).all()) and not bool(torch.isnan(out.logits[~dropped]).any())


# --------------------------------------------------------------------------------------------------- cache, positions
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cache_layers_and_positions_after_prefill(arch):
    model = model_of(arch)
    n = 50
    ids = random_ids(n + 1, seed=5)
    p = FastKVPress(ratio=0.8, tsp_layer=1, tsp_rate=0.3)
    with torch.no_grad(), press(model, p):
        cache = DynamicCache(config=model.config)
        model(ids[:, :n], **{CACHE_KWARG: cache})
        keep = n - math.floor(0.8 * n)
        assert [layer.keys.shape[2] for layer in cache.layers] == [keep] * 4
        assert [layer.get_seq_length() for layer in cache.layers] == [n] * 4
        # the next token gets position n by default, exactly as with explicit positions
        default = model(ids[:, n:], **{CACHE_KWARG: cache}).logits
        cache.crop(-1)
        explicit = model(ids[:, n:], position_ids=torch.tensor([[n]]), **{CACHE_KWARG: cache}).logits
        cache.crop(-1)
        wrong = model(ids[:, n:], position_ids=torch.tensor([[int(n * 0.3)]]), **{CACHE_KWARG: cache}).logits
    torch.testing.assert_close(default, explicit)
    assert not torch.isnan(default).any()
    assert (default - wrong).abs().max() > 1e-4  # positions matter here (the check can fail)


def test_deeper_layers_keep_at_most_the_propagated_tokens():
    model = model_of("llama")
    ids = random_ids(100, seed=7)
    p = FastKVPress(ratio=0.5, tsp_layer=0, tsp_rate=0.5, window=4)  # keep 50, propagate 50
    q = FastKVPress(ratio=0.3, tsp_layer=0, tsp_rate=0.9, window=4)  # keep 70, propagate 90
    with torch.no_grad():
        for pr, counts in ((p, [50] * 4), (q, [70] * 4)):
            with press(model, pr):
                cache = DynamicCache(config=model.config)
                model(ids, **{CACHE_KWARG: cache})
            assert [layer.keys.shape[2] for layer in cache.layers] == counts


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generate_matches_manual_greedy_loop_with_explicit_positions(arch):
    model = model_of(arch)
    model.generation_config.eos_token_id = None  # six tokens, whatever they are
    ids = random_ids(70, seed=11)
    p = FastKVPress(ratio=0.75, tsp_layer=1)
    with torch.no_grad(), press(model, p):
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)[0, 70:]
        cache = DynamicCache(config=model.config)
        logits = model(ids, **{CACHE_KWARG: cache}).logits[:, -1]
        manual = []
        for step in range(6):
            token = logits.argmax(-1, keepdim=True)
            manual.append(int(token))
            logits = model(token, position_ids=torch.tensor([[70 + step]]), **{CACHE_KWARG: cache}).logits[:, -1]
    assert generated.tolist() == manual
    assert cache.layers[-1].get_seq_length() == 70 + 6


def test_short_prompt_is_not_propagated_and_outputs_every_position():
    model = model_of("llama")
    ids = random_ids(6, seed=2)
    with torch.no_grad(), press(model, FastKVPress(ratio=0.5, tsp_layer=1)):
        out = model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)})
    assert not torch.isnan(out.logits).any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 90), ratio=st.floats(0.0, 0.95), extra=st.floats(0.0, 0.5), window=st.integers(1, 12),
       tsp=st.integers(0, 2))
def test_budget_invariants(n, ratio, extra, window, tsp):
    model = model_of("llama")
    tsp_rate = min(1.0, 1 - ratio + extra)
    p = FastKVPress(ratio=ratio, tsp_layer=tsp, tsp_rate=tsp_rate, window=window)
    ids = random_ids(n, seed=n)
    with torch.no_grad(), press(model, p):
        cache = DynamicCache(config=model.config)
        out = model(ids, **{CACHE_KWARG: cache})
    keep = min(n, max(n - math.floor(ratio * n), window)) if ratio > 0 else n
    t = max(int(n * tsp_rate), window)
    for i, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == n
        assert layer.keys.shape[2] == (min(keep, t) if i > tsp and t < n else keep)
    assert not torch.isnan(out.logits[:, -max(1, min(window, n)):]).any()  # the window is always propagated


# ------------------------------------------------------------------------------------------------------------- errors
def test_refusals():
    with pytest.raises(ValueError, match="uniform"):
        FastKVPress(ratio=0.5, allocator="pyramid")
    with pytest.raises(ValueError, match="at least 1 - ratio"):
        FastKVPress(ratio=0.5, tsp_rate=0.3)
    with pytest.raises(ValueError, match="pooling"):
        FastKVPress(ratio=0.5, pooling="sum")
    with pytest.raises(ValueError, match="sliding-window"):
        with press(tiny_model("gemma3"), FastKVPress(ratio=0.5)):
            pass
    model = model_of("llama")
    with pytest.raises(ValueError, match=r"tsp_layer must be in \[0, 2\]"):
        with press(model, FastKVPress(ratio=0.5, tsp_layer=3)):
            pass
    ids = random_ids(30, batch=2, seed=1)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad(), press(model, FastKVPress(ratio=0.5, tsp_layer=1)):
        with pytest.raises(ValueError, match="unpadded prefill"):
            model(ids, attention_mask=mask, **{CACHE_KWARG: DynamicCache(config=model.config)})
    from kvpress_like.calibration import CalibratedPress
    from kvpress_like.chunked import chunked_prefill
    from kvpress_like.decoding import DecodingPress

    with pytest.raises(ValueError, match="FastKVPress is not a plain scorer"):
        CalibratedPress(scorer=FastKVPress(ratio=0.5))
    with pytest.raises(ValueError, match="cannot score while decoding"):
        DecodingPress(scorer=FastKVPress(ratio=0.5))
    with pytest.raises(ValueError, match="FastKVPress is not a plain scorer"):
        chunked_prefill(model, FastKVPress(ratio=0.5), ids[:1], chunk_size=8)
    with pytest.raises(RuntimeError, match="installed with press"):
        FastKVPress(ratio=0.5).compress(layer_context(model, torch.zeros(1, 4, 5, 16), torch.zeros(1, 2, 5, 16)))


def test_cache_gives_the_same_next_token_outside_the_block():
    model = model_of("llama")
    ids = random_ids(41, seed=13)
    with torch.no_grad():
        with press(model, FastKVPress(ratio=0.75, tsp_layer=1)):
            cache = DynamicCache(config=model.config)
            model(ids[:, :40], **{CACHE_KWARG: cache})
            inside = model(ids[:, 40:], **{CACHE_KWARG: cache}).logits
        cache.crop(-1)
        outside = model(ids[:, 40:], **{CACHE_KWARG: cache}).logits
    torch.testing.assert_close(outside, inside)
    assert cache.get_seq_length() == 41
