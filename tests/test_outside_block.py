"""A compressed cache is a self-contained object: after the ``with press(model, p):`` block it gives the same results
as inside (next forward, greedy ``generate``; also loaded with ``load_cache`` in a process that never entered a press)
with the attention kvpress_like registers by name (``kvpress_like_sdpa`` / ``kvpress_like_eager``), and with
transformers' plain sdpa/eager it either gives the same results or raises a clear error, never different ones.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_models import cached_tiny_model, left_pad, random_ids, torch_threads
from transformers import DynamicCache, QuantizedCache

from kvpress_like import KnormPress, RaggedLayer, press, save_cache
from kvpress_like.cache import CACHE_KWARG, CompressedLayer, QuantizedCompressedLayer, SlidingCompressedLayer

TESTS_DIR = Path(__file__).resolve().parent
INIT = dict(initializer_range=0.2)
ALLOCATORS = ("uniform", "head_adaptive", "kvcompose", "pyramid")
ATOL = 1e-5
NEW = 4


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def context(kind: str):
    """``(ids [B, S], mask [B, S])``: one row, or three left-padded rows of different lengths."""
    if kind == "single":
        ids = random_ids(40, seed=1)
        return ids, torch.ones_like(ids)
    return left_pad([random_ids(40, seed=1)[0], random_ids(23, seed=2)[0], random_ids(31, seed=3)[0]])


def next_tokens(batch: int):
    """5 new tokens per row; in a batch, row 1 has a padding token among them."""
    ids = random_ids(5, batch=batch, seed=4)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, 2] = 0
    return ids, mask


@contextmanager
def attention(model, name: str):
    """The model attends with ``name`` inside the block (restored after)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def compress(model, p, ids, mask, cache=None):
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad(), press(model, p):
        model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
    return cache


def continuation(model, cache, ids, mask):
    """Logits of the next forward (5 tokens) and the greedy continuation of ``generate``, each on a copy of
    ``cache``."""
    new, new_mask = next_tokens(ids.shape[0])
    full_mask = torch.cat([mask, new_mask], dim=1)
    with torch.no_grad():
        logits = model(new, attention_mask=full_mask, **{CACHE_KWARG: copy.deepcopy(cache)}).logits
        generated = model.generate(torch.cat([ids, new], dim=1), attention_mask=full_mask,
                                   max_new_tokens=NEW, **{CACHE_KWARG: copy.deepcopy(cache)}, do_sample=False,
                                   pad_token_id=0)
    return logits, generated[:, -NEW:]


