"""Every registered press, end to end, on tiny models of all six architectures.

Parametrised over ``kvpress_like.list_presses()``, so a press registered later joins automatically. Each case
generates 3 tokens for a batch of 2 left-padded prompts (<= 48 tokens) at ratio 0.5, then checks the cache: every
compressible layer holds exactly the expected number of entries per row, every kept entry is one of the row's real
(non-padding) context entries, and layers that must not be compressed (Gemma3 sliding-window layers) are untouched.
Kept indices are recovered black-box, by matching the kept keys against a run without press.

ChunkKV with ``reuse_group=2`` must keep identical indices in the layers of one group.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import COMMON, tiny_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import kvpress_like
from kvpress_like import CompressedLayer
from kvpress_like.allocators.base import keep_count

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
LENGTHS = (40, 29)  # real tokens per row: row 1 has 11 leading padding tokens
SEQ = max(LENGTHS)
NEW_TOKENS = 3
RATIO = 0.5

_MODELS: dict = {}
_FULL: dict = {}


def model_for(arch: str, layers: int = 3):
    key = (arch, layers)
    if key not in _MODELS:
        if arch == "gemma3" and layers != 3:
            types = ["sliding_attention"] + ["full_attention"] * (layers - 1)
            config = Gemma3TextConfig(**{**COMMON, "num_hidden_layers": layers}, head_dim=16, sliding_window=8,
                                      layer_types=types)
            config._attn_implementation = "sdpa"
            torch.manual_seed(0)
            model = Gemma3ForCausalLM(config).eval()
        else:
            model = tiny_model(arch, num_hidden_layers=layers)
        _MODELS[key] = model
    return _MODELS[key]


def batch():
    """``(input_ids [2, SEQ], attention_mask [2, SEQ])``: two different prompts, the second left-padded."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, SEQ - n:] = torch.randint(1, 128, (n,), generator=generator)
        mask[row, SEQ - n:] = 1
    return ids, mask


def full_keys(arch: str, layers: int = 3):
    """Keys of every layer after a plain (no press) prefill of :func:`batch` by ``generate`` (the same code path as the
    pressed runs): list of ``[B, H_kv, SEQ, D]``."""
    key = (arch, layers)
    if key not in _FULL:
        model = model_for(arch, layers)
        ids, mask = batch()
        with torch.no_grad():
            out = generate(model, ids, mask, 1)
        _FULL[key] = [layer.keys[:, :, :SEQ].clone() for layer in out.past_key_values.layers]
    return _FULL[key]


def generate(model, ids, mask, new_tokens: int):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def full_attention_layers(config) -> list[int]:
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def make_press(name: str, **kwargs):
    """``create_press(name, ratio=0.5)``, with the protected window cut to 8 so that 29-40 tokens are compressed."""
    p = kvpress_like.create_press(name, ratio=RATIO, **kwargs)
    if p.window > 8:
        p = kvpress_like.create_press(name, ratio=RATIO, window=8, **kwargs)
    return p


def expected_kept(p, n: int) -> int:
    return max(keep_count(n, p.ratio), min(n, p.n_sink + p.window), 1)


def kept_indices(layer: CompressedLayer, full: torch.Tensor) -> list[list[list[int]]]:
    """Kept token indices ``[row][head] -> list`` of the compressed part of ``layer``, found by matching its keys
    against the uncompressed ``full`` keys ``[B, H, S, D]`` (each kept key must equal exactly one full key)."""
    compressed = layer.keys[:, :, :layer.compressed_length]
    out = []
    for b in range(compressed.shape[0]):
        slots = layer.valid[b, :layer.compressed_length].nonzero().flatten()
        rows = []
        for h in range(compressed.shape[1]):
            dist = torch.cdist(compressed[b, h, slots], full[b, h], compute_mode="donot_use_mm_for_euclid_dist")
            best = dist.topk(2, dim=-1, largest=False)
            assert bool((best.values[:, 0] < 1e-5).all()), "a kept key is not one of the context's keys"
            assert bool((best.values[:, 1] > 1e-3).all()), "ambiguous match"
            rows.append(best.indices[:, 0].tolist())
        out.append(rows)
    return out


