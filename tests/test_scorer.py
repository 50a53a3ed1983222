"""The Scorer protocol (issue 15, item 2): a scorer written as a plain class (not a Press) becomes a press with any
allocator and protected tokens (``ScorerPress``), the wrappers (ChunkKV, DecodingPress, CalibratedPress) accept it,
anything else is refused naming what is missing, and every built-in press is a scorer whose ``needs`` declaration
matches what its ``score`` reads."""

from __future__ import annotations

import json
from functools import cached_property

import pytest
import torch
from tiny_models import cached_tiny_model, full_attention_layers, prefill, random_ids
from transformers import DynamicCache

import kvpress_like
from kvpress_like import (
    CalibratedPress,
    ChunkKVPress,
    DecodingPress,
    Press,
    Scorer,
    ScorerPress,
    compression_info,
    create_press,
    list_presses,
    press,
    press_from_dict,
)
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.press import LayerContext, as_press, describe
from kvpress_like.scorer import NEEDS, check_scorer


class ValueNormScorer:
    """A scorer as a contributor writes one: no Press, only ``score`` and its declarations. Each head weighs the
    value norms differently, so head-adaptive budgets differ between heads."""

    needs = frozenset()  # reads only keys and values
    supports_decoding = True
    score_depends_on_ratio = False
    is_plain_scorer = True
    acts_while_decoding = False

    def score(self, ctx: LayerContext) -> torch.Tensor:
        heads = ctx.values.shape[1]
        weight = torch.arange(1, heads + 1, dtype=torch.float32, device=ctx.values.device)[:, None]
        return ctx.values.float().norm(dim=-1) ** weight  # [B, H_kv, S]


class ValueNormPress(Press):
    """The same scores as a Press subclass: the built-in flow a ScorerPress must match."""

    name = "value_norm_reference"
    supports_decoding = True

    def score(self, ctx):
        return ValueNormScorer().score(ctx)


