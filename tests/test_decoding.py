"""DecodingPress: the cache of every compressible layer stays within ``[target, target + interval)`` while decoding.

The expected physical size after every forward is simulated here from the documented rule alone: after a forward
that leaves ``target + interval`` entries or more, the layer is cut back to ``target``. Logical length (tokens seen,
``cache.get_seq_length()``) grows by one per step whatever the compression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import cached_tiny_model, full_attention_layers, left_pad, random_ids, torch_threads
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import kvpress_like
from kvpress_like import (
    CompactorPress,
    CompressedLayer,
    DecodingPress,
    ExpectedAttentionPress,
    KnormPress,
    LeverageScorePress,
    ObservedAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
    create_press,
    list_presses,
    press,
    press_from_dict,
)
from kvpress_like.cache import CACHE_KWARG, cache_in
from kvpress_like.registry import get_press_class

T, N = 16, 8  # target, interval
STEPS = 30
LLAMA = dict(arch="llama", initializer_range=0.2)
GEMMA3 = dict(arch="gemma3", initializer_range=0.05, perturb_norms=True)
SCORERS = {
    "knorm": lambda **kw: KnormPress(**kw),
    "snapkv": lambda **kw: SnapKVPress(window=4, **kw),
    "streaming_llm": lambda **kw: StreamingLLMPress(**kw),
}


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def physical(layer) -> int:
    return layer.keys.shape[2]


def expected_sizes(prefill_kept: int, steps: int, target: int = T, interval: int = N) -> list[int]:
    """Physical size after the prefill and after each of ``steps`` decoding forwards, by the documented rule."""
    sizes, size = [], prefill_kept
    for step in range(steps + 1):
        size += step > 0
        if size >= target + interval:
            size = target
        sizes.append(size)
    return sizes


class CacheRecorder:
    """Forward hook on the whole model: after every forward, the logical length and the physical size of every layer."""

    def __init__(self, model):
        self.model, self.records = model, []

    def _after(self, module, args, kwargs, output):
        cache = cache_in(kwargs)
        self.records.append((cache.get_seq_length(), [physical(layer) for layer in cache.layers],
                             [type(layer) for layer in cache.layers]))

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self._after, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def check_records(records, model, context_length: int, prefill_kept: int, target: int = T, interval: int = N):
    layers = full_attention_layers(model.config)
    sizes = expected_sizes(prefill_kept, len(records) - 1, target, interval)
    reached = dict.fromkeys(layers, False)  # the layer has held `target` entries or more
    for step, (seen, sizes_now, _) in enumerate(records):
        assert seen == context_length + step, f"logical length after step {step}"
        for idx in layers:
            assert sizes_now[idx] == sizes[step], f"layer {idx} after step {step}: {sizes_now[idx]} != {sizes[step]}"
            # The documented bounds, independently of the simulation: never target + interval entries or more, and
            # never fewer than target once the layer held target entries.
            assert sizes_now[idx] <= seen and sizes_now[idx] < target + interval
            assert not reached[idx] or sizes_now[idx] >= target
            reached[idx] |= sizes_now[idx] >= target
    for idx in set(range(model.config.num_hidden_layers)) - set(layers):  # sliding layers: untouched, own window
        assert all(types[idx] is DynamicSlidingWindowLayer for _, _, types in records)
        assert all(sizes_now[idx] <= model.config.sliding_window for _, sizes_now, _ in records)


def greedy_manual(model, p, context_ids: torch.Tensor, steps: int, cache: DynamicCache) -> list[int]:
    """Prefill, then ``steps - 1`` single-token forwards with argmax (eos masked, as ``min_new_tokens`` does)."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    generated, step_input = [], context_ids
    with press(model, p), torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=step_input, **{CACHE_KWARG: cache}, use_cache=True).logits[0, -1]
            logits[eos] = -math.inf
            generated.append(int(logits.argmax()))
            step_input = torch.tensor([[generated[-1]]])
    return generated


def greedy_generate(model, p, context_ids: torch.Tensor, steps: int, cache: DynamicCache | None = None) -> list[int]:
    cache = DynamicCache(config=model.config) if cache is None else cache
    kwargs = dict(attention_mask=torch.ones_like(context_ids), **{CACHE_KWARG: cache}, max_new_tokens=steps,
                  min_new_tokens=steps, do_sample=False)
    if p is None:
        with torch.no_grad():
            out = model.generate(context_ids, **kwargs)
    else:
        with press(model, p):
            out = model.generate(context_ids, **kwargs)
    return out[0, context_ids.shape[1]:].tolist()


