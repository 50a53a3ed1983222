"""Presses are configuration; what lives for one run lives on the installation ``press(model, p)`` creates.

* every registered press, with every registered allocator and its parameters, round-trips through ``to_dict`` /
  ``press_from_dict`` (also through JSON) and hashes like its copy;
* one press installed on two models at once gives each the result it gives alone (ChunkKV's reused indices live in
  the installation's per-prefill state);
* a combination that cannot act as configured (ChunkKV's ``reuse_group`` under a model-scope allocator) is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import cached_tiny_model, random_ids
from transformers import DynamicCache

import kvpress_like
from kvpress_like import ChunkKVPress, KnormPress, PerLayerAllocator, PyramidAllocator, SnapKVPress
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.registry import allocator_from_dict, get_allocator_class, list_allocators, press_from_dict

# parameters of each built-in allocator (a registered allocator missing here fails test_every_allocator_is_covered)
ALLOCATOR_PARAMS = {
    "uniform": st.just({}),
    "kvcompose": st.just({}),
    "pyramid": st.fixed_dictionaries({"beta": st.floats(1.0, 60.0)}),
    "head_adaptive": st.fixed_dictionaries({"alpha": st.floats(0.0, 1.0)}),
    "dynamic": st.fixed_dictionaries({"radio_max": st.floats(1.0, 30.0)}),
    "per_layer": st.fixed_dictionaries({"ratios": st.lists(st.floats(0.0, 0.95), min_size=1, max_size=6)}),
}
WRAPPERS = {"decoding", "calibrated"}  # presses whose ratio is their scorer's (or chosen): built around a scorer


def test_every_allocator_is_covered():
    assert set(list_allocators()) <= set(ALLOCATOR_PARAMS), set(list_allocators()) - set(ALLOCATOR_PARAMS)


@st.composite
def allocators(draw):
    name = draw(st.sampled_from(sorted(list_allocators())))
    params = draw(ALLOCATOR_PARAMS[name])
    if not params and draw(st.booleans()):
        return name  # by name, as users usually give it
    return get_allocator_class(name)(**params)


def build(name: str, ratio: float, allocator):
    if name == "decoding":
        return kvpress_like.create_press(name, scorer=KnormPress(ratio=ratio, allocator=allocator), target=64)
    if name == "calibrated":
        return kvpress_like.create_press(name, scorer=SnapKVPress(allocator=allocator), quality=0.9)
    return kvpress_like.create_press(name, ratio=ratio, allocator=allocator)


@pytest.mark.parametrize("name", kvpress_like.list_presses())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio=st.floats(0.0, 0.95), allocator=allocators())
def test_every_press_round_trips_with_its_allocator(name, ratio, allocator):
    try:
        p = build(name, ratio, allocator)
    except ValueError as error:  # a combination the press refuses, clearly (fastkv: uniform only; chunkkv's reuse)
        if "allocator" not in str(error):
            raise
        allocator = "uniform"
        p = build(name, ratio, allocator)
    described = p.to_dict()
    assert json.loads(json.dumps(described)) == described  # JSON-ready
    back = press_from_dict(json.loads(json.dumps(described)))
    assert type(back) is type(p)
    assert back.to_dict() == described
    inner = (lambda x: x.scorer) if name in WRAPPERS else (lambda x: x)
    assert inner(back).allocator_instance == inner(p).allocator_instance  # parameters included
    assert repr(inner(back).allocator_instance) == repr(inner(p).allocator_instance)
    assert hash(back) == hash(p) and back == p


@pytest.mark.parametrize("name", kvpress_like.list_presses())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio=st.floats(0.0, 0.95), other=st.floats(0.0, 0.95), allocator=allocators(), data=st.data())
def test_every_press_is_immutable_hashable_configuration(name, ratio, other, allocator, data):
    """Hash stable and equal for equal presses; replace() round-trips and changes only what it is given; assigning
    any parameter is refused and changes nothing."""
    try:
        p = build(name, ratio, allocator)
    except ValueError as error:  # a combination the press refuses, clearly (see the round-trip test above)
        if "allocator" not in str(error):
            raise
        allocator = "uniform"
        p = build(name, ratio, allocator)
    key, described = hash(p), p.to_dict()
    twin = build(name, ratio, allocator)
    assert twin == p and hash(twin) == key and len({p, twin}) == 1
    copy = p.replace()
    assert copy is not p and copy == p and hash(copy) == key
    assert {p: "value"}[copy] == "value"
    if name in WRAPPERS:  # the ratio is the wrapped scorer's: change it there
        changed = p.replace(scorer=p.scorer.replace(ratio=other) if name == "decoding" else p.scorer.replace(n_sink=3))
        assert changed.scorer != p.scorer or (name == "decoding" and other == ratio)
    else:
        changed = p.replace(compression_ratio=other)
        assert changed.ratio == other and changed.replace(ratio=ratio) == p
        assert (changed == p) == (other == ratio)
        rest = {k: v for k, v in changed.to_dict().items() if k not in ("press", "ratio")}
        assert rest == {k: v for k, v in described.items() if k not in ("press", "ratio")}
    assert p.to_dict() == described and hash(p) == key  # replace never changes the original
    parameter = data.draw(st.sampled_from(sorted(k for k in described if k != "press") + ["compression_ratio"]))
    with pytest.raises(AttributeError, match=f"cannot assign {parameter}; build a changed copy with p.replace"):
        setattr(p, parameter, getattr(p, parameter, 0.5))
    assert p.to_dict() == described and hash(p) == key


def test_allocator_parameters_survive_the_round_trip():
    """The two cases that used to fail: pyramid's beta came back as the default, per_layer could not be rebuilt."""
    p = KnormPress(ratio=0.5, allocator=PyramidAllocator(beta=5))
    assert p.to_dict()["allocator"] == {"allocator": "pyramid", "beta": 5.0}
    assert press_from_dict(p.to_dict()).allocator_instance.beta == 5.0
    q = KnormPress(ratio=0.5, allocator=PerLayerAllocator(ratios=[0.1, 0.7]))
    assert press_from_dict(q.to_dict()).allocator_instance.ratios == [0.1, 0.7]
    assert KnormPress(ratio=0.5, allocator=PyramidAllocator()).to_dict()["allocator"] == "pyramid"  # defaults: name
    assert allocator_from_dict({"allocator": "pyramid", "beta": 3}) == PyramidAllocator(beta=3)
    assert PyramidAllocator(beta=3) != PyramidAllocator(beta=4) and len({PyramidAllocator(), PyramidAllocator()}) == 1