def inside(model, p, cache, ids, mask):
    with press(model, p):
        return continuation(model, cache, ids, mask)


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=ATOL)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("kind", ["padded", "single"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_registered_attention_outside_the_block_gives_the_results_of_inside(impl, allocator, kind):
    model = cached_tiny_model("llama", impl, **INIT)
    p = KnormPress(ratio=0.5, allocator=allocator)
    ids, mask = context(kind)
    cache = compress(model, p, ids, mask)
    kinds = {type(layer) for layer in cache.layers}
    assert (RaggedLayer in kinds) == (allocator == "head_adaptive") and kinds <= {RaggedLayer, CompressedLayer}
    expected = inside(model, p, cache, ids, mask)
    with attention(model, f"kvpress_like_{impl}"):
        assert_same(continuation(model, cache, ids, mask), expected)
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("kind", ["padded", "single"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_plain_attention_outside_the_block_gives_the_same_results_or_a_clear_error(impl, allocator, kind):
    """Plain attention is exact only for one mask shared by every layer: dense layers, every slot real, the same
    number of entries in each layer (uniform allocator, rows keeping the same count). Otherwise the forward raises,
    and the cache is left as it was."""
    model = cached_tiny_model("llama", impl, **INIT)
    p = KnormPress(ratio=0.5, allocator=allocator)
    ids, mask = context(kind)
    cache = compress(model, p, ids, mask)
    expected = inside(model, p, cache, ids, mask)
    if allocator == "uniform" and kind == "single":
        assert_same(continuation(model, cache, ids, mask), expected)
        return
    seen = cache.get_seq_length()
    new, new_mask = next_tokens(ids.shape[0])
    with torch.no_grad(), pytest.raises(ValueError, match=r"plain attention cannot attend.*kvpress_like_sdpa"):
        model(new, attention_mask=torch.cat([mask, new_mask], dim=1), **{CACHE_KWARG: cache})
    assert [layer.get_seq_length() for layer in cache.layers] == [seen] * len(cache.layers)  # nothing appended
    with attention(model, f"kvpress_like_{impl}"):
        assert_same(continuation(model, cache, ids, mask), expected)


@pytest.mark.parametrize("kind", ["padded", "single"])
def test_quantized_cache_outside_the_block(kind):
    model = cached_tiny_model("llama", "sdpa", **INIT)
    p = KnormPress(ratio=0.5)
    ids, mask = context(kind)
    cache = compress(model, p, ids, mask, QuantizedCache(backend="fp8", config=model.config))
    assert all(isinstance(layer, QuantizedCompressedLayer) for layer in cache.layers)
    expected = inside(model, p, cache, ids, mask)
    with attention(model, "kvpress_like_sdpa"):
        assert_same(continuation(model, cache, ids, mask), expected)
    if kind == "single":
        assert_same(continuation(model, cache, ids, mask), expected)
    else:
        new, new_mask = next_tokens(ids.shape[0])
        with torch.no_grad(), pytest.raises(ValueError, match="kvpress_like_sdpa"):
            model(new, attention_mask=torch.cat([mask, new_mask], dim=1), **{CACHE_KWARG: cache})


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sliding_window_cache_outside_the_block(impl):
    """A compressed all-sliding-window model (window 64): decoding past the window outside the block with the registered
    attention equals inside; plain attention raises (it would attend entries outside the window)."""
    model = cached_tiny_model("mistral_sliding", impl, **INIT)
    p = KnormPress(ratio=0.5)
    ids, mask = context("padded")
    cache = compress(model, p, ids, mask)
    assert all(isinstance(layer, SlidingCompressedLayer) for layer in cache.layers)
    new = random_ids(40, batch=3, seed=6)  # the first context tokens leave the window
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    with torch.no_grad():
        with press(model, p):
            expected = model(new, attention_mask=full_mask, **{CACHE_KWARG: copy.deepcopy(cache)}).logits
        with attention(model, f"kvpress_like_{impl}"):
            got = model(new, attention_mask=full_mask, **{CACHE_KWARG: copy.deepcopy(cache)}).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
        with pytest.raises(ValueError, match="sliding window.*kvpress_like_sdpa"):
            model(new, attention_mask=full_mask, **{CACHE_KWARG: cache})


SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from tiny_models import cached_tiny_model, torch_threads
    from kvpress_like import load_cache
    from kvpress_like.cache import CACHE_KWARG
    import kvpress_like.context as context
    job = torch.load(sys.argv[2])
    model = cached_tiny_model("llama", "sdpa", initializer_range=0.2)
    results = {}
    with torch_threads(1), torch.no_grad():
        for how in ("plain", "registered"):
            cache, ids, meta = load_cache(job["path"], model)
            if how == "registered":
                model.set_attn_implementation("kvpress_like_sdpa")
            try:
                logits = model(job["new"], attention_mask=job["full_mask"], **{CACHE_KWARG: cache}).logits
                cache, ids, meta = load_cache(job["path"], model)
                generated = model.generate(torch.cat([ids, job["new"]], dim=1), attention_mask=job["full_mask"],
                                           max_new_tokens=job["n"], **{CACHE_KWARG: cache}, do_sample=False,
                                           pad_token_id=0)
                results[how] = (logits, generated[:, -job["n"]:])
            except ValueError as error:
                results[how] = str(error)
    assert not context._ACTIVE  # never entered press()
    torch.save(results, job["out"])
""")


@pytest.mark.parametrize("allocator", ["uniform", "head_adaptive", "kvcompose", "pyramid"])
def test_loaded_in_a_fresh_process_that_never_entered_a_press(allocator, tmp_path):
    model = cached_tiny_model("llama", "sdpa", **INIT)
    p = KnormPress(ratio=0.5, allocator=allocator)
    ids, mask = context("padded")
    cache = compress(model, p, ids, mask)
    expected = inside(model, p, cache, ids, mask)
    save_cache(tmp_path / "c.kvc", cache, model, ids, p)
    new, new_mask = next_tokens(ids.shape[0])
    job = {"path": str(tmp_path / "c.kvc"), "new": new, "full_mask": torch.cat([mask, new_mask], dim=1), "n": NEW,
           "out": str(tmp_path / "out.pt")}
    torch.save(job, tmp_path / "job.pt")
    run = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT, str(TESTS_DIR), str(tmp_path / "job.pt")],
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    assert_same(results["registered"], expected)
    assert isinstance(results["plain"], str)  # plain sdpa: the clear error
    assert "model.set_attn_implementation('kvpress_like_sdpa')" in results["plain"]


def test_entering_and_leaving_a_press_does_not_recompile_a_compiled_forward():
    """The press switches the model's attention implementation between two names registered once, and never edits
    transformers' mapping of attention functions: after the first round (one compile per name), entering and leaving
    a press ten times around a compiled forward compiles nothing more."""
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = cached_tiny_model("llama", "sdpa", **INIT)
    ids = random_ids(12, seed=7)
    dynamo.reset()
    try:
        compiled = torch.compile(model.forward, backend="eager")
        with torch.no_grad():
            try:
                compiled(input_ids=ids, use_cache=False)
            except Exception as error:  # pragma: no cover - depends on the platform
                pytest.skip(f"torch.compile cannot run here: {error}")
            frames = []
            for _ in range(10):
                with press(model, KnormPress(ratio=0.5)):
                    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
                    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
                    inside_logits = compiled(input_ids=ids, use_cache=False).logits
                outside_logits = compiled(input_ids=ids, use_cache=False).logits
                torch.testing.assert_close(inside_logits, outside_logits, rtol=0, atol=ATOL)
                frames.append((counters["frames"]["total"], counters["stats"]["unique_graphs"]))
        assert len(set(frames[1:])) == 1, frames
    finally:
        dynamo.reset()
