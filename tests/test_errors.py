"""Errors are raised early with a message naming what was wrong; the model is always restored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import (
    attention_hooks,
    cached_tiny_model,
    full_attention_layers,
    prefill,
    random_ids,
    tiny_model,
    torch_threads,
)
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from kvpress_like import (
    CompressedLayer,
    KnormPress,
    LayerContext,
    Press,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    create_press,
    list_allocators,
    list_architectures,
    list_presses,
    press,
)
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.context import active_press

PRESS_CLASSES = [KnormPress, RandomPress, SnapKVPress, StreamingLLMPress]


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield




def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n)


# -- ratio -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", PRESS_CLASSES)
@pytest.mark.parametrize("bad", [-0.1, -1, 1, 1.0, 1.5, math.nan, math.inf, -math.inf])
def test_ratio_out_of_range_raises_value_error(cls, bad):
    with pytest.raises(ValueError, match="ratio"):
        cls(ratio=bad)


@pytest.mark.parametrize("cls", PRESS_CLASSES)
@pytest.mark.parametrize("bad", ["0.5", True, False, None, [0.5], object()])
def test_ratio_of_wrong_type_raises_type_error(cls, bad):
    with pytest.raises(TypeError, match="ratio"):
        cls(ratio=bad)


@pytest.mark.parametrize("bad", [-0.5, 1.0, math.nan])
def test_create_press_validates_ratio(bad):
    with pytest.raises(ValueError, match="ratio"):
        create_press("knorm", ratio=bad)
    with pytest.raises(TypeError, match="ratio"):
        create_press("snapkv", ratio="half")


@pytest.mark.parametrize("good", [0, 0.0, 0.5, 0.999, torch.tensor(0.25).item()])
def test_valid_ratios_are_accepted_as_floats(good):
    p = KnormPress(ratio=good)
    assert isinstance(p.ratio, float) and p.ratio == float(good)


def test_compression_ratio_alias():
    assert KnormPress(compression_ratio=0.3).ratio == 0.3
    assert SnapKVPress(compression_ratio=0.25, window=4).ratio == 0.25
    assert create_press("streaming_llm", compression_ratio=0.4).ratio == 0.4
    with pytest.raises(ValueError, match="ratio"):
        KnormPress(ratio=0.2, compression_ratio=0.3)
    with pytest.raises(ValueError, match="ratio"):
        create_press("knorm", ratio=0.5, compression_ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        KnormPress(compression_ratio=1.2)  # the alias is validated like ratio
    with pytest.raises(TypeError, match="ratio"):
        KnormPress(compression_ratio="0.2")


def test_compression_ratio_alias_compresses_like_ratio():
    model = cached_tiny_model("llama")
    ids = random_ids(20, seed=41)
    a = prefill(model, ids, KnormPress(compression_ratio=0.5))
    b = prefill(model, ids, KnormPress(ratio=0.5))
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys)
        assert la.keys.shape[2] == 10


# -- other parameters --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, bad", [("n_sink", -1), ("n_sink", 1.5), ("window", -2), ("window", "4"), ("n_sink", True)]
)
def test_bad_protected_counts_name_the_parameter(name, bad):
    with pytest.raises((ValueError, TypeError), match=name):
        KnormPress(ratio=0.5, **{name: bad})


def test_snapkv_parameters():
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKVPress(ratio=0.5, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKVPress(ratio=0.5, kernel_size=0)
    with pytest.raises(ValueError, match="window"):
        SnapKVPress(ratio=0.5, window=0)


@pytest.mark.parametrize("name, field", [("snapkv", "kernel_size"), ("non_causal_attention", "kernel_size"),
                                         ("compactor", "kernel_size"), ("compactor", "leverage_kernel_size"),
                                         ("leverage", "leverage_kernel_size"), ("fastkv", "kernel_size")])
@pytest.mark.parametrize("bad", [0, 4, -3, 2.0, True, "3"])
def test_pooling_widths_must_be_positive_odd_ints(name, field, bad):
    with pytest.raises(ValueError, match=f"{field} must be a positive odd int; got {bad!r}"):
        create_press(name, ratio=0.5, **{field: bad})
    assert getattr(create_press(name, ratio=0.5, **{field: 3}), field) == 3


def test_unknown_press_name_lists_known_ones():
    with pytest.raises(ValueError) as info:
        create_press("does_not_exist", ratio=0.5)
    message = str(info.value)
    assert "does_not_exist" in message
    for name in list_presses():
        assert name in message


def test_unknown_allocator_name_lists_known_ones():
    with pytest.raises(ValueError) as info:
        KnormPress(ratio=0.5, allocator="does_not_exist")
    message = str(info.value)
    assert "allocator" in message and "does_not_exist" in message
    for name in list_allocators():
        assert name in message
    with pytest.raises(TypeError, match="allocator"):
        KnormPress(ratio=0.5, allocator=3)


# -- models ------------------------------------------------------------------------------------------------------------
def test_unsupported_model_names_supported_architectures_and_hook():
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    ).eval()
    with pytest.raises(ValueError) as info:
        with press(gpt2, KnormPress(ratio=0.5)):
            pytest.fail("the block must not run")
    message = str(info.value)
    assert "gpt2" in message
    for name in list_architectures():
        assert name in message
    assert "register_architectures" in message
    assert attention_hooks(gpt2) == []
    assert active_press(gpt2) is None


def test_unsupported_attention_implementation():
    model = tiny_model("llama")  # a private model: its config is changed below
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError) as info:
        with press(model, KnormPress(ratio=0.5)):
            pytest.fail("the block must not run")
    message = str(info.value)
    assert "flex_attention" in message and "sdpa" in message and "eager" in message
    assert attention_hooks(model) == []
    assert active_press(model) is None


def test_press_arguments_are_type_checked():
    model = cached_tiny_model("llama")
    with pytest.raises(TypeError):
        with press(model, "snapkv"):
            pass
    with pytest.raises(TypeError):
        with press("not a model", KnormPress(ratio=0.5)):
            pass
    assert attention_hooks(model) == []


def test_two_presses_on_one_model_raise():
    model = cached_tiny_model("llama")
    ids = random_ids(16, seed=42)
    first = KnormPress(ratio=0.5)
    with press(model, first):
        hooks = attention_hooks(model)
        assert hooks
        with pytest.raises(ValueError, match="already"):
            with press(model, SnapKVPress(ratio=0.5, window=4)):
                pytest.fail("the block must not run")
        with pytest.raises(ValueError, match="already"):
            with press(model, first):  # the same press object twice as well
                pass
        # the failed attempts neither removed nor duplicated the first press's hooks
        assert attention_hooks(model) == hooks
        assert active_press(model) is first
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, **{CACHE_KWARG: cache})
        assert all(isinstance(layer, CompressedLayer) and layer.keys.shape[2] == 8 for layer in cache.layers)
    assert attention_hooks(model) == []
    assert active_press(model) is None


def test_press_on_the_base_model_works():
    model = cached_tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model.model, KnormPress(ratio=0.5)):
        model(random_ids(20, seed=51), **{CACHE_KWARG: cache})
    assert [layer.keys.shape[2] for layer in cache.layers] == [10, 10, 10]
    assert attention_hooks(model) == []


def test_press_on_base_model_while_causal_lm_is_pressed_raises():
    model = cached_tiny_model("llama")
    try:
        with press(model, KnormPress(ratio=0.5)):
            with pytest.raises(ValueError, match="already"):
                with press(model.model, KnormPress(ratio=0.5)):
                    with torch.no_grad():
                        model(random_ids(20, seed=52), **{CACHE_KWARG: DynamicCache(config=model.config)})
    finally:
        assert attention_hooks(model) == []


def test_presses_on_two_models_at_once_are_independent():
    a, b = cached_tiny_model("llama"), cached_tiny_model("qwen2")
    ids = random_ids(20, seed=43)
    with press(a, KnormPress(ratio=0.5)), press(b, KnormPress(ratio=0.75)):
        cache_a, cache_b = DynamicCache(config=a.config), DynamicCache(config=b.config)
        with torch.no_grad():
            a(ids, **{CACHE_KWARG: cache_a})
            b(ids, **{CACHE_KWARG: cache_b})
    assert [layer.keys.shape[2] for layer in cache_a.layers] == [10, 10, 10]
    assert [layer.keys.shape[2] for layer in cache_b.layers] == [5, 5, 5]
    assert attention_hooks(a) == [] and attention_hooks(b) == []


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("n", [1, 3])
def test_context_shorter_than_protected_tokens_keeps_everything(arch, n):
    model = cached_tiny_model(arch, "eager")
    ids = random_ids(n, seed=44)
    full = prefill(model, ids)
    cache = prefill(model, ids, SnapKVPress(ratio=0.5, window=64))
    for idx in full_attention_layers(model.config):
        assert cache.layers[idx].keys.shape[2] == n
        assert torch.equal(cache.layers[idx].keys, full.layers[idx].keys)
    assert cache.get_seq_length() == n
    with press(model, SnapKVPress(ratio=0.9, window=64)):
        out = greedy(model, ids)
    assert torch.equal(out, greedy(model, ids))
    # the same with sinks: KnormPress(n_sink=8) on 3 tokens
    cache = prefill(model, ids, KnormPress(ratio=0.9, n_sink=8))
    for idx in full_attention_layers(model.config):
        assert cache.layers[idx].keys.shape[2] == n


def test_single_token_context_at_high_ratio_keeps_one_entry():
    model = cached_tiny_model("llama")
    cache = prefill(model, random_ids(1, seed=45), KnormPress(ratio=0.99))
    assert all(layer.keys.shape[2] == 1 for layer in cache.layers)
    cache = prefill(model, random_ids(3, seed=45), KnormPress(ratio=0.99))
    assert all(layer.keys.shape[2] == 1 for layer in cache.layers)  # 3 - floor(2.97) = 1


# -- restoring the model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_exception_inside_block_restores_model(arch):
    model = cached_tiny_model(arch, "sdpa")
    ids = random_ids(24, seed=46)
    before = greedy(model, ids)
    assert attention_hooks(model) == []
    with pytest.raises(RuntimeError, match="user error"):
        with press(model, KnormPress(ratio=0.5)):
            assert attention_hooks(model)
            greedy(model, ids)
            raise RuntimeError("user error")
    assert attention_hooks(model) == []
    for layer in model.model.layers:
        assert not layer.self_attn._forward_hooks and not layer.self_attn._forward_pre_hooks
    assert active_press(model) is None
    assert torch.equal(greedy(model, ids), before)
    cache = prefill(model, ids)
    assert not any(isinstance(layer, CompressedLayer) for layer in cache.layers)
    # and a press can be installed again
    with press(model, KnormPress(ratio=0.5)):
        pass


@dataclass
class FailingPress(Press):
    """Test press whose scorer raises in the second compressible layer."""

    name = "failing_test"
    calls: int = field(default=0, init=False)  # not a parameter (not in to_dict): a counter the test may update

    def score(self, ctx: LayerContext) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise ArithmeticError("scorer failed")
        return torch.zeros(ctx.keys.shape[:3])


def test_exception_inside_forward_restores_model():
    model = cached_tiny_model("qwen3", "eager")
    ids = random_ids(16, seed=47)
    before = greedy(model, ids)
    p = FailingPress(ratio=0.5)
    with pytest.raises(ArithmeticError, match="scorer failed"):
        with press(model, p):
            model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)})
    assert p.calls == 2
    assert attention_hooks(model) == []
    assert active_press(model) is None
    assert torch.equal(greedy(model, ids), before)


@dataclass
class BadShapePress(Press):
    name = "bad_shape_test"

    def score(self, ctx):
        return torch.zeros(ctx.keys.shape[0], ctx.keys.shape[2])


@dataclass
class NanPress(Press):
    name = "nan_test"

    def score(self, ctx):
        return torch.full(ctx.keys.shape[:3], math.nan)


@pytest.mark.parametrize("cls, match", [(BadShapePress, "shape"), (NanPress, "NaN")])
def test_bad_scores_are_reported(cls, match):
    model = cached_tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        prefill(model, random_ids(12, seed=48), cls(ratio=0.5))
    assert attention_hooks(model) == []


def test_one_press_on_two_models_one_after_another():
    p = KnormPress(ratio=0.5, n_sink=1)
    ids = random_ids(20, seed=49)
    a, b = cached_tiny_model("llama"), cached_tiny_model("gemma3")
    cache_a = prefill(a, ids, p)
    cache_b = prefill(b, ids, p)
    fresh_a = prefill(a, ids, KnormPress(ratio=0.5, n_sink=1))
    fresh_b = prefill(b, ids, KnormPress(ratio=0.5, n_sink=1))
    for got, want in [(cache_a, fresh_a), (cache_b, fresh_b)]:
        for layer, ref in zip(got.layers, want.layers, strict=True):
            assert type(layer) is type(ref)
            assert torch.equal(layer.keys, ref.keys)
    assert [isinstance(layer, CompressedLayer) for layer in cache_b.layers] == [False, True, True]
    # and again on the first model, with generate
    with press(a, p):
        out = greedy(a, ids)
    with press(a, KnormPress(ratio=0.5, n_sink=1)):
        assert torch.equal(out, greedy(a, ids))


def test_press_object_is_its_own_context_manager():
    model = cached_tiny_model("mistral")
    ids = random_ids(20, seed=50)
    p = StreamingLLMPress(ratio=0.5, n_sink=2)
    cache = DynamicCache(config=model.config)
    with p(model) as entered:
        assert entered is model
        assert active_press(model) is p
        with torch.no_grad():
            model(ids, **{CACHE_KWARG: cache})
    assert active_press(model) is None
    assert attention_hooks(model) == []
    assert [layer.keys.shape[2] for layer in cache.layers] == [10, 10, 10]
    assert cache.get_seq_length() == 20


# -- explicit ratio with its alias, assignments after construction, parameter types ------------------------------------
@pytest.mark.parametrize("make", [
    lambda: KnormPress(ratio=0.0, compression_ratio=0.3),
    lambda: KnormPress(0.0, compression_ratio=0.3),
    lambda: create_press("snapkv", ratio=0, compression_ratio=0.5),
], ids=["keyword", "positional", "create_press"])
def test_explicit_zero_ratio_with_compression_ratio_is_refused(make):
    with pytest.raises(ValueError, match="pass either ratio or compression_ratio, not both"):
        make()


@pytest.mark.parametrize("name, bad, error, match", [
    ("ratio", 1.5, ValueError, r"ratio must be in \[0, 1\)"),
    ("ratio", -0.1, ValueError, r"ratio must be in \[0, 1\)"),
    ("ratio", "0.5", TypeError, "ratio must be a number"),
    ("n_sink", -1, ValueError, "n_sink must be a non-negative int"),
    ("window", 2.5, ValueError, "window must be a non-negative int"),
    ("allocator", "no_such_allocator", ValueError, "unknown allocator"),
    ("allocator", 3, TypeError, "allocator must be an allocator name or an Allocator"),
])
def test_replace_checks_like_construction(name, bad, error, match):
    p = KnormPress(ratio=0.5, n_sink=2, window=2)
    before = p.to_dict()
    with pytest.raises(error, match=match):
        p.replace(**{name: bad})
    assert p.to_dict() == before


@pytest.mark.parametrize("name, value", [("ratio", 0.25), ("n_sink", 1), ("window", 3), ("allocator", "pyramid"),
                                         ("compression_ratio", 0.25), ("ratio", 1.5)])
def test_assignment_after_construction_is_refused(name, value):
    """A press is immutable configuration (it may be a dict key): assigning a parameter, even a valid value, raises
    and points to replace()."""
    p = KnormPress(ratio=0.5, n_sink=2, window=2)
    before, key = p.to_dict(), hash(p)
    with pytest.raises(AttributeError, match=rf"KnormPress is immutable configuration: cannot assign {name}; "
                                             rf"build a changed copy with p\.replace\({name}=\.\.\.\)"):
        setattr(p, name, value)
    assert p.to_dict() == before and hash(p) == key


def test_replace_returns_a_changed_copy_that_takes_effect():
    model = cached_tiny_model("llama")
    ids = random_ids(20, seed=43)
    p = KnormPress(ratio=0.5)
    q = p.replace(ratio=0.25, allocator="pyramid")
    assert (p.ratio, type(p._allocator).__name__) == (0.5, "UniformAllocator")  # the original is unchanged
    assert q.ratio == 0.25 and type(q._allocator).__name__ == "PyramidAllocator"
    assert p.replace(compression_ratio=0.25) == KnormPress(ratio=0.25)
    cache = prefill(model, ids, q.replace(allocator="uniform"))
    assert all(layer.keys.shape[2] == 15 for layer in cache.layers)


@pytest.mark.parametrize("changes, error, match", [
    ({"ratio": 0.2, "compression_ratio": 0.2}, ValueError, "pass either ratio or compression_ratio, not both"),
    ({"reuse_group": 2}, TypeError, r"KnormPress.replace got unknown parameter\(s\) reuse_group; its parameters "
                                    "are ratio, allocator, n_sink, window"),
])
def test_replace_errors(changes, error, match):
    with pytest.raises(error, match=match):
        KnormPress(ratio=0.5).replace(**changes)


@pytest.mark.parametrize("make, match", [
    (lambda: RandomPress(ratio=0.5, seed="x"), "seed must be an int; got 'x'"),
    (lambda: create_press("random", ratio=0.5, seed=1.5), "seed must be an int; got 1.5"),
    (lambda: create_press("cur", ratio=0.5, seed=None), "seed must be an int; got None"),
    (lambda: create_press("compactor", ratio=0.5, value_norm="yes"), "value_norm must be True or False"),
], ids=["random_seed_str", "random_seed_float", "cur_seed_none", "compactor_value_norm"])
def test_parameter_types_are_checked_at_construction(make, match):
    """These used to fail only at the first forward."""
    with pytest.raises(TypeError, match=match):
        make()


def test_parameter_types_are_checked_in_replace_too():
    p = RandomPress(ratio=0.5, seed=3)
    with pytest.raises(TypeError, match="seed must be an int"):
        p.replace(seed="x")
    with pytest.raises(AttributeError, match="cannot assign seed"):
        p.seed = 4
    assert p.seed == 3 and p.replace(seed=4).seed == 4


# -- unsupported caches and generation modes, all-padding rows ---------------------------------------------------------
def test_static_cache_is_refused_with_a_clear_error():
    from transformers import StaticCache

    model = cached_tiny_model("llama")
    ids = random_ids(20, seed=44)
    match = r"StaticCache \(StaticLayer layers\) is not supported under a press.*Use a DynamicCache"
    with pytest.raises(ValueError, match=match):
        with press(model, KnormPress(ratio=0.5)), torch.no_grad():
            model(ids, **{CACHE_KWARG: StaticCache(config=model.config, max_cache_len=64)})
    with pytest.raises(ValueError, match=match):
        with press(model, KnormPress(ratio=0.5)):
            model.generate(ids, cache_implementation="static", max_new_tokens=2, do_sample=False)
    assert attention_hooks(model) == [] and active_press(model) is None


def test_assisted_decoding_is_refused_with_a_clear_error():
    model = cached_tiny_model("llama", initializer_range=0.2)
    assistant = cached_tiny_model("llama", seed=1, initializer_range=0.2)
    ids = random_ids(20, seed=45)
    with pytest.raises(ValueError, match=r"cannot crop .*assisted decoding: generate\(assistant_model=...\).* is not "
                                         "supported on a compressed cache"):
        with press(model, KnormPress(ratio=0.5)):
            model.generate(ids, assistant_model=assistant, max_new_tokens=5, do_sample=False)
    assert attention_hooks(model) == [] and active_press(model) is None


@pytest.mark.parametrize("allocator", ["uniform", "head_adaptive", "pyramid", "kvcompose", "dynamic"])
def test_a_row_that_is_all_padding_keeps_nothing_and_the_others_are_unaffected(allocator):
    """Head-adaptive, pyramid and dynamic allocators raised "cannot distribute 0 between bounds ..."."""
    model = cached_tiny_model("llama", initializer_range=0.2)
    ids = random_ids(20, batch=2, seed=46)
    mask = torch.ones_like(ids)
    mask[1] = 0
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with press(model, KnormPress(ratio=0.5, allocator=allocator)), torch.no_grad():
        batch, alone = DynamicCache(config=model.config), DynamicCache(config=model.config)
        out = model(ids, attention_mask=mask, **{CACHE_KWARG: batch}).logits
        expected = model(ids[:1], **{CACHE_KWARG: alone}).logits
        step = model(ids[:, :1], attention_mask=step_mask, **{CACHE_KWARG: batch}).logits
        expected_step = model(ids[:1, :1], **{CACHE_KWARG: alone}).logits
    torch.testing.assert_close(out[:1], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(step[:1], expected_step, atol=1e-5, rtol=0)


# -- a press applies to the thread that installed it -------------------------------------------------------------------
def _calibrated_press(model, tmp_path):
    import json

    from kvpress_like.calibration import FORMAT, model_fingerprint

    params = tmp_path / "cal.json"
    params.write_text(json.dumps({"format": FORMAT, "model": {"weights_sha256": model_fingerprint(model)},
                                  "presses": {"knorm": {"alpha": -0.5, "beta": 0.5}}}))
    return KnormPress(ratio="auto", quality=0.8, params=str(params))


@pytest.mark.parametrize("kind", ["knorm", "head_adaptive", "calibrated"])
def test_a_press_acts_only_in_the_thread_that_installed_it(kind, tmp_path):
    """While thread A holds a press on the model, thread B's plain forwards of the same model, running at the same
    time, are not compressed (they were), and A's compression is not disturbed by them."""
    import threading

    model = cached_tiny_model("llama", initializer_range=0.2)
    ids_a, ids_b = random_ids(40, seed=47), random_ids(30, seed=48)
    make = {"knorm": lambda: KnormPress(ratio=0.5), "head_adaptive": lambda: KnormPress(ratio=0.5,
                                                                                        allocator="head_adaptive"),
            "calibrated": lambda: _calibrated_press(model, tmp_path)}[kind]
    expected_a = prefill(model, ids_a, make())
    expected_b = prefill(model, ids_b)
    rounds = 8
    results, errors = {"a": [], "b": []}, []
    inside = threading.Event()
    b_done = threading.Event()

    def thread_a():
        try:
            with press(model, make()), torch.no_grad():
                inside.set()
                for _ in range(rounds):
                    cache = DynamicCache(config=model.config)
                    model(ids_a, **{CACHE_KWARG: cache})
                    results["a"].append(cache)
                b_done.wait(timeout=120)  # the press stays installed until B is done
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
            inside.set()

    def thread_b():
        try:
            inside.wait(timeout=120)
            with torch.no_grad():
                for _ in range(rounds):
                    cache = DynamicCache(config=model.config)
                    model(ids_b, **{CACHE_KWARG: cache})
                    results["b"].append(cache)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            b_done.set()

    with torch_threads(1):
        workers = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
    assert errors == []
    assert len(results["a"]) == len(results["b"]) == rounds
    for got, expected in [(c, expected_a) for c in results["a"]] + [(c, expected_b) for c in results["b"]]:
        assert [type(layer) for layer in got.layers] == [type(layer) for layer in expected.layers]
        for layer, reference in zip(got.layers, expected.layers):
            assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    assert all(type(layer).__name__ == "DynamicLayer" for c in results["b"] for layer in c.layers)
    assert attention_hooks(model) == [] and active_press(model) is None


def test_meta_device_model_is_refused_with_a_clear_error():
    from transformers import AutoModelForCausalLM, LlamaConfig

    import kvpress_like

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="meta device"):
        with kvpress_like.press(model, kvpress_like.KnormPress(ratio=0.5)):
            pass