@pytest.mark.parametrize("bad, match", [
    ({"allocator": "nope"}, "unknown allocator 'nope'"),
    ({"beta": 2}, "allocator_from_dict takes"),
    ({"allocator": "pyramid", "beta": 0.5}, "beta must be >= 1"),
])
def test_allocator_from_dict_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        allocator_from_dict(bad)


def test_press_from_dict_errors():
    with pytest.raises(ValueError, match="press_from_dict takes"):
        press_from_dict({"ratio": 0.5})
    with pytest.raises(ValueError, match="unknown allocator"):
        press_from_dict({"press": "knorm", "ratio": 0.5, "allocator": {"allocator": "nope"}})


def test_presses_are_hashable_configuration():
    a, b = SnapKVPress(ratio=0.5, window=8), SnapKVPress(ratio=0.5, window=8)
    assert a == b and hash(a) == hash(b) and len({a, b, SnapKVPress(ratio=0.4, window=8)}) == 2
    assert hash(ChunkKVPress(ratio=0.5)) == hash(ChunkKVPress(ratio=0.5))


@pytest.mark.parametrize("allocator", ["kvcompose", "dynamic"])
def test_chunkkv_reuse_group_under_a_model_scope_allocator_is_refused(allocator):
    with pytest.raises(ValueError, match="reuse_group=2.*needs a layer-scope allocator"):
        ChunkKVPress(ratio=0.5, reuse_group=2, allocator=allocator)
    ChunkKVPress(ratio=0.5, reuse_group=1, allocator=allocator)  # no reuse asked: fine
    p = ChunkKVPress(ratio=0.5, reuse_group=2)
    with pytest.raises(ValueError, match="needs a layer-scope allocator"):
        p.replace(allocator=allocator)  # a changed copy is checked like a new press
    object.__setattr__(p, "allocator", allocator)  # forced past the immutability: still refused when installed
    object.__setattr__(p, "_allocator", kvpress_like.registry.get_allocator(allocator))
    with pytest.raises(ValueError, match="needs a layer-scope allocator"):
        with kvpress_like.press(cached_tiny_model("llama"), p):
            pass


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
    return cache