# -- bounds ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context_length", [10, 40], ids=["short_context", "long_context"])
@pytest.mark.parametrize("scorer", list(SCORERS))
@pytest.mark.parametrize("model_spec", [LLAMA, GEMMA3], ids=["llama", "gemma3"])
def test_bounds_in_a_manual_loop_and_in_generate(model_spec, scorer, context_length):
    model = cached_tiny_model(**model_spec)
    context_ids = random_ids(context_length, seed=3, distinct=True)
    prefill_kept = context_length if context_length < T + N else T

    manual_cache = DynamicCache(config=model.config)
    with CacheRecorder(model) as recorder:
        manual = greedy_manual(model, DecodingPress(scorer=SCORERS[scorer](), target=T, interval=N), context_ids,
                               STEPS, manual_cache)
    check_records(recorder.records, model, context_length, prefill_kept)
    assert len(recorder.records) == STEPS

    with CacheRecorder(model) as recorder:
        generated = greedy_generate(model, DecodingPress(scorer=SCORERS[scorer](), target=T, interval=N),
                                    context_ids, STEPS)
    check_records(recorder.records, model, context_length, prefill_kept)
    assert len(recorder.records) == STEPS
    # Both paths see the same positions and masks, so they generate the same tokens.
    assert generated == manual
    # The cache really was compressed (not only reported so): the layers are compressed layers after the first cut.
    assert any(isinstance(layer, CompressedLayer) for layer in manual_cache.layers)


def test_compression_changes_generation():
    """Sanity check: with these settings the decoding press does change the generated tokens."""
    model = cached_tiny_model(**LLAMA)
    context_ids = random_ids(40, seed=3, distinct=True)
    full = greedy_generate(model, None, context_ids, STEPS)
    for scorer in SCORERS.values():
        assert greedy_generate(model, DecodingPress(scorer=scorer(), target=T, interval=N), context_ids, STEPS) != full


@pytest.mark.parametrize("scorer", list(SCORERS))
@pytest.mark.parametrize("model_spec", [LLAMA, GEMMA3], ids=["llama", "gemma3"])
def test_target_larger_than_the_sequence_equals_no_press(model_spec, scorer):
    model = cached_tiny_model(**model_spec)
    context_ids = random_ids(40, seed=4, distinct=True)
    expected = greedy_generate(model, None, context_ids, STEPS)
    cache = DynamicCache(config=model.config)
    assert greedy_generate(model, DecodingPress(scorer=SCORERS[scorer](), target=40 + STEPS, interval=4), context_ids,
                           STEPS, cache) == expected
    assert not any(isinstance(layer, CompressedLayer) for layer in cache.layers)


@pytest.mark.parametrize("scorer", ["knorm", "snapkv"])
def test_compress_prefill_then_decode_within_bounds(scorer):
    model = cached_tiny_model(**LLAMA)
    n, target, interval = 60, 32, 8
    context_ids = random_ids(n, seed=5, distinct=True)
    kept = n - math.floor(0.5 * n)
    assert kept < target  # so the prefill compression is visible before any decoding-time cut
    layers = full_attention_layers(model.config)
    # The prefill alone, with the scorer as a plain press, is the reference for the kept entries.
    reference = DynamicCache(config=model.config)
    with press(model, SCORERS[scorer](ratio=0.5)), torch.no_grad():
        model(context_ids, **{CACHE_KWARG: reference})
    p = DecodingPress(scorer=SCORERS[scorer](ratio=0.5), target=target, interval=interval, compress_prefill=True)
    cache = DynamicCache(config=model.config)
    with CacheRecorder(model) as recorder:
        greedy_generate(model, p, context_ids, STEPS, cache)
    seen, sizes, _ = recorder.records[0]
    assert seen == n and all(sizes[idx] == kept for idx in layers)
    check_records(recorder.records, model, n, kept, target, interval)
    # The first cut happens after target + interval - kept decoding steps.
    assert [s[layers[0]] for _, s, _ in recorder.records][: target + interval - kept + 1] == list(
        range(kept, target + interval)) + [target]

    without = DynamicCache(config=model.config)
    with CacheRecorder(model) as recorder:
        greedy_generate(model, DecodingPress(scorer=SCORERS[scorer](ratio=0.5), target=target, interval=interval),
                        context_ids, 1, without)
    assert recorder.records[0][1][layers[0]] == target  # compress_prefill=False: only the decoding rule applies


