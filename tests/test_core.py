"""The prefill flow score -> allocate -> select -> store, checked against a run without a press.

Kept entries are identified by matching the compressed layer's key vectors against the full cache of a run without
a press (the prefill itself is unchanged by the press, so the full keys are bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import ARCHITECTURES, cached_tiny_model, full_attention_layers, prefill, random_ids, torch_threads

from kvpress_like import (
    CompressedLayer,
    KnormPress,
    LayerContext,
    Press,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    create_press,
    list_presses,
)


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


# -- helpers -----------------------------------------------------------------------------------------------------------
@dataclass
class RecordingKnorm(KnormPress):
    """KnormPress that records the scores it returns, per layer."""

    records: dict = field(default_factory=dict, repr=False, compare=False)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = super().score(ctx)
        self.records[ctx.layer_idx] = scores.detach().clone()
        return scores


@dataclass
class PerHeadRandomPress(Press):
    """Test scorer: an independent random score per layer, head and token (heads choose differently)."""

    name = "per_head_random_test"
    seed: int = 0
    records: dict = field(default_factory=dict, repr=False, compare=False)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        b, h, s, _ = ctx.keys.shape
        generator = torch.Generator().manual_seed(1000 * self.seed + ctx.layer_idx)
        scores = torch.rand(b, h, s, generator=generator)
        self.records[ctx.layer_idx] = scores.clone()
        return scores




def kept_positions(compressed: torch.Tensor, full: torch.Tensor) -> list[list[list[int]]]:
    """For keys ``[B, H, P, D]`` (compressed) and ``[B, H, S, D]`` (full): the index in ``full`` of every kept vector.

    Every kept vector must equal exactly one full vector of the same row and head.
    """
    result = []
    for b in range(compressed.shape[0]):
        row = []
        for h in range(compressed.shape[1]):
            equal = (compressed[b, h][:, None, :] == full[b, h][None, :, :]).all(-1)  # [P, S]
            assert bool((equal.sum(-1) == 1).all()), "a kept key matches no (or several) original keys"
            row.append(equal.float().argmax(-1).tolist())
        result.append(row)
    return result


def expected_kept(scores: torch.Tensor, n: int, ratio: float, n_sink: int, window: int) -> set[int]:
    """Naive reference for one head: protected tokens plus the best-scored others, up to the budget."""
    protected = set(range(min(n_sink, n))) | set(range(max(n - window, 0), n))
    budget = max(n - math.floor(ratio * n), len(protected))
    others = sorted((i for i in range(n) if i not in protected), key=lambda i: -float(scores[i]))
    chosen = others[: budget - len(protected)]
    # the top-k must not be decided by float noise
    if 0 < len(chosen) < len(others):
        assert float(scores[chosen[-1]]) - float(scores[others[len(chosen)]]) > 1e-6
    return protected | set(chosen)


# -- 2: kept indices are the top-k of the scores plus the protected tokens ---------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("ratio, n_sink, window", [(0.5, 0, 0), (0.6, 2, 3), (0.3, 4, 4), (0.9, 1, 1)])
def test_knorm_keeps_top_scores_plus_protected(arch, ratio, n_sink, window):
    # perturbed norms: Qwen3/Gemma3 k_norm would otherwise give every key the same norm (tied scores)
    model = cached_tiny_model(arch, "sdpa", perturb_norms=True)
    n = 30
    ids = random_ids(n, seed=5, distinct=True)
    full = prefill(model, ids)
    p = RecordingKnorm(ratio=ratio, n_sink=n_sink, window=window)
    cache = prefill(model, ids, p)

    compressible = full_attention_layers(model.config)
    assert sorted(p.records) == compressible  # scored once per compressible layer, never the sliding ones
    for idx in compressible:
        layer, ref = cache.layers[idx], full.layers[idx]
        assert isinstance(layer, CompressedLayer)
        scores = p.records[idx]
        # KnormPress's score is -||k|| of the cached (post-RoPE) keys
        torch.testing.assert_close(scores, -ref.keys.float().norm(dim=-1), rtol=0, atol=1e-6)
        positions = kept_positions(layer.keys, ref.keys)
        for h in range(ref.keys.shape[1]):
            kept = positions[0][h]
            assert kept == sorted(set(kept)), "kept entries must be stored in ascending token order"
            assert set(kept) == expected_kept(scores[0, h], n, ratio, n_sink, window)
            # values travel with their keys
            torch.testing.assert_close(layer.values[0, h], ref.values[0, h, kept], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_heads_select_independently(arch, impl):
    """A scorer with a different score per head: each head keeps its own top-k (same count per head)."""
    model = cached_tiny_model(arch, impl)
    n, ratio, n_sink, window = 28, 0.5, 2, 3
    ids = random_ids(n, seed=6)
    full = prefill(model, ids)
    p = PerHeadRandomPress(ratio=ratio, n_sink=n_sink, window=window, seed=3)
    cache = prefill(model, ids, p)
    differs = False
    for idx in full_attention_layers(model.config):
        positions = kept_positions(cache.layers[idx].keys, full.layers[idx].keys)[0]
        for h, kept in enumerate(positions):
            assert kept == sorted(set(kept))
            assert set(kept) == expected_kept(p.records[idx][0, h], n, ratio, n_sink, window)
        differs |= any(set(kept) != set(positions[0]) for kept in positions)
    assert differs, "random per-head scores should make at least two heads keep different tokens"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_streaming_llm_keeps_sinks_and_most_recent(arch):
    model = cached_tiny_model(arch, "sdpa")
    n = 40
    ids = random_ids(n, seed=7)
    full = prefill(model, ids)
    cache = prefill(model, ids, StreamingLLMPress(ratio=0.75, n_sink=4))
    keep = n - math.floor(0.75 * n)  # 10: 4 sinks + 6 most recent
    for idx in full_attention_layers(model.config):
        for kept in kept_positions(cache.layers[idx].keys, full.layers[idx].keys)[0]:
            assert kept == [0, 1, 2, 3] + list(range(n - (keep - 4), n))


def test_snapkv_keeps_observation_window_and_top_scores():
    """SnapKV through the same flow: the window is protected, the rest is the top-k of its own scores."""

    @dataclass
    class RecordingSnapKV(SnapKVPress):
        records: dict = field(default_factory=dict, repr=False, compare=False)

        def score(self, ctx):
            scores = super().score(ctx)
            self.records[ctx.layer_idx] = scores.clone()
            return scores

    model = cached_tiny_model("llama", "eager", initializer_range=0.2)
    n = 32
    ids = random_ids(n, seed=8)
    full = prefill(model, ids)
    p = RecordingSnapKV(ratio=0.5, window=4)
    cache = prefill(model, ids, p)
    for idx in full_attention_layers(model.config):
        for h, kept in enumerate(kept_positions(cache.layers[idx].keys, full.layers[idx].keys)[0]):
            assert set(range(n - 4, n)) <= set(kept)
            assert set(kept) == expected_kept(p.records[idx][0, h], n, 0.5, 0, 4)


# -- 8: RandomPress is seeded ------------------------------------------------------------------------------------------
def test_random_press_is_deterministic_and_seed_dependent():
    model = cached_tiny_model("llama", "sdpa")
    n = 32
    ids = random_ids(n, seed=9)
    full = prefill(model, ids)

    def kept(seed):
        cache = prefill(model, ids, RandomPress(ratio=0.5, seed=seed))
        return [kept_positions(cache.layers[i].keys, full.layers[i].keys) for i in full_attention_layers(model.config)]

    first, second = kept(0), kept(0)
    assert first == second
    # and the kept set is a real random subset: not simply the first or last tokens
    flat = [pos for layer in first for head in layer[0] for pos in head]
    assert len(set(flat)) > n // 2
    assert kept(1) != first
    assert kept(2) != kept(1)


def test_random_press_gives_identical_caches_across_calls():
    """Two prefills of the same input with the same seed produce bit-identical compressed caches."""
    model = cached_tiny_model("qwen2", "sdpa")
    ids = random_ids(20, seed=10)
    cache_a = prefill(model, ids, RandomPress(ratio=0.5, seed=7))
    cache_b = prefill(model, ids, RandomPress(ratio=0.5, seed=7))
    for a, b in zip(cache_a.layers, cache_b.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.valid, b.valid)


# -- press objects -----------------------------------------------------------------------------------------------------
def test_builtin_presses_are_registered_and_round_trip():
    names = list_presses()
    for name in ("knorm", "random", "snapkv", "streaming_llm"):
        assert name in names
    original = create_press("snapkv", ratio=0.25, window=8, n_sink=1)
    assert isinstance(original, SnapKVPress)
    description = original.to_dict()
    assert description["press"] == "snapkv" and description["ratio"] == 0.25
    name = description.pop("press")
    assert create_press(name, **description) == original


def test_protected_mask_counts_real_tokens_only():
    p = KnormPress(ratio=0.5, n_sink=2, window=3)
    valid = torch.tensor([[False, False, True, True, True, True, True, True, True], [True] * 9])
    protected = p.protected_mask(valid)
    assert protected[0].tolist() == [False, False, True, True, False, False, True, True, True]
    assert protected[1].tolist() == [True, True, False, False, False, False, True, True, True]
