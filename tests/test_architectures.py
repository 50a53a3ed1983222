"""Every supported architecture, with sdpa and eager attention: ratio 0 is a no-op, ratio 0.5 really shrinks the cache.

The six built-in families and the two added by plugins through the public ``register_architectures`` hook only
(GPT-NeoX: per-head interleaved fused ``query_key_value``, partial rotary; OLMo2: ``q_norm``/``k_norm`` over the full
projection width) run the same tests: tiny models from configs, generate under presses, pre-RoPE queries and keys
recomputed by the :class:`~kvpress_like.Architecture` bit-identical to the model's own, positions after pruning.

Reference values (kept counts, bytes, sliding layers) are computed here from the config and a run without a press,
never from the package's own helpers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from tiny_models import (
    ARCHITECTURES,
    SLIDING_ARCHITECTURES,
    cached_tiny_model,
    full_attention_layers,
    left_pad,
    perturb_norm_weights,
    prefill,
    random_ids,
    torch_threads,
)
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, Olmo2Config, Olmo2ForCausalLM

import kvpress_like
from kvpress_like import CompressedLayer, KnormPress, SnapKVPress, StreamingLLMPress, press
from kvpress_like.cache import CACHE_KWARG, SlidingCompressedLayer
from kvpress_like.plugins import gpt_neox as gpt_neox_plugin
from kvpress_like.plugins import olmo2 as olmo2_plugin

IMPLS = ("sdpa", "eager")
PLUGINS = {"gpt_neox": gpt_neox_plugin, "olmo2": olmo2_plugin}
PLUGIN_ARCHITECTURES = tuple(PLUGINS)
ALL_ARCHITECTURES = ARCHITECTURES + PLUGIN_ARCHITECTURES
_PLUGIN_MODELS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True, scope="module")
def _plugin_families():
    """The plugin families come from their entry points; with ``KVPRESS_LIKE_NO_PLUGINS=1`` they are registered here
    at run time instead (the same hook), so the tests below run either way."""
    added = [m for name, m in PLUGINS.items() if name not in kvpress_like.list_architectures()]
    for module in added:
        kvpress_like.register_plugin(module, name=f"test_{module.ARCHITECTURE.name}")
    yield
    for module in added:
        kvpress_like.unregister_plugin(module)


def plugin_tiny_model(arch: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A 3-layer random GPT-NeoX (4 heads of 16, rotary on the first 4 dimensions of each) or OLMo2 (4 query heads,
    2 KV heads) in fp32 eval mode, built once per argument set, with perturbed norm weights."""
    key = (arch, attn_implementation)
    if key not in _PLUGIN_MODELS:
        common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if arch == "gpt_neox":
            config, cls = GPTNeoXConfig(rotary_pct=0.25, **common), GPTNeoXForCausalLM
        elif arch == "olmo2":
            config, cls = Olmo2Config(num_key_value_heads=2, **common), Olmo2ForCausalLM
        else:
            raise ValueError(arch)
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        _PLUGIN_MODELS[key] = perturb_norm_weights(cls(config).eval())
    return _PLUGIN_MODELS[key]


def model_for(arch: str, impl: str = "sdpa") -> torch.nn.Module:
    """The tiny model of a built-in or a plugin family."""
    return plugin_tiny_model(arch, impl) if arch in PLUGINS else cached_tiny_model(arch, impl)


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()




@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
@pytest.mark.parametrize(
    "make_press",
    [lambda: KnormPress(ratio=0.0), lambda: SnapKVPress(ratio=0.0, window=4), lambda: KnormPress(compression_ratio=0)],
    ids=["knorm", "snapkv", "alias"],
)
def test_ratio_zero_generates_exactly_like_no_press(arch, impl, make_press):
    model = model_for(arch, impl)
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
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
@pytest.mark.parametrize(
    "n, n_sink, window",
    [(24, 0, 0), (23, 1, 2), (20, 6, 8)],  # even, odd (floor), protected tokens (14) outnumber n - floor(n/2) = 10
)
def test_half_ratio_shrinks_every_compressible_layer(arch, impl, n, n_sink, window):
    model = model_for(arch, impl)
    config = model.config
    ids = random_ids(n, seed=2)
    full = prefill(model, ids)
    cache = prefill(model, ids, KnormPress(ratio=0.5, n_sink=n_sink, window=window))

    expected_keep = max(n - math.floor(0.5 * n), min(n, n_sink + window))
    compressible = full_attention_layers(config)
    assert compressible, "every tiny model has at least one full-attention layer"
    if arch == "gemma3":
        assert 0 not in compressible  # gemma3's layer 0 is sliding
    h_kv = kv_heads(config)
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


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_generate_under_press_runs_and_keeps_budget(arch):
    """generate() under a real press produces the requested number of tokens with a compressed cache."""
    model = model_for(arch, "sdpa")
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


