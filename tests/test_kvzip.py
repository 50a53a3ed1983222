"""KVzip: scores against a naive reference written from the paper, the cache after compression, errors.

The reference runs the model *without* any press on a copy of the full prefilled cache, with eager attention and
``output_attentions=True``, over the reconstruction input written out by hand (repeat instruction, the previous chunk's
last tokens, the chat template's assistant header, then the chunk), and takes for every context entry of the chunk
the largest weight over the query heads of its group and over the reconstruction queries (the paper's definition).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import cached_tiny_model, left_pad, random_ids, tiny_model
from tiny_tokenizer import make_tokenizer
from transformers import DynamicCache

from kvpress_like import CompressedLayer, RaggedLayer, press
from kvpress_like.allocators.base import Allocator, keep_count
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.compressors.kvzip import KVzipPress, reconstruction_scores

LLAMA = dict(arch="llama", initializer_range=0.2)
INSTRUCTION = "Repeat the previous context exactly."
CONTINUATION = "Repeat the part of the previous context exactly, starting with"


class RecordingAllocator(Allocator):
    """Model-scope allocator that records the scores it is given and keeps every entry."""

    name = "recording"
    scope = "model"

    def __init__(self):
        self.scores = None

    def allocate_model(self, scores, valid, protected, ratio, layers):
        self.scores = [s.clone() for s in scores]
        n = valid.sum(-1)
        return [n[:, None].expand(s.shape[0], s.shape[1]).clone() for s in scores]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(chat_template=True).save_pretrained(path)
    return str(path)


def reference_scores(model, tokenizer, ids: torch.Tensor, chunk: int, overlap: int) -> list[torch.Tensor]:
    """Per layer ``[H_kv, N]``: max attention each context entry gets from its chunk's reconstruction queries."""
    n = ids.shape[1]
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    full = DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: full})
    tokens = ids[0].tolist()
    postfix = "<|im_end|>\n<|im_start|>assistant\n"  # the tiny chat template after a user message
    scores = [torch.zeros(cfg.num_key_value_heads, n) for _ in range(cfg.num_hidden_layers)]
    for start in range(0, n, chunk):
        part = tokens[start:start + chunk]
        if start == 0:
            prompt = tokenizer("\n\n" + INSTRUCTION, add_special_tokens=False)["input_ids"]
        else:
            prompt = tokenizer("\n\n" + CONTINUATION, add_special_tokens=False)["input_ids"]
            prompt = prompt + tokens[max(0, start - overlap):start]
        prompt = prompt + tokenizer(postfix, add_special_tokens=False)["input_ids"]
        rep = torch.tensor([prompt + part])
        with torch.no_grad():
            out = model(rep, **{CACHE_KWARG: copy.deepcopy(full)}, output_attentions=True)
        for layer, attn in enumerate(out.attentions):  # [1, H_q, R, N + R]
            weights = attn[0, :, :, start:start + len(part)]  # [H_q, R, chunk]
            for h in range(cfg.num_key_value_heads):
                group = weights[h * groups:(h + 1) * groups]
                scores[layer][h, start:start + len(part)] = group.amax(dim=(0, 1))
    return scores


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scores_match_the_naive_reference(arch, tokenizer_dir):
    model = tiny_model(arch, attn_implementation="eager", initializer_range=0.2)
    ids = random_ids(40, seed=1)
    tokenizer = make_tokenizer(chat_template=True)
    expected = reference_scores(model, tokenizer, ids, chunk=16, overlap=3)
    recorder = RecordingAllocator()
    p = KVzipPress(ratio=0.5, allocator=recorder, n_sink=0, chunk_size=16, overlap=3, tokenizer=tokenizer_dir)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **{CACHE_KWARG: cache})
    assert recorder.scores is not None and len(recorder.scores) == len(expected)
    for got, want in zip(recorder.scores, expected):
        assert got.shape == (1, model.config.num_key_value_heads, 40)
        torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-6)
    assert all(float(s.max()) > 0.05 for s in expected)  # the comparison is not between two near-zero tensors