# razor_attention is a head policy: ragged per-head layers holding a compensation token that is no context key; its
# six-architecture run is tests/test_razor_attention.py::test_every_architecture
HEAD_POLICIES = ("razor_attention",)
# fastkv propagates only selected tokens past its TSP layer and refuses padded batches and sliding-window models (a
# clear error); its runs on five architectures are in tests/test_fastkv.py
UNPADDED_ONLY = ("fastkv",)


@pytest.mark.parametrize("name", [n for n in kvpress_like.list_presses()
                                  if n not in ("decoding", "calibrated", *HEAD_POLICIES, *UNPADDED_ONLY)])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_every_press_keeps_the_expected_entries(arch, name):
    model = model_for(arch)
    ids, mask = batch()
    p = make_press(name)
    with torch.no_grad(), kvpress_like.press(model, p):
        out = generate(model, ids, mask, NEW_TOKENS)
    assert out.sequences.shape == (2, SEQ + NEW_TOKENS)
    cache = out.past_key_values
    compressible = full_attention_layers(model.config)
    full = full_keys(arch)
    want = [expected_kept(p, n) for n in LENGTHS]
    for idx, layer in enumerate(cache.layers):
        if idx not in compressible:
            assert not isinstance(layer, CompressedLayer), f"layer {idx} (sliding window) must not be compressed"
            continue
        assert isinstance(layer, CompressedLayer), f"layer {idx} was not compressed by {name}"
        assert layer.compressed_length == max(want)
        assert layer.physical_length == max(want) + NEW_TOKENS - 1  # the last generated token is never fed back
        assert layer.get_seq_length() == SEQ + NEW_TOKENS - 1
        counts = layer.valid[:, :layer.compressed_length].sum(-1).tolist()
        assert counts == want, f"layer {idx}: kept {counts}, expected {want}"
        assert bool(layer.valid[:, layer.compressed_length:].all())  # appended tokens are real
        for b, rows in enumerate(kept_indices(layer, full[idx])):
            first_real = SEQ - LENGTHS[b]
            for head in rows:
                assert len(set(head)) == want[b] and min(head) >= first_real, (b, sorted(head))


@pytest.mark.parametrize("arch", ARCHS)
def test_chunkkv_reuse_group_keeps_identical_indices_within_a_group(arch):
    model = model_for(arch, layers=4 if arch != "gemma3" else 5)
    ids, mask = batch()
    compressible = full_attention_layers(model.config)
    full = full_keys(arch, model.config.num_hidden_layers)
    results = {}
    for reuse in (1, 2):
        p = kvpress_like.ChunkKVPress(ratio=RATIO, window=4, chunk_size=4, reuse_group=reuse,
                                      scorer=kvpress_like.SnapKVPress(window=8))
        selected = []
        original = p.select
        p.select = lambda ctx, original=original, selected=selected: selected.append(ctx.layer_idx) or original(ctx)
        with torch.no_grad(), kvpress_like.press(model, p):
            cache = generate(model, ids, mask, 1).past_key_values
        kept = {idx: kept_indices(cache.layers[idx], full[idx]) for idx in compressible}
        results[reuse] = (selected, kept)
    # no reuse: every compressed layer selects on its own
    assert results[1][0] == compressible
    # reuse_group=2: only the first compressed layer of each group selects, the others keep its indices
    selected, kept = results[2]
    groups: dict[int, list[int]] = {}
    for idx in compressible:
        groups.setdefault(idx // 2, []).append(idx)
    assert selected == [members[0] for members in groups.values()]
    assert any(len(members) > 1 for members in groups.values())
    for members in groups.values():
        for idx in members[1:]:
            assert kept[idx] == kept[members[0]], f"layers {members[0]} and {idx} of one group keep different tokens"
    # the group leader's choice is its own no-reuse choice
    for members in groups.values():
        assert kept[members[0]] == results[1][1][members[0]]
    # every head of a layer keeps the same tokens, as whole chunks plus the window
    for idx in compressible:
        for rows in kept[idx]:
            assert all(sorted(head) == sorted(rows[0]) for head in rows)