# -- what an Architecture computes is the model's own ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_pre_rope_queries_and_keys_are_the_models_own(arch, monkeypatch):
    """The queries and keys each attention module passes to its RoPE function (recorded by wrapping the modeling
    module's ``apply_rotary_pos_emb``) are bit-identical to what the :class:`Architecture` recomputes from the module's
    input hidden states, and to what it derives from the captured projection output; its RoPE function and RoPE tables
    turn them into exactly the model's post-RoPE queries and keys."""
    import sys

    model = model_for(arch)
    registry_arch = kvpress_like.registry.architecture_for(model.config)
    layers = registry_arch.decoder_layers(model)
    attentions = [registry_arch.attention(layer) for layer in layers]
    modeling = sys.modules[type(attentions[0]).__module__]
    original = modeling.apply_rotary_pos_emb
    rope_calls = []

    def recording(q, k, cos, sin, *args, **kwargs):
        out = original(q, k, cos, sin, *args, **kwargs)
        rope_calls.append((q.clone(), k.clone(), cos, sin, out[0].clone(), out[1].clone()))
        return out

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording)
    inputs, projected, handles = [], {}, []
    for i, attn in enumerate(attentions):
        handles.append(attn.register_forward_pre_hook(
            lambda mod, args, kwargs: inputs.append(registry_arch.attention_inputs(args, kwargs)["hidden_states"]),
            with_kwargs=True))
        for which in ("q", "k"):
            target = registry_arch.projection_module(attn, which)
            handles.append(target.register_forward_hook(
                lambda mod, args, out, i=i, which=which: projected.__setitem__((i, which), out)))
    ids = random_ids(12, batch=2, seed=5)
    try:
        with torch.no_grad():
            model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)})
    finally:
        for handle in handles:
            handle.remove()
    assert len(rope_calls) == len(inputs) == len(attentions)

    rotary = registry_arch.rotary_embedding(model)
    positions = torch.arange(12)
    with torch.no_grad():
        for i, (attn, hidden, (q, k, cos, sin, q_rot, k_rot)) in enumerate(zip(attentions, inputs, rope_calls)):
            pre_q = registry_arch.pre_rope_queries(attn, hidden)
            pre_k = registry_arch.pre_rope_keys(attn, hidden)
            assert pre_q.shape == (2, model.config.num_attention_heads, 12, registry_arch.head_dim(attn))
            assert pre_k.shape == (2, kv_heads(model.config), 12, registry_arch.head_dim(attn))
            assert torch.equal(pre_q, q) and torch.equal(pre_k, k), f"layer {i}"
            assert torch.equal(registry_arch.from_projection(attn, projected[i, "q"], "q"), q)
            assert torch.equal(registry_arch.from_projection(attn, projected[i, "k"], "k"), k)
            got_q, got_k = registry_arch.apply_rope(pre_q, pre_k, cos, sin)
            assert torch.equal(got_q, q_rot) and torch.equal(got_k, k_rot)
            tables = registry_arch.rope_tables(rotary, attn, hidden, positions)  # Gemma3: per layer type
            assert torch.equal(tables[0], cos) and torch.equal(tables[1], sin)
            assert registry_arch.scaling(attn) == attn.scaling

    # the checks tell the layouts apart
    attn, d = attentions[0], registry_arch.head_dim(attentions[0])
    if arch == "gpt_neox":
        assert cos.shape[-1] == d // 4  # rotary_pct 0.25: partial rotary is exercised
        contiguous = projected[0, "q"][..., : 4 * d].view(2, 12, 4, d).transpose(1, 2)  # a [q | k | v] split
        assert not torch.equal(contiguous, rope_calls[0][0])
    if arch == "olmo2":
        assert attn.q_norm.weight.numel() == 4 * d  # the norm spans every head
        with pytest.raises(ValueError, match="not one per head dimension"):
            kvpress_like.Architecture.to_heads(registry_arch, attn, projected[0, "q"], "q")