def _kept(cache):
    return [(layer.keys.clone(), layer.valid.clone()) for layer in cache.layers]


def test_one_chunkkv_press_on_two_models_at_once_gives_each_its_own_result():
    """Model B's whole prefill runs in the middle of model A's (after A's first layer, where A's group-of-two selection
    is made), with one press installed on both. A still reuses its own selection in its second layer: the result
    equals A alone. (With the selection kept on the press, A's second layer found B's and selected anew.)"""
    model_a, model_b = cached_tiny_model("llama"), cached_tiny_model("qwen2")
    ids_a, ids_b = random_ids(40, seed=1), random_ids(48, seed=2)
    p = ChunkKVPress(ratio=0.5, reuse_group=2, chunk_size=4, window=4, scorer=SnapKVPress(window=4))
    with kvpress_like.press(model_a, p):
        alone = _kept(_prefill(model_a, ids_a))
    with kvpress_like.press(model_b, p):
        alone_b = _kept(_prefill(model_b, ids_b))
    selections = []
    original = p.select
    object.__setattr__(p, "select", lambda ctx: selections.append(ctx.layer_idx) or original(ctx))
    interleaved_b = []

    def run_b(module, args, output):
        interleaved_b.extend(_kept(_prefill(model_b, ids_b)))

    handle = model_a.model.layers[0].register_forward_hook(run_b)
    try:
        with kvpress_like.press(model_a, p), kvpress_like.press(model_b, p):
            interleaved = _kept(_prefill(model_a, ids_a))
    finally:
        handle.remove()
        object.__delattr__(p, "select")
    # each model selects in the first layer of each group of two and reuses in the second (B's run nested in A's)
    first_of_group = [i for i in range(len(model_a.model.layers)) if i % 2 == 0]
    assert len(model_a.model.layers) >= 2 and sorted(selections) == sorted(first_of_group * 2), selections
    for (k1, v1), (k2, v2) in zip(alone + alone_b, interleaved + interleaved_b, strict=True):
        torch.testing.assert_close(k1, k2, rtol=0, atol=0)
        assert torch.equal(v1, v2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scorer=KnormPress(ratio=0.5), window=3), "set window on the scorer"),
    (dict(scorer=KnormPress(ratio=0.5), allocator="pyramid", n_sink=2), "set allocator, n_sink on the scorer"),
    (dict(scorer=KnormPress(ratio=0.5, allocator="kvcompose"), compress_prefill=True),
     "scorer's allocator 'kvcompose' selects every layer at once"),
])
def test_decoding_press_refuses_what_it_would_ignore(kwargs, match):
    """The wrapper's own allocator and protected tokens were silently ignored (the scorer's are used); a model-scope
    allocator on a prefill-compressing scorer failed inside the forward."""
    with pytest.raises(ValueError, match=match):
        kvpress_like.DecodingPress(target=16, interval=4, **kwargs)
    kvpress_like.DecodingPress(scorer=KnormPress(ratio=0.5, window=3, allocator="pyramid"), target=16, interval=4,
                               compress_prefill=True)  # the same settings on the scorer: fine


# -- capability flags (issue 15 item 2): what a press declares replaces method-identity checks ----------------------
PLAIN = {"chunkkv": False, "kvzip": False, "fastkv": False, "razor_attention": False, "decoding": False,
         "calibrated": False}