def naive_scores(values: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]`` the scorer's scores, written again without tensors' broadcasting."""
    b, h, s, _ = values.shape
    out = torch.empty(b, h, s)
    for i in range(b):
        for j in range(h):
            for t in range(s):
                out[i, j, t] = float(values[i, j, t].float().norm()) ** (j + 1)
    return out


def naive_kept(scores: torch.Tensor, counts: list[list[int]], n_sink: int, window: int) -> list[list[list[int]]]:
    """Per row and head: the ``counts[b][h]`` best tokens, the first ``n_sink`` and last ``window`` always among
    them, in ascending order."""
    b, h, s = scores.shape
    kept = []
    for i in range(b):
        rows = []
        for j in range(h):
            protected = [t for t in range(s) if t < n_sink or t >= s - window]
            rest = sorted((t for t in range(s) if t not in protected), key=lambda t: -float(scores[i, j, t]))
            rows.append(sorted(protected + rest[:counts[i][j] - len(protected)]))
        kept.append(rows)
    return kept


def stored_tokens(layer, full_keys: torch.Tensor) -> list[list[list[int]]]:
    """Per row and head, which context tokens a compressed layer holds, matched on the full cache's keys
    ``[B, H, S, D]`` (each held key must be exactly one context key)."""
    b, h = full_keys.shape[:2]
    if layer.per_head:  # ragged: flat [N, D], head segments in (b, h) row-major order
        segments = layer.flat_keys.split(layer.lengths.flatten().tolist())
    else:  # dense: [B, H, P, D], the first valid-count slots of each row hold kept entries
        counts = layer.valid.sum(-1).tolist()
        segments = [layer.keys[i, j, :counts[i]] for i in range(b) for j in range(h)]
    out = [[None] * h for _ in range(b)]
    for i in range(b):
        for j in range(h):
            match = (segments[i * h + j][:, None, :] == full_keys[i, j][None]).all(-1)  # [n, S]
            assert bool((match.sum(-1) == 1).all()), "each held key is exactly one context key"
            out[i][j] = match.float().argmax(-1).tolist()
    return out


# -- the protocol ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_presses())
def test_every_registered_press_is_a_scorer(name):
    p = create_press(name)
    assert isinstance(p, Scorer)
    check_scorer(p)  # declarations well formed: bools, needs from NEEDS
    assert set(p.needs) <= set(NEEDS)


def test_a_plain_class_is_a_scorer_and_not_a_press():
    scorer = ValueNormScorer()
    assert isinstance(scorer, Scorer) and not isinstance(scorer, Press)
    check_scorer(scorer)


# -- a plain scorer as a press: compared with naive references -------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scorer_press_with_the_uniform_allocator_keeps_the_naive_top_k(arch):
    model = cached_tiny_model(arch, "sdpa")
    ids = random_ids(40, batch=2, seed=21, distinct=True)  # no tied scores
    full = prefill(model, ids)
    p = ScorerPress(scorer=ValueNormScorer(), ratio=0.6, n_sink=3, window=2)
    cache = prefill(model, ids, p)
    keep = max(keep_count(40, 0.6), 3 + 2)
    for idx in full_attention_layers(model.config):
        full_keys, full_values = full.layers[idx].keys, full.layers[idx].values
        heads = full_keys.shape[1]
        expected = naive_kept(naive_scores(full_values), [[keep] * heads] * 2, n_sink=3, window=2)
        assert stored_tokens(cache.layers[idx], full_keys) == expected
        assert cache.layers[idx].get_seq_length() == 40


def test_scorer_press_with_head_adaptive_matches_the_press_flow_and_keeps_each_heads_top_tokens():
    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(48, seed=22, distinct=True)
    full = prefill(model, ids)
    p = ScorerPress(scorer=ValueNormScorer(), ratio=0.5, allocator="head_adaptive", n_sink=4)
    cache = prefill(model, ids, p)
    reference = prefill(model, ids, ValueNormPress(ratio=0.5, allocator="head_adaptive", n_sink=4))
    ragged = 0
    for idx in full_attention_layers(model.config):
        layer, full_keys = cache.layers[idx], full.layers[idx].keys
        held = stored_tokens(layer, full_keys)
        assert held == stored_tokens(reference.layers[idx], full_keys)  # the same as a Press subclass would keep
        counts = [[len(head) for head in row] for row in held]
        heads = full_keys.shape[1]
        assert sum(counts[0]) == heads * keep_count(48, 0.5)  # the layer's budget, moved between heads
        ragged += len(set(counts[0])) > 1
        assert held == naive_kept(naive_scores(full.layers[idx].values), counts, n_sink=4, window=0)
    assert ragged > 0, "the per-head weights should give heads different budgets somewhere"


def test_scorer_press_decodes_like_the_press_flow():
    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(30, seed=23)
    logits = []
    for p in (ScorerPress(scorer=ValueNormScorer(), ratio=0.5, window=2), ValueNormPress(ratio=0.5, window=2)):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model, p):
            model(ids, **{CACHE_KWARG: cache})
            out = model.generate(torch.cat([ids, torch.tensor([[5, 6]])], dim=1), cache=cache,
                                 max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(out.logits))
    assert torch.equal(logits[0], logits[1])


# -- wrappers accept a scorer ---------------------------------------------------------------------------------------
def test_chunkkv_takes_a_plain_scorer():
    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(50, seed=24)
    ours = ChunkKVPress(scorer=ValueNormScorer(), ratio=0.5, chunk_size=5, window=4)
    assert isinstance(ours.scorer, ScorerPress) and ours.scorer.scorer.__class__ is ValueNormScorer
    theirs = ChunkKVPress(scorer=ValueNormPress(), ratio=0.5, chunk_size=5, window=4)
    a, b = prefill(model, ids, ours), prefill(model, ids, theirs)
    for idx in full_attention_layers(model.config):
        assert torch.equal(a.layers[idx].keys, b.layers[idx].keys)
        assert a.layers[idx].keys.shape[2] == keep_count(50, 0.5)


def test_decoding_press_takes_a_plain_scorer():
    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(20, seed=25)
    sizes = []
    for scorer in (ValueNormScorer(), ValueNormPress()):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model, DecodingPress(scorer=scorer, target=16, interval=4)):
            model(ids, **{CACHE_KWARG: cache})
            for token in range(12):
                model(torch.tensor([[token + 1]]), **{CACHE_KWARG: cache})
        sizes.append((cache.layers[0].keys.shape[2], cache.layers[0].keys.clone()))
    assert 16 <= sizes[0][0] < 20 and sizes[0][0] == sizes[1][0]
    assert torch.equal(sizes[0][1], sizes[1][1])


def test_calibrated_press_takes_a_plain_scorer(tmp_path):
    from kvpress_like.calibration import FORMAT, model_fingerprint

    model = cached_tiny_model("llama", "sdpa")
    params = tmp_path / "cal.json"
    entry = {"alpha": -0.8, "beta": 1.0}
    params.write_text(json.dumps({"format": FORMAT, "model": {"weights_sha256": model_fingerprint(model)},
                                  "presses": {"scorer": entry, "value_norm_reference": entry}}))
    ids = random_ids(60, seed=26)
    ours = CalibratedPress(scorer=ValueNormScorer(), quality=0.7, params=str(params))
    theirs = CalibratedPress(scorer=ValueNormPress(), quality=0.7, params=str(params))
    a, b = prefill(model, ids, ours), prefill(model, ids, theirs)
    assert compression_info(a)["ratio"] == compression_info(b)["ratio"] > 0
    for idx in full_attention_layers(model.config):
        assert torch.equal(a.layers[idx].keys, b.layers[idx].keys)


# -- refusals -------------------------------------------------------------------------------------------------------
class ScoreOnly:
    def score(self, ctx):
        return ctx.keys.norm(dim=-1)


@pytest.mark.parametrize("build", [
    lambda s: ScorerPress(scorer=s),
    lambda s: ChunkKVPress(scorer=s),
    lambda s: DecodingPress(scorer=s),
    lambda s: CalibratedPress(scorer=s),
    lambda s: as_press(s),
])
def test_a_non_scorer_is_refused_naming_what_it_lacks(build):
    with pytest.raises(TypeError, match=r"must be a Press, a press name or a scorer.*int lacks score\(ctx\), needs"):
        build(42)
    with pytest.raises(TypeError, match="ScoreOnly lacks needs, is_plain_scorer, acts_while_decoding, "
                                        "supports_decoding, score_depends_on_ratio"):
        build(ScoreOnly())


def test_bad_declarations_and_scorers_a_press_cannot_host_are_refused():
    class Typo(ValueNormScorer):
        needs = frozenset({"querys"})

    class NotBool(ValueNormScorer):
        supports_decoding = "yes"

    class Selects(ValueNormScorer):
        is_plain_scorer = False

    with pytest.raises(ValueError, match="unknown need.*querys"):
        ScorerPress(scorer=Typo())
    with pytest.raises(TypeError, match="NotBool.supports_decoding must be True or False"):
        ScorerPress(scorer=NotBool())
    with pytest.raises(ValueError, match="Selects selects, installs hooks or acts while decoding by itself"):
        ScorerPress(scorer=Selects())
    with pytest.raises(ValueError, match="ChunkKVPress selects"):
        ScorerPress(scorer=ChunkKVPress())
    with pytest.raises(ValueError, match="scores depend on its ratio"):
        ScorerPress(scorer=create_press("compactor", blending=None, ratio=0.3), ratio=0.5)
    with pytest.raises(ValueError, match="cannot score while decoding"):
        DecodingPress(scorer=ScorerPress(scorer=type("NoDecoding", (ValueNormScorer,), {"supports_decoding": False})()))


# -- configuration: equality, hashing, dict form ---------------------------------------------------------------------
def test_scorer_press_is_immutable_configuration_without_a_dict_form():
    scorer = ValueNormScorer()
    p = ScorerPress(scorer=scorer, ratio=0.5, allocator="head_adaptive", n_sink=4)
    same = ScorerPress(scorer=scorer, ratio=0.5, allocator=kvpress_like.HeadAdaptiveAllocator(), n_sink=4)
    assert p == same and hash(p) == hash(same) and len({p, same}) == 1
    assert p != p.replace(ratio=0.4) and p != ScorerPress(scorer=ValueNormScorer(), ratio=0.5,
                                                          allocator="head_adaptive", n_sink=4)  # another object
    with pytest.raises(AttributeError, match="immutable"):
        p.ratio = 0.3
    assert describe(p) == "scorer(ratio=0.5, allocator='head_adaptive', n_sink=4, ValueNormScorer)"
    for wrapped in (p, DecodingPress(scorer=scorer), ChunkKVPress(scorer=scorer)):
        with pytest.raises(TypeError, match=r"ScorerPress\(scorer=ValueNormScorer\(...\)\) cannot be written as a dict"
                                            ".*press_from_dict rebuilds registered presses only"):
            wrapped.to_dict()
        assert wrapped == wrapped.replace() and hash(wrapped) == hash(wrapped.replace())  # still hashable


def test_wrappers_of_registered_presses_still_round_trip():
    for p in (ChunkKVPress(scorer="knorm", ratio=0.5), DecodingPress(scorer=create_press("knorm", ratio=0.3)),
              ChunkKVPress(scorer=create_press("snapkv", window=8), allocator="pyramid", ratio=0.5)):
        again = press_from_dict(json.loads(json.dumps(p.to_dict())))
        assert again == p and hash(again) == hash(p)


# -- built-in declarations match the code ----------------------------------------------------------------------------
@pytest.fixture
def reads(monkeypatch):
    """Record which parts of the layer context are read (``queries``, ``pre_rope``, ``rope_tables``)."""
    seen: set[str] = set()
    original_queries = LayerContext.queries

    def queries(self, *args, **kwargs):
        seen.add("queries")
        return original_queries(self, *args, **kwargs)

    def recorded(prop: cached_property):
        def get(self):
            seen.add("pre_rope")
            return prop.func(self)
        return property(get)

    from kvpress_like import context

    original_rope = context.LayerHooks.rope_at

    def rope_at(self, *args, **kwargs):
        seen.add("rope_tables")
        return original_rope(self, *args, **kwargs)

    monkeypatch.setattr(LayerContext, "queries", queries)
    monkeypatch.setattr(LayerContext, "pre_rope_keys", recorded(LayerContext.__dict__["pre_rope_keys"]))
    monkeypatch.setattr(LayerContext, "pre_rope_queries", recorded(LayerContext.__dict__["pre_rope_queries"]))
    monkeypatch.setattr(context.LayerHooks, "rope_at", rope_at)
    return seen


# the presses whose scores come from a flow of their own: declared, and checked in their own tests
OWN_FLOW = {"calibrated": "needs the shipped parameters", "decoding": "its scorer's needs",
            "kvzip": "second_forward: scores from a second forward", "fastkv": "scores in its own hooks",
            "razor_attention": "scores in its own hooks"}


@pytest.mark.parametrize("name", [n for n in list_presses() if n not in OWN_FLOW])
def test_needs_are_exactly_what_score_reads(name, reads):
    model = cached_tiny_model("llama", "sdpa")
    p = create_press(name, ratio=0.5)
    prefill(model, random_ids(40, seed=27), p)
    assert reads == set(p.needs), f"{name} declares {sorted(p.needs)} but read {sorted(reads)}"


def test_wrappers_declare_their_scorers_needs():
    assert ChunkKVPress(scorer="compactor").needs == {"queries", "pre_rope"}
    assert DecodingPress(scorer="snapkv").needs == {"queries"}
    assert CalibratedPress(scorer="leverage").needs == {"pre_rope"}
    assert ScorerPress(scorer=ValueNormScorer()).needs == frozenset()
    assert create_press("kvzip").needs == {"second_forward"}