def test_a_cache_under_another_name_is_refused_not_ignored():
    """The default Architecture (OLMo2's too) reads the cache as ``cache``: GPT-NeoX's ``layer_past`` would leave it
    unseen (and the layer silently uncompressed); it is refused with a message pointing at ``attention_inputs``. The
    GPT-NeoX plugin maps it."""
    hidden, cache = torch.zeros(1, 2, 64), DynamicCache()
    for default in (kvpress_like.Architecture("plain", ("plain",), lambda q, k, cos, sin: (q, k)),
                    olmo2_plugin.ARCHITECTURE):
        with pytest.raises(TypeError, match="receives its cache as 'layer_past'.*attention_inputs"):
            default.attention_inputs((hidden,), {"layer_past": cache})
        with pytest.raises(TypeError, match="2 positional arguments"):
            default.attention_inputs((hidden, None), {"cache": cache})
        assert default.attention_inputs((hidden,), {"cache": cache}) == {"hidden_states": hidden, "cache": cache}
    got = gpt_neox_plugin.ARCHITECTURE.attention_inputs((hidden,), {"layer_past": cache, "attention_mask": None})
    assert got == {"hidden_states": hidden, "cache": cache, "attention_mask": None}


@dataclass
class _FixedTokenScorePress(kvpress_like.Press):
    """Test scorer: one seeded random score per token position, the same for every layer, head and row."""

    name = "fixed_token_score_architectures_test"

    def token_scores(self, s: int) -> torch.Tensor:
        return torch.rand(s, generator=torch.Generator().manual_seed(11))

    def score(self, ctx):
        b, h, s, _ = ctx.keys.shape
        return self.token_scores(s).expand(b, h, s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", PLUGIN_ARCHITECTURES)
def test_positions_after_pruning(arch, impl):
    """Every layer and head evicts the same tokens, so the full cache with those tokens hidden by a 2D mask and
    explicit positions is the exact reference for every step of ``generate`` on the compressed cache."""
    model = model_for(arch, impl)
    n, steps = 32, 6
    ids = random_ids(n, seed=21)
    p = _FixedTokenScorePress(ratio=0.5, n_sink=2, window=4)
    scores = p.token_scores(n).tolist()
    protected = {0, 1, *range(n - 4, n)}
    others = sorted((i for i in range(n) if i not in protected), key=lambda i: -scores[i])
    kept = torch.tensor([i in protected or i in others[: n - n // 2 - len(protected)] for i in range(n)])
    with torch.no_grad(), press(model, p):
        out = model.generate(ids, do_sample=False, max_new_tokens=steps, output_scores=True,
                             return_dict_in_generate=True)
    for idx in full_attention_layers(model.config):
        assert out.past_key_values.layers[idx].compressed_length == int(kept.sum()) == n - n // 2
    reference, shifted = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        for cache in (reference, shifted):
            model(ids, **{CACHE_KWARG: cache})
        for step in range(steps - 1):
            token = out.sequences[:, n + step : n + step + 1]
            mask = torch.cat([kept.long(), torch.ones(step + 1, dtype=torch.long)])[None]
            logits = model(token, attention_mask=mask, position_ids=torch.tensor([[n + step]]),
                           **{CACHE_KWARG: reference}).logits[0, -1]
            torch.testing.assert_close(out.scores[step + 1][0], logits, atol=1e-5, rtol=0)
            # positions counted from the kept entries instead would give other logits: the check can tell
            wrong = model(token, attention_mask=mask, position_ids=torch.tensor([[int(kept.sum()) + step]]),
                          **{CACHE_KWARG: shifted}).logits[0, -1]
            assert not torch.allclose(wrong, logits, atol=1e-3)


def test_plugin_families_come_from_entry_points_and_the_core_never_imports_them():
    """GPT-NeoX and OLMo2 are declared as entry points of the group ``kvpress_like`` and loaded as plugins (listed with
    their hook); with third-party plugins disabled the core works without ever importing them and names the hook."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split(f"[project.entry-points.{kvpress_like.registry.PROJECT}]\n", 1)[1].split("\n\n", 1)[0]
    declared = dict(line.replace('"', "").split(" = ") for line in section.splitlines())
    assert declared == {"gpt_neox": "kvpress_like.plugins.gpt_neox", "olmo2": "kvpress_like.plugins.olmo2"}
    probe = r"""
import json, sys
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
import kvpress_like
out = {"architectures": list(kvpress_like.list_architectures()), "plugins": kvpress_like.list_plugins()}
model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()
try:
    with kvpress_like.press(model, kvpress_like.KnormPress(ratio=0.5)):
        model(torch.ones(1, 8, dtype=torch.long))
    out["error"] = None
except ValueError as error:
    out["error"] = str(error)
out["imported"] = sorted(m for m in sys.modules if m in ("kvpress_like.plugins.gpt_neox", "kvpress_like.plugins.olmo2"))
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != kvpress_like.registry.DISABLE_ENV}
    runs = {}
    for disabled in (False, True):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                                env={**env, kvpress_like.registry.DISABLE_ENV: "1"} if disabled else env,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        runs[disabled] = json.loads(result.stdout.strip().splitlines()[-1])
    enabled = runs[False]
    assert {"gpt_neox", "olmo2"} <= set(enabled["architectures"])
    loaded = {p["name"]: p for p in enabled["plugins"]}
    for name in ("gpt_neox", "olmo2"):  # loaded from the entry point: it has the distribution's version
        assert loaded[name]["hooks"] == ["register_architectures"]
        assert loaded[name]["version"] == kvpress_like.__version__
    assert enabled["error"] is None and enabled["imported"] == ["kvpress_like.plugins.gpt_neox",
                                                                "kvpress_like.plugins.olmo2"]
    disabled = runs[True]
    assert "gpt_neox" not in disabled["architectures"] and "olmo2" not in disabled["architectures"]
    assert disabled["imported"] == []
    assert "unsupported model type 'gpt_neox'" in disabled["error"] and "register_architectures" in disabled["error"]


# -- every registered press on the plugin families ---------------------------------------------------------------------
UNPADDED_ONLY = ("fastkv",)  # token propagation keeps as many tokens in every row: rows of equal length only


@pytest.mark.parametrize("name", [n for n in kvpress_like.list_presses() if n not in ("calibrated", "decoding")])
@pytest.mark.parametrize("arch", PLUGIN_ARCHITECTURES)
def test_every_registered_press_generates_on_plugin_families(arch, name):
    """Each registered press (its defaults, protected window cut to 8) compresses a left-padded batch of two prompts
    (40 and 29 real tokens; equal rows for presses that need them) and generates 3 tokens: positions stay logical,
    no layer keeps more KV pairs than the context's real ones and the model keeps fewer. (``calibrated`` needs a
    calibration fitted for the model; ``decoding`` is checked below.)"""
    model = model_for(arch)
    lengths = (40, 40) if name in UNPADDED_ONLY else (40, 29)
    ids, mask = left_pad([random_ids(n, seed=30 + row)[0] for row, n in enumerate(lengths)])
    p = kvpress_like.create_press(name, ratio=0.5)
    if p.window > 8:
        p = kvpress_like.create_press(name, ratio=0.5, window=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kvzip: no tokenizer for a tiny model
        with torch.no_grad(), press(model, p):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 40 + 3)
    assert out.cache.get_seq_length() == 40 + 2
    real = sum(lengths) * kv_heads(model.config)  # the context's real KV pairs of one layer
    kept_per_layer = []
    for idx in full_attention_layers(model.config):
        kept, total = out.cache.layers[idx].kept_entries()
        assert total == 2 * kv_heads(model.config) * 40
        assert 0 < kept <= real, f"layer {idx} kept {kept} of {real}"
        kept_per_layer.append(kept)
    assert sum(kept_per_layer) < real * len(kept_per_layer)  # (a head policy may keep a whole layer, not all)


@pytest.mark.parametrize("arch", PLUGIN_ARCHITECTURES)
def test_decoding_press_and_chunked_prefill_on_plugin_families(arch):
    """Decoding-time compression and chunked prefill read the attention module's inputs through the architecture too
    (GPT-NeoX passes its hidden states positionally and its cache as ``layer_past``)."""
    model = model_for(arch)
    ids = random_ids(40, seed=33)
    with torch.no_grad(), press(model, kvpress_like.DecodingPress(scorer=KnormPress(), target=16, interval=8)):
        out = model.generate(ids, do_sample=False, max_new_tokens=20, return_dict_in_generate=True)
    for layer in out.cache.layers:
        assert 16 <= layer.keys.shape[2] < 24 and layer.get_seq_length() == 40 + 19
    cache = kvpress_like.chunked_prefill(model, KnormPress(ratio=0.5), ids, chunk_size=16)
    assert [layer.keys.shape[2] for layer in cache.layers] == [20] * model.config.num_hidden_layers
    assert cache.get_seq_length() == 40


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