@pytest.mark.parametrize("name", kvpress_like.list_presses())
def test_every_press_declares_whether_it_is_a_plain_scorer(name):
    """Exactly the presses that select, install hooks or act after a forward by themselves are not plain scorers;
    only decoding-time compression acts while decoding."""
    cls = kvpress_like.registry.get_press_class(name)
    assert cls.is_plain_scorer is PLAIN.get(name, True)
    assert cls.acts_while_decoding is (name == "decoding")
    replaces_flow = any(getattr(cls, m) is not getattr(kvpress_like.Press, m)
                        for m in ("select", "compress", "install", "after_forward"))
    assert replaces_flow is not cls.is_plain_scorer  # the declaration matches the code (checked here, once)


def test_a_class_replacing_the_flow_must_declare_its_capabilities():
    with pytest.raises(TypeError, match="OwnSelection overrides select: declare the class attribute is_plain_scorer"):
        class OwnSelection(kvpress_like.Press):
            def select(self, ctx):
                raise AssertionError

    with pytest.raises(TypeError, match="OwnDecoding overrides after_forward: declare the class attribute "
                                        "acts_while_decoding"):
        class OwnDecoding(kvpress_like.Press):
            is_plain_scorer = False

            def after_forward(self, hooks, module, kwargs, cache, was_prefill):
                pass

    class Declared(kvpress_like.Press):
        is_plain_scorer = False

        def compress(self, ctx):
            raise AssertionError

    class Inherited(Declared):  # the parent's declaration holds for a subclass that overrides again
        def compress(self, ctx):
            raise AssertionError

    assert Inherited.is_plain_scorer is False and Inherited.acts_while_decoding is False


def test_consumers_read_the_flags_not_the_methods():
    """A plain scorer's subclass that declares itself not plain (its methods unchanged) is refused by chunked
    prefill and calibration: they read the declaration. (answer_on_cache reading acts_while_decoding is covered by
    test_pipeline's DecodingPress tests.)"""
    from kvpress_like.calibration import CalibratedPress
    from kvpress_like.chunked import check_press

    class NotPlain(KnormPress):
        is_plain_scorer = False

    with pytest.raises(ValueError, match="NotPlain is not a plain scorer"):
        check_press(NotPlain(ratio=0.5))
    with pytest.raises(ValueError, match="NotPlain is not a plain scorer"):
        CalibratedPress(scorer=NotPlain())
    check_press(KnormPress(ratio=0.5))  # the plain parent passes
    CalibratedPress(scorer=KnormPress())


def test_ratio_auto_goes_through_the_calibrated_factory_not_new():
    """``CompactorPress(ratio="auto")`` is routed by the class call to ``CompactorPress.calibrated``; no press class
    swaps its instances in ``__new__``, so copies and pickles are rebuilt as plain instances of their class."""
    import copy
    import pickle

    from kvpress_like import CompactorPress
    from kvpress_like.calibration import CalibratedPress

    assert all("__new__" not in vars(c) for c in kvpress_like.Press.__subclasses__() + [kvpress_like.Press])
    p = CompactorPress(ratio="auto", quality=0.9, window=4)
    assert type(p) is CalibratedPress and p == CompactorPress.calibrated(quality=0.9, window=4)
    assert p.scorer == CompactorPress(window=4) and p.quality == 0.9
    assert type(kvpress_like.create_press("snapkv", compression_ratio="auto")) is CalibratedPress
    with pytest.raises(ValueError, match="chooses the ratio itself"):
        CalibratedPress.calibrated()
    with pytest.raises(ValueError, match="is not a plain scorer"):
        ChunkKVPress(ratio="auto")
    q = KnormPress(compression_ratio=0.3, window=2)
    for twin in (copy.copy(q), copy.deepcopy(q), pickle.loads(pickle.dumps(q)), pickle.loads(pickle.dumps(p))):
        assert twin == (p if type(twin) is CalibratedPress else q)
    with pytest.raises(AttributeError, match="cannot assign ratio"):
        copy.deepcopy(q).ratio = 0.5  # a copy is as immutable as its original