def naive_scores(queries, keys, key_valid, query_valid, scaling):
    """One query and one query head at a time, with plain Python loops over the allowed keys."""
    b, h_q, r, _ = queries.shape
    h_kv, total = keys.shape[1], keys.shape[2]
    n, groups = total - r, h_q // h_kv
    out = torch.zeros(b, h_kv, n, dtype=torch.float64)
    for row in range(b):
        for hq in range(h_q):
            for i in range(r):
                if not query_valid[row, i]:
                    continue
                allowed = [j for j in range(total) if key_valid[row, j] and (j < n or j - n <= i)]
                if not allowed:
                    continue
                logits = torch.stack([(queries[row, hq, i].double() @ keys[row, hq // groups, j].double()) * scaling
                                      for j in allowed])
                weights = torch.softmax(logits, dim=0)
                for w, j in zip(weights, allowed):
                    if j < n:
                        out[row, hq // groups, j] = max(out[row, hq // groups, j], w)
    return out


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h_kv=st.integers(1, 2), groups=st.integers(1, 3), n=st.integers(1, 9),
       r=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_reconstruction_scores_equal_a_loop_reference(b, h_kv, groups, n, r, seed):
    generator = torch.Generator().manual_seed(seed)
    d = 4
    queries = torch.randn(b, h_kv * groups, r, d, generator=generator)
    keys = torch.randn(b, h_kv, n + r, d, generator=generator)
    key_valid = torch.rand(b, n + r, generator=generator) < 0.8
    query_valid = torch.rand(b, r, generator=generator) < 0.8
    got = reconstruction_scores(queries, keys, key_valid, query_valid, 0.7)
    want = naive_scores(queries, keys, key_valid, query_valid, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bool((got >= 0).all() and (got <= 1).all())
    assert bool((got.masked_select(~key_valid[:, None, :n].expand_as(got)) == 0).all())


def test_scores_in_small_query_blocks_equal_one_block(monkeypatch):
    from kvpress_like.compressors import kvzip

    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(1, 4, 30, 8, generator=generator), torch.randn(1, 2, 70, 8, generator=generator)
    key_valid, query_valid = torch.ones(1, 70, dtype=torch.bool), torch.ones(1, 30, dtype=torch.bool)
    whole = reconstruction_scores(queries, keys, key_valid, query_valid, 0.35)
    monkeypatch.setattr(kvzip, "_SCORE_ELEMENTS", 4 * 70 * 7)  # blocks of 7 queries
    torch.testing.assert_close(reconstruction_scores(queries, keys, key_valid, query_valid, 0.35), whole)


# -- the cache after compression ---------------------------------------------------------------------------------------
def prefill_keys(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    return [layer.keys for layer in cache.layers]


def kept_positions(kept: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Index in ``full`` ``[S, D]`` of every row of ``kept`` ``[P, D]`` (each must match exactly one)."""
    dist = torch.cdist(kept, full, compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.topk(2, dim=-1, largest=False)
    assert bool((best.values[:, 0] < 1e-5).all()), "a kept entry is not one of the context's entries"
    assert bool((best.values[:, 1] > 1e-3).all())
    return best.indices[:, 0].tolist()


def test_generate_keeps_only_context_entries_with_their_logical_length(tokenizer_dir):
    model = cached_tiny_model(**LLAMA)
    n, new = 45, 4
    ids = random_ids(n, seed=2, distinct=True)
    full = prefill_keys(model, ids)
    p = KVzipPress(ratio=0.6, chunk_size=20, tokenizer=tokenizer_dir)
    with torch.no_grad(), press(model, p):
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True)
    assert out.sequences.shape == (1, n + new)
    keep = keep_count(n, 0.6)
    for idx, layer in enumerate(out.past_key_values.layers):
        assert isinstance(layer, CompressedLayer)
        assert layer.compressed_length == keep
        assert layer.get_seq_length() == n + new - 1
        assert layer.physical_length == keep + new - 1  # no reconstruction entry left
        for h in range(layer.keys.shape[1]):
            positions = kept_positions(layer.keys[0, h, :keep], full[idx][0, h])
            assert len(set(positions)) == keep and set(range(4)) <= set(positions)  # the 4 sinks


def test_later_tokens_keep_their_positions(tokenizer_dir):
    model = cached_tiny_model(**LLAMA)
    n = 40
    ids = random_ids(n, seed=3)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, KVzipPress(ratio=0.5, chunk_size=16, tokenizer=tokenizer_dir)):
        model(ids, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == n
    assert all(layer.physical_length == keep_count(n, 0.5) for layer in cache.layers)
    token = random_ids(1, seed=4)
    with torch.no_grad():
        default = model(token, **{CACHE_KWARG: copy.deepcopy(cache)}).logits
        explicit = model(token, position_ids=torch.tensor([[n]]), **{CACHE_KWARG: copy.deepcopy(cache)}).logits
        wrong = model(token, position_ids=torch.tensor([[keep_count(n, 0.5)]]),
                      **{CACHE_KWARG: copy.deepcopy(cache)}).logits
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, wrong, atol=1e-4)  # the check above can fail


def test_head_adaptive_budgets_store_ragged_layers_holding_only_kept_entries(tokenizer_dir):
    model = cached_tiny_model(**LLAMA)
    n = 60
    ids = random_ids(n, seed=5, distinct=True)
    full = prefill_keys(model, ids)
    cache = DynamicCache(config=model.config)
    p = KVzipPress(ratio=0.75, allocator="head_adaptive", chunk_size=32, tokenizer=tokenizer_dir)
    with torch.no_grad(), press(model, p):
        model(ids, **{CACHE_KWARG: cache})
        out = model.generate(torch.cat([ids, random_ids(2, seed=6)], dim=1), **{CACHE_KWARG: cache},
                             max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, n + 2 + 3)
    ragged = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    assert ragged, "head-adaptive budgets gave every head the same count in every layer"
    keep = keep_count(n, 0.75)
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, RaggedLayer):
            continue
        lengths = layer.lengths[0].tolist()
        assert sum(lengths) == keep * len(lengths) and len(set(lengths)) > 1
        assert layer.flat_keys.shape[0] == sum(lengths)  # bytes held = kept entries
        start = 0
        for h, count in enumerate(lengths):
            kept_positions(layer.flat_keys[start:start + count], full[idx][0, h])
            start += count


def test_left_padded_rows_score_as_alone(tokenizer_dir):
    model = cached_tiny_model(**LLAMA)
    rows = [random_ids(30, seed=7)[0], random_ids(22, seed=8)[0]]
    ids, mask = left_pad(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    recorder = RecordingAllocator()
    p = KVzipPress(ratio=0.5, allocator=recorder, n_sink=0, chunk_size=12, tokenizer=tokenizer_dir)
    with torch.no_grad(), press(model, p):
        model(ids, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: DynamicCache(config=model.config)})
    batched = recorder.scores
    for row, tokens in enumerate(rows):
        alone = RecordingAllocator()
        p = KVzipPress(ratio=0.5, allocator=alone, n_sink=0, chunk_size=12, tokenizer=tokenizer_dir)
        with torch.no_grad(), press(model, p):
            model(tokens[None], **{CACHE_KWARG: DynamicCache(config=model.config)})
        for got, want in zip(batched, alone.scores):
            real = got[row, :, ids.shape[1] - len(tokens):]
            torch.testing.assert_close(real, want[0], rtol=1e-4, atol=1e-6)
            assert bool(torch.isinf(got[row, :, :ids.shape[1] - len(tokens)]).all())  # padding: -inf


def test_without_a_tokenizer_it_warns_and_reconstructs_the_chunks_alone():
    model = cached_tiny_model(**LLAMA)
    ids = random_ids(30, seed=9)
    cache = DynamicCache(config=model.config)
    with pytest.warns(UserWarning, match="no tokenizer"), torch.no_grad(), press(model, KVzipPress(ratio=0.5)):
        model(ids, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 30 and cache.layers[0].physical_length == keep_count(30, 0.5)


def test_gemma3_sliding_layers_are_restored_after_reconstruction(tokenizer_dir):
    model = cached_tiny_model(arch="gemma3", initializer_range=0.05, perturb_norms=True)
    ids = random_ids(30, seed=10)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: plain})
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, KVzipPress(ratio=0.5, chunk_size=16, tokenizer=tokenizer_dir)):
        model(ids, **{CACHE_KWARG: cache})
    torch.testing.assert_close(cache.layers[0].keys, plain.layers[0].keys, rtol=0, atol=0)
    assert cache.layers[0].get_seq_length() == plain.layers[0].get_seq_length()
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers[1:])


# -- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.5), "chunk_size"), (dict(overlap=-1), "overlap"),
    (dict(instruction=3), "instruction"), (dict(tokenizer=3), "tokenizer"),
])
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        KVzipPress(ratio=0.5, **kwargs)


def test_missing_tokenizer_dir_is_an_error(tmp_path):
    model = cached_tiny_model(**LLAMA)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        with press(model, KVzipPress(ratio=0.5, tokenizer=str(tmp_path / "none"))):
            pytest.fail("the block must not run")


def test_sliding_window_compressible_layers_are_refused():
    model = tiny_model("mistral_sliding")
    with pytest.raises(ValueError, match="sliding-window"):
        with press(model, KVzipPress(ratio=0.5)):
            pytest.fail("the block must not run")


def test_inputs_embeds_prefill_is_refused(tokenizer_dir):
    model = cached_tiny_model(**LLAMA)
    embeds = model.get_input_embeddings()(random_ids(20, seed=11))
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad():
        with press(model, KVzipPress(ratio=0.5, tokenizer=tokenizer_dir)):
            model(inputs_embeds=embeds, **{CACHE_KWARG: DynamicCache(config=model.config)})


def test_score_and_select_alone_explain_how_to_use_the_press():
    with pytest.raises(ValueError, match="reconstruction"):
        KVzipPress(ratio=0.5).score(None)
    with pytest.raises(ValueError, match="reconstruction"):
        KVzipPress(ratio=0.5).select(None)


def test_prefill_is_never_rerun_only_the_reconstruction_inputs(tokenizer_dir):
    """The extra forwards see only reconstruction inputs (instruction + chunk, never the whole context again)."""
    model = cached_tiny_model(**LLAMA)
    n, chunk = 50, 20
    lengths = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad(), press(model, KVzipPress(ratio=0.5, chunk_size=chunk, tokenizer=tokenizer_dir)):
            model(random_ids(n, seed=12), **{CACHE_KWARG: DynamicCache(config=model.config)})
    finally:
        handle.remove()
    tokenizer = make_tokenizer()
    first = len(tokenizer("\n\n" + INSTRUCTION, add_special_tokens=False)["input_ids"])
    later = len(tokenizer("\n\n" + CONTINUATION, add_special_tokens=False)["input_ids"])
    post = len(tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    assert lengths == [n, first + post + chunk, later + 8 + post + chunk, later + 8 + post + n - 2 * chunk]
    assert math.ceil(n / chunk) == len(lengths) - 1


def test_registered_and_round_trips_through_json():
    import json

    from kvpress_like import create_press, list_presses

    assert "kvzip" in list_presses()
    original = create_press("kvzip", ratio=0.75, allocator="head_adaptive", chunk_size=512, tokenizer="/some/dir")
    description = json.loads(json.dumps(original.to_dict()))
    assert description["press"] == "kvzip" and description["chunk_size"] == 512
    assert create_press(description.pop("press"), **description) == original