def test_compress_prefill_keeps_what_the_scorer_keeps():
    model = cached_tiny_model(**LLAMA)
    context_ids = random_ids(60, seed=5, distinct=True)
    reference = DynamicCache(config=model.config)
    with press(model, SnapKVPress(window=4, ratio=0.5)), torch.no_grad():
        model(context_ids, **{CACHE_KWARG: reference})
    cache = DynamicCache(config=model.config)
    with press(model, DecodingPress(scorer=SnapKVPress(window=4, ratio=0.5), target=40, interval=8,
                                    compress_prefill=True)), torch.no_grad():
        model(context_ids, **{CACHE_KWARG: cache})
    for a, b in zip(reference.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@dataclass
class RecordingSnapKV(SnapKVPress):
    """SnapKV that records, for layer 0, the hidden states and RoPE tables it is given."""

    calls: list = field(default_factory=list, repr=False, compare=False)

    def score(self, ctx):
        if ctx.layer_idx == 0:
            self.calls.append((ctx.hidden_states.detach().clone(), ctx.position_embeddings[0].detach().clone(),
                               ctx.keys.shape[2]))
        return super().score(ctx)


def test_window_scorer_sees_the_latest_tokens():
    """At a decoding-time cut, SnapKV's observation window is the last ``window`` tokens at their true positions:
    layer 0's attention input is norm(embedding) of those tokens, whatever the cache holds."""
    model = cached_tiny_model(**LLAMA)
    context_ids = random_ids(20, seed=12, distinct=True)
    scorer = RecordingSnapKV(window=4)
    cache = DynamicCache(config=model.config)
    generated = greedy_manual(model, DecodingPress(scorer=scorer, target=T, interval=N), context_ids, STEPS, cache)
    fed = torch.cat([context_ids[0], torch.tensor(generated[:-1])])  # every token that went through the model
    cuts = expected_sizes(20, STEPS - 1)
    cut_steps = [step for step in range(1, STEPS) if cuts[step] == T]
    assert len(scorer.calls) == len(cut_steps) >= 2
    for (hidden, cos, stored), step in zip(scorer.calls, cut_steps):
        seen = 20 + step
        assert stored == T + N
        window = fed[seen - 4: seen]
        with torch.no_grad():
            expected = model.model.layers[0].input_layernorm(model.model.embed_tokens(window))[None]
            positions = torch.arange(seen - 4, seen)[None]
            expected_cos, _ = model.model.rotary_emb(expected, positions)
        torch.testing.assert_close(hidden, expected)
        torch.testing.assert_close(cos, expected_cos)


def test_ragged_prefill_is_refused_by_decoding_compression():
    model = cached_tiny_model(**LLAMA)
    p = DecodingPress(scorer=KnormPress(ratio=0.5, allocator="head_adaptive"), target=8, interval=4,
                      compress_prefill=True)
    with pytest.raises(ValueError, match="needs dense layers"):
        greedy_generate(model, p, random_ids(40, seed=6, distinct=True), 3)
    assert kvpress_like.context.active_press(model) is None  # the press was removed on the error


# -- construction errors -----------------------------------------------------------------------------------------------
def decoding_capable() -> set[str]:
    wrappers = ("decoding", "calibrated")
    return {name for name in list_presses() if name not in wrappers and get_press_class(name).supports_decoding}


@pytest.mark.parametrize(
    "scorer",
    [CompactorPress(), LeverageScorePress(), ObservedAttentionPress(), ExpectedAttentionPress(), "compactor"],
    ids=["compactor", "leverage", "observed_attention", "expected_attention", "compactor_by_name"],
)
def test_scorer_without_decoding_support_is_refused(scorer):
    with pytest.raises(ValueError, match="cannot score while decoding") as info:
        DecodingPress(scorer=scorer, target=T, interval=N)
    message = str(info.value)
    usable = message.split("use one of:")[1]
    assert {name.strip() for name in usable.split(",")} == decoding_capable()
    assert "CompactorPress" in message or not isinstance(scorer, (CompactorPress, str))


def test_every_decoding_capable_scorer_is_accepted():
    assert decoding_capable() >= {"knorm", "snapkv", "streaming_llm"}
    for name in decoding_capable():
        scorer = create_press(name)
        target = max(T, scorer.n_sink + scorer.window)
        assert isinstance(DecodingPress(scorer=name, target=target, interval=N).scorer, get_press_class(name))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ratio=0.5), ValueError, "no ratio of its own"),
        (dict(compression_ratio=0.5), ValueError, "no ratio of its own"),
        (dict(target=0), ValueError, "target must be a positive int"),
        (dict(target=True), ValueError, "target must be a positive int"),
        (dict(interval=0), ValueError, "interval must be a positive int"),
        (dict(interval=2.0), ValueError, "interval must be a positive int"),
        (dict(scorer=42), TypeError, "scorer must be a Press"),
        (dict(scorer="no_such_press"), ValueError, "unknown press"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DecodingPress(**kwargs)


def test_create_press_decoding_by_name():
    p = create_press("decoding", scorer="snapkv", target=64)
    assert isinstance(p, DecodingPress) and isinstance(p.scorer, SnapKVPress)
    assert (p.target, p.interval, p.compress_prefill, p.ratio) == (64, 64, False, 0.0)
    assert press_from_dict(p.to_dict()) == p
    model = cached_tiny_model(**LLAMA)
    n = 140  # >= target + interval: cut to the target right after the prefill
    with CacheRecorder(model) as recorder:
        greedy_generate(model, p, random_ids(n, seed=7), 5)
    check_records(recorder.records, model, n, 64, target=64, interval=64)


# -- ratio 0 is no press -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [name for name in list_presses() if name not in ("decoding", "calibrated")])
def test_ratio_zero_equals_no_press(name):
    model = cached_tiny_model(**LLAMA)
    context_ids = random_ids(40, seed=8)
    expected = greedy_generate(model, None, context_ids, 8)
    cache = DynamicCache(config=model.config)
    assert greedy_generate(model, create_press(name, ratio=0), context_ids, 8, cache) == expected
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    assert cache.get_seq_length() == 40 + 8 - 1


# -- known bugs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["streaming_llm", "snapkv"])
def test_left_padded_batch_rows_decode_as_alone(scorer):
    model = cached_tiny_model(**LLAMA)
    long, short = random_ids(40, seed=9, distinct=True)[0], random_ids(30, seed=10, distinct=True)[0]
    ids, mask = left_pad([long, short])

    def run(input_ids, attention_mask):
        cache = DynamicCache(config=model.config)
        with press(model, DecodingPress(scorer=SCORERS[scorer](), target=T, interval=N)):
            out = model.generate(input_ids, attention_mask=attention_mask, **{CACHE_KWARG: cache}, max_new_tokens=20,
                                 min_new_tokens=20, do_sample=False, pad_token_id=0)
        return out[:, input_ids.shape[1]:].tolist()

    batched = run(ids, mask)
    assert batched[0] == run(long[None], torch.ones(1, 40, dtype=torch.long))[0]  # the unpadded row is fine
    assert batched[1] == run(short[None], torch.ones(1, 30, dtype=torch.long))[0]


def test_target_below_protected_tokens_is_rejected():
    with pytest.raises(ValueError, match="at least the scorer's protected tokens"):
        create_press("decoding", scorer="snapkv", target=32, interval=8)


# -- run state lives on the cache, not on the press --------------------------------------------------------------------
@pytest.mark.parametrize("batch_b", [1, 2])
def test_one_press_decoding_two_caches_alternately_gives_each_its_own_result(batch_b):
    """One DecodingPress decoding two caches in turn (batch sizes 1 and 1 or 2) gives each cache exactly what it gets
    decoded alone: the window scorer's recent tokens belong to each cache, not to the press."""
    model = cached_tiny_model(**LLAMA)
    ids_a = random_ids(20, seed=21, distinct=True)
    ids_b = random_ids(24, batch=batch_b, seed=22, distinct=True)
    steps = 2 * (T + N)  # several decoding-time cuts

    def step_inputs(cache, ids):
        logits = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1]
        return logits.argmax(-1, keepdim=True)

    def alone(ids):
        cache, out, step_input = DynamicCache(config=model.config), [], ids
        with press(model, DecodingPress(scorer=SnapKVPress(window=4), target=T, interval=N)), torch.no_grad():
            for _ in range(steps):
                step_input = step_inputs(cache, step_input)
                out.append(step_input)
        return torch.cat(out, dim=1), cache

    expected_a, cache_a_alone = alone(ids_a)
    expected_b, cache_b_alone = alone(ids_b)
    p = DecodingPress(scorer=SnapKVPress(window=4), target=T, interval=N)
    cache_a, cache_b = DynamicCache(config=model.config), DynamicCache(config=model.config)
    out_a, out_b, in_a, in_b = [], [], ids_a, ids_b
    with press(model, p), torch.no_grad():
        for _ in range(steps):
            in_a = step_inputs(cache_a, in_a)
            in_b = step_inputs(cache_b, in_b)
            out_a.append(in_a)
            out_b.append(in_b)
    assert torch.equal(torch.cat(out_a, dim=1), expected_a)
    assert torch.equal(torch.cat(out_b, dim=1), expected_b)
    for mixed, reference in ((cache_a, cache_a_alone), (cache_b, cache_b_alone)):
        for layer, ref in zip(mixed.layers, reference.layers):
            assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
