"""Every scorer against a naive reference written here, on random inputs.

The references are deliberately slow and literal: python loops over batch rows, heads, chunks and tokens, dense
``S x S`` attention matrices, explicit RoPE matrices, ``pinv`` hat matrices, all in float64. Inputs cover GQA
(6 query heads / 2 KV heads), batches whose rows have different contents and different amounts of left padding
(padding positions hold large garbage, so any leak shows), and bf16/fp16 inputs (scores must be fp32; compared with
a tolerance suited to the input dtype, or by kept set with a margin).

Layer contexts are built by hand from tiny models (``tests/tiny_models.py``: Llama, Qwen3 with q/k norms, Phi3 with a
fused ``qkv_proj`` and partial rotary, Gemma3 with its own attention scale): random hidden states go through the
attention module once on a ``DynamicCache``, so the context's keys/values are exactly what the model caches. The
references recompute queries and keys in float64 from the module's own weights (``q_proj``/``k_proj``/``v_proj`` or
the fused ``qkv_proj``, the per-head norms) and apply RoPE from the ``(cos, sin)`` tables themselves; a harness test
checks them against the cached keys and the package's recomputed queries.

Also here: determinism (same input, same kept tokens, for every registered press) and memory linearity (no scorer
allocates an ``S x S`` tensor, recorded with a ``TorchDispatchMode``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import kvpress_like
from kvpress_like.allocators.base import keep_count
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.compressors import (
    compactor,
    cur,
    expected_attention,
    leverage,
    non_causal_attention,
    observed_attention,
    snapkv,
)
from kvpress_like.press import LayerContext, select_top
from kvpress_like.registry import architecture_for

#: every registered prefill press ("decoding" and "calibrated" wrap a scorer: test_decoding.py, test_calibration.py)
# razor_attention is a head policy without token scores (ragged layers with a compensation token); its determinism,
# no-S x S and budget checks are in tests/test_razor_attention.py
# kvzip and fastkv select after forwards of the whole model (reconstruction / token propagation), never one layer at a
# time: their determinism and budget checks are in tests/test_kvzip.py and tests/test_fastkv.py, their no-S x S check
# is test_whole_model_presses_build_no_s_by_s_tensor below
WHOLE_MODEL_PRESSES = ("kvzip", "fastkv")
PREFILL_PRESSES = [name for name in kvpress_like.list_presses()
                   if name not in ("decoding", "calibrated", "razor_attention", *WHOLE_MODEL_PRESSES)]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Scorers run under ``no_grad`` inside the press hooks; do the same here."""
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Hand-built layer contexts
# ---------------------------------------------------------------------------------------------------------------------

#: name -> (architecture, layer index, tiny_model overrides). Every case has 6 query heads and 2 KV heads (GQA).
CASES = {
    "llama": ("llama", 1, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)),
    "qwen3": ("qwen3", 1, dict(num_attention_heads=6, num_key_value_heads=2)),  # q_norm / k_norm before RoPE
    "phi3": ("phi3", 1, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.5)),
    "gemma3": ("gemma3", 1, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                 query_pre_attn_scalar=24)),  # scale 24**-0.5, not 1/sqrt(head_dim)
}
SHAPE_CASES = ("llama", "qwen3", "phi3", "gemma3")
PADS = (0, 3, 11)  # leading padding tokens of each row
SEQ = 40

_MODELS: dict = {}


def get_model(case: str, dtype: torch.dtype = torch.float32):
    """Tiny model of ``case`` (sharp attention: ``initializer_range=0.15``; norm weights perturbed), cached."""
    key = (case, dtype)
    if key not in _MODELS:
        arch, _, overrides = CASES[case]
        model = tiny_model(arch, initializer_range=0.15, **overrides)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in model.modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=generator))
        _MODELS[key] = model.to(dtype)
    return _MODELS[key]


def rotary_tables(model, layer_idx: int, x: torch.Tensor, position_ids: torch.Tensor):
    """``(cos, sin)`` of the model's rotary embedding for the layer's attention type."""
    rotary = model.model.rotary_emb
    layer_type = getattr(model.model.layers[layer_idx].self_attn, "layer_type", None)
    if layer_type is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(x, position_ids, layer_type=layer_type)
    return rotary(x, position_ids)


def ref_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention, on the first ``cos.shape[-1]`` dims (partial rotary leaves the rest alone).

    ``x`` ``[B, H, S, D]``; ``cos``/``sin`` ``[B or 1, S, r]``.
    """
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos[:, None] + rotated_half * sin[:, None], rest], dim=-1)


def ref_projections(attn, hidden: torch.Tensor, dtype=F64):
    """Pre-RoPE ``(q [B,H_q,S,D], k [B,H_kv,S,D], v)`` from the module's own weights, computed in ``dtype``."""
    cfg = attn.config
    d = attn.head_dim
    n_q, n_kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    x = hidden.to(dtype)
    if hasattr(attn, "qkv_proj"):
        w = attn.qkv_proj.weight.to(dtype)
        bias = attn.qkv_proj.bias.to(dtype) if attn.qkv_proj.bias is not None else None
        flat = x @ w.T + (bias if bias is not None else 0)
        q, k, v = flat[..., :n_q], flat[..., n_q:n_q + n_kv], flat[..., n_q + n_kv:]
    else:
        def lin(layer):
            out = x @ layer.weight.to(dtype).T
            return out + layer.bias.to(dtype) if layer.bias is not None else out

        q, k, v = lin(attn.q_proj), lin(attn.k_proj), lin(attn.v_proj)
    b, s = hidden.shape[:2]
    q, k, v = q.view(b, s, -1, d), k.view(b, s, -1, d), v.view(b, s, -1, d)

    def rms(t, norm):
        if norm is None:
            return t
        w = norm.weight.to(dtype)
        scale = (1.0 + w) if "Gemma" in type(norm).__name__ else w
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * scale

    q = rms(q, getattr(attn, "q_norm", None))
    k = rms(k, getattr(attn, "k_norm", None))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@dataclass
class Ref:
    """float64 reference tensors of one hand-built context."""

    q_pre: torch.Tensor  # [B, H_q, S, D]
    k_pre: torch.Tensor  # [B, H_kv, S, D]
    q: torch.Tensor  # post-RoPE
    k: torch.Tensor  # post-RoPE
    v: torch.Tensor
    valid: torch.Tensor  # [B, S] bool
    scale: float
    cos: torch.Tensor  # fp64 tables
    sin: torch.Tensor

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def layer_context(model, **kwargs) -> LayerContext:
    """A :class:`LayerContext` for ``model``; fills ``layers`` (the compressible layers) when the class has it."""
    names = {f.name for f in dataclasses.fields(LayerContext)}
    arch = architecture_for(model.config)
    kwargs.setdefault("arch", arch)
    kwargs.setdefault("num_layers", model.config.num_hidden_layers)
    if "layers" in names:
        kwargs.setdefault("layers", tuple(arch.compressible_layers(model.config)))
    return LayerContext(**kwargs)


def make_valid(seq: int, pads) -> torch.Tensor:
    """``[B, seq]`` bool with ``pads[b]`` leading False."""
    return torch.arange(seq)[None, :] >= torch.tensor(pads)[:, None]


def build_ctx(case: str = "llama", pads=PADS, seq: int = SEQ, dtype=torch.float32, seed: int = 0,
              layer_idx: int | None = None):
    """A LayerContext built by hand (random hidden states, garbage on padding) and its float64 reference."""
    model = get_model(case, dtype)
    layer_idx = CASES[case][1] if layer_idx is None else layer_idx
    attn = model.model.layers[layer_idx].self_attn
    generator = torch.Generator().manual_seed(seed)
    valid = make_valid(seq, pads)
    hidden = torch.randn(len(pads), seq, model.config.hidden_size, generator=generator)
    garbage = 6.0 * torch.randn(hidden.shape, generator=generator) + 3.0
    hidden = torch.where(valid[..., None], hidden, garbage).to(dtype)
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rotary_tables(model, layer_idx, hidden, position_ids)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)  # keys and values exactly as the model caches them
        attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None, **{CACHE_KWARG: cache})
        keys, v = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        ctx = layer_context(
            model, module=attn, layer_idx=layer_idx, hidden_states=hidden, position_embeddings=(cos, sin),
            keys=keys, values=v, valid=valid,
            rotary=lambda pos: rotary_tables(model, layer_idx, hidden[:1, :1], pos[None]),
        )
        q64, k64, v64 = ref_projections(attn, hidden, dtype=F64)
        cos64, sin64 = cos.to(F64), sin.to(F64)
        ref = Ref(q64, k64, ref_rope(q64, cos64, sin64), ref_rope(k64, cos64, sin64), v64, valid, attn.scaling,
                  cos64, sin64)
    return ctx, ref


# ---------------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------------------

#: relative tolerance on scores, by input dtype (scores themselves are always fp32).
RTOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor, rtol: float = 2e-4,
                        atol: float | None = None):
    """Scores equal on real tokens, relative to each head's score scale; ``got`` is fp32."""
    assert got.dtype == torch.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    mask = valid[:, None, :].expand_as(want)
    g, w = got.to(F64)[mask], want[mask]
    scale = w.abs().max().clamp(min=1e-30)
    tol = rtol * scale if atol is None else atol
    err = (g - w).abs().max()
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g} (scale {scale:.3g})"


def kept_sets(scores: torch.Tensor, valid: torch.Tensor, ratio: float = 0.5):
    """Kept set of every (row, head) under the uniform budget, via :func:`select_top`: list of lists of sets."""
    scores = scores.float().masked_fill(~valid[:, None, :], -math.inf)
    counts = torch.tensor([keep_count(int(n), ratio) for n in valid.sum(-1)])[:, None].expand(scores.shape[:2])
    indices, slot_valid = select_top(scores, counts)
    return [[set(indices[b, h][slot_valid[b, h]].tolist()) for h in range(scores.shape[1])]
            for b in range(scores.shape[0])]


def assert_same_kept(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor, margin: float, ratio: float = 0.5):
    """Kept sets of ``got`` and ``want`` agree, except tokens whose reference score is within ``margin`` of the
    reference's cut-off (there the input dtype's rounding may legitimately decide)."""
    got_sets, want_sets = kept_sets(got, valid, ratio), kept_sets(want, valid, ratio)
    for b in range(want.shape[0]):
        for h in range(want.shape[1]):
            row = want[b, h]
            kept = sorted(want_sets[b][h], key=lambda i: float(row[i]))
            cut = float(row[kept[0]])
            for i in got_sets[b][h] ^ want_sets[b][h]:
                assert abs(float(row[i]) - cut) <= margin, (
                    f"row {b} head {h} token {i}: score {float(row[i]):.4g} far from cut-off {cut:.4g}")


def ref_softmax_rows(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row softmax over ``allowed`` entries; rows with nothing allowed are 0."""
    out = torch.zeros_like(logits)
    for i in range(logits.shape[0]):
        cols = allowed[i].nonzero().flatten()
        if len(cols):
            out[i, cols] = torch.softmax(logits[i, cols], dim=0)
    return out


def ref_avg_pool(x: torch.Tensor, kernel: int, valid: torch.Tensor) -> torch.Tensor:
    """Average of each real token's real neighbours ``[i - k//2, i + k//2]`` on ``[B, H, S]``; 0 on padding."""
    r = kernel // 2
    b_, h_, s = x.shape
    out = torch.zeros(b_, h_, s, dtype=F64)
    for b in range(b_):
        for i in range(s):
            if valid[b, i]:
                near = [j for j in range(max(0, i - r), min(s, i + r + 1)) if valid[b, j]]
                out[b, :, i] = x[b, :, near].to(F64).mean(-1)
    return out


def ref_standardise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row and head: ``(x - mean) / (std + 1e-6)`` over real tokens (population std), 0 on padding."""
    out = torch.zeros_like(x, dtype=F64)
    for b in range(x.shape[0]):
        real = valid[b].nonzero().flatten()
        for h in range(x.shape[1]):
            vals = x[b, h, real].to(F64)
            mean = vals.mean()
            std = ((vals - mean) ** 2).mean().sqrt()
            out[b, h, real] = (vals - mean) / (std + 1e-6)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reference scorers
# ---------------------------------------------------------------------------------------------------------------------


def gaussian(dim: int, width: int, seed: int) -> torch.Tensor:
    """The documented sketch: seeded ``torch.Generator``, entries ``N(0, 1/width)``."""
    return torch.randn(dim, width, generator=torch.Generator().manual_seed(seed)) / width**0.5


def ref_leverage(keys: torch.Tensor, valid: torch.Tensor, sketch: torch.Tensor | None = None) -> torch.Tensor:
    """Exact leverage (diagonal of the hat matrix, via ``pinv``) of the centred, optionally sketched real keys."""
    b_, h_, s, _ = keys.shape
    out = torch.zeros(b_, h_, s, dtype=F64)
    for b in range(b_):
        real = valid[b].nonzero().flatten()
        for h in range(h_):
            x = keys[b, h, real].to(F64)
            if sketch is not None:
                x = x @ sketch.to(F64)
            x = x - x.mean(0, keepdim=True)
            hat = x @ torch.linalg.pinv(x, rtol=1e-5)  # inputs are fp32: below 1e-5 is rounding noise
            out[b, h, real] = hat.diagonal()
    return out


def first_real(valid_row: torch.Tensor) -> int:
    """Index of a row's first real token (its left padding)."""
    return int(valid_row.nonzero()[0]) if bool(valid_row.any()) else 0


def ref_non_causal(q, k, valid, scale: float, chunk: int) -> torch.Tensor:
    """Loop over chunks laid from each row's first real token: dense non-causal softmax among the real tokens of the
    chunk, column sums, mean over group."""
    b_, h_q, s, _ = q.shape
    g = h_q // k.shape[1]
    out = torch.zeros(b_, k.shape[1], s, dtype=F64)
    for b in range(b_):
        for h in range(h_q):
            for start in range(first_real(valid[b]), s, chunk):
                idx = [i for i in range(start, min(start + chunk, s)) if valid[b, i]]
                if not idx:
                    continue
                logits = q[b, h, idx].to(F64) @ k[b, h // g, idx].to(F64).T * scale
                out[b, h // g, idx] += torch.softmax(logits, dim=-1).sum(0) / g
    return out


def ref_causal_attention(q, k, valid, scale: float, b: int, h: int) -> torch.Tensor:
    """Dense ``[S, S]`` causal attention of query head ``h`` in row ``b`` (padding keys masked, padding rows 0)."""
    g = q.shape[1] // k.shape[1]
    s = q.shape[2]
    logits = q[b, h].to(F64) @ k[b, h // g].to(F64).T * scale
    allowed = torch.ones(s, s, dtype=torch.bool).tril() & valid[b][None, :] & valid[b][:, None]
    return ref_softmax_rows(logits, allowed)


def ref_observed(q, k, valid, scale: float) -> torch.Tensor:
    """Column sums of the dense causal attention divided by the number of real queries at or after the key."""
    b_, h_q, s, _ = q.shape
    g = h_q // k.shape[1]
    out = torch.zeros(b_, k.shape[1], s, dtype=F64)
    for b in range(b_):
        later = torch.tensor([int(valid[b, j:].sum()) for j in range(s)], dtype=F64)
        for h in range(h_q):
            attn = ref_causal_attention(q, k, valid, scale, b, h)
            out[b, h // g] += torch.where(valid[b], attn.sum(0) / later.clamp(min=1), 0.0) / g
    return out


def ref_window_attention(q, k, valid, scale: float, window: int) -> torch.Tensor:
    """``[B, H_kv, G, W, S]``: last ``W`` rows of the dense causal attention of each query head."""
    b_, h_q, s, _ = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    w = min(window, s)
    out = torch.zeros(b_, h_kv, g, w, s, dtype=F64)
    for b in range(b_):
        for h in range(h_q):
            out[b, h // g, h % g] = ref_causal_attention(q, k, valid, scale, b, h)[s - w:]
    return out


def ref_snapkv(q, k, valid, scale: float, window: int, kernel: int) -> torch.Tensor:
    weights = ref_window_attention(q, k, valid, scale, window)
    return ref_avg_pool(weights.sum(3).mean(2), kernel, valid)


def ref_cur(keys, values, valid, width: int, seed: int) -> torch.Tensor:
    proj = gaussian(keys.shape[-1], width, seed).to(F64)
    b_, h_, s, _ = keys.shape
    out = torch.zeros(b_, h_, s, dtype=F64)
    for b in range(b_):
        for h in range(h_):
            for j in range(s):
                if valid[b, j]:
                    lk = ((keys[b, h, j].to(F64) @ proj) ** 2).sum()
                    lv = ((values[b, h, j].to(F64) @ proj) ** 2).sum()
                    out[b, h, j] = lk * lv
            out[b, h] /= out[b, h].sum()
    return out


def ref_rope_matrix(cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """Explicit ``[D, D]`` RoPE matrix of one position (rotate-half convention; identity beyond the rotary dims)."""
    r = cos.shape[-1]
    half = r // 2
    m = torch.eye(dim, dtype=F64)
    for i in range(r):
        m[i, i] = cos[i]
        if i < half:
            m[i, i + half] = -sin[i]  # out_i = x_i cos_i - x_{i+half} sin_i
        else:
            m[i, i - half] = sin[i]  # out_i = x_i cos_i + x_{i-half} sin_i
    return m


def ref_averaged_rotation(ctx: LayerContext, start: int, n: int, dim: int) -> torch.Tensor:
    cos, sin = ctx.rotary(torch.arange(start, start + n))
    mats = [ref_rope_matrix(cos[0, t].to(F64), sin[0, t].to(F64), dim) for t in range(n)]
    return torch.stack(mats).mean(0)


def ref_expected_attention(keys, values, q_pre, valid, rotation, scale: float, n_sink: int) -> torch.Tensor:
    """Gaussian model of future queries (loops for the moments), ``exp(s k.mu + s^2 k^T Sigma k / 2)`` normalised over
    the row's keys, mean over the query heads of a group, times ``||v||``."""
    b_, h_q, s, d = q_pre.shape
    h_kv = keys.shape[1]
    g = h_q // h_kv
    rot = rotation.to(F64)
    out = torch.zeros(b_, h_kv, s, dtype=F64)
    for b in range(b_):
        real = valid[b].nonzero().flatten().tolist()
        stats = real[n_sink:] or real
        for h in range(h_q):
            xs = [q_pre[b, h, i].to(F64) for i in stats]
            mu = sum(xs) / len(xs)
            sigma = sum(torch.outer(x - mu, x - mu) for x in xs) / len(xs)
            mu, sigma = rot @ mu, rot @ sigma @ rot.T
            expo = torch.full((s,), -math.inf, dtype=F64)
            for j in real:
                kj = keys[b, h // g, j].to(F64)
                expo[j] = scale * kj @ mu + 0.5 * scale**2 * kj @ sigma @ kj
            p = torch.exp(expo - expo.max())
            out[b, h // g] += p / p.sum() / g
        out[b] *= values[b].to(F64).norm(dim=-1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Harness sanity
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_harness_keys_match_what_the_model_caches(case):
    """The float64 reference projections and RoPE agree with what the attention module caches (so the references
    are sound), and the package's recomputed queries/pre-RoPE keys agree with them."""
    ctx, ref = build_ctx(case)
    torch.testing.assert_close(ref.k.float(), ctx.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref.v.float(), ctx.values, rtol=1e-4, atol=1e-4)
    assert ctx.keys.shape[1] == 2 and ref.q.shape[1] == 6  # GQA
    torch.testing.assert_close(ctx.queries().to(F64), ref.q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ctx.pre_rope_keys.to(F64), ref.k_pre, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_captured_projections_give_the_recomputed_queries_and_keys(case, attn):
    """During a real prefill the hooks capture the query and key projections (one fused ``qkv_proj`` for Phi3) and,
    with sdpa, the post-RoPE queries; what scorers derive from them equals what is recomputed from the hidden states."""
    model = get_model(case)
    arch = architecture_for(model.config)
    seen = []

    class Recording(kvpress_like.KnormPress):
        def score(self, ctx):
            fresh = dataclasses.replace(ctx, projections={})
            seen.append((set(ctx.projections), (ctx.pre_rope_keys, ctx.pre_rope_queries, ctx.queries(), ctx.queries(5)),
                         (arch.pre_rope_keys(ctx.module, ctx.hidden_states),
                          arch.pre_rope_queries(ctx.module, ctx.hidden_states),
                          fresh.queries(), fresh.queries(5))))
            return super().score(ctx)

    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    previous = model.config._attn_implementation
    model.config._attn_implementation = attn
    try:
        with torch.no_grad(), kvpress_like.press(model, Recording(ratio=0.5)):
            model(ids)
    finally:
        model.config._attn_implementation = previous
    assert len(seen) == len(architecture_for(model.config).compressible_layers(model.config))
    for names, got, want in seen:
        assert names == ({"q", "k", "q_rope"} if attn == "sdpa" else {"q", "k"})
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y)


def test_press_switches_the_attention_name_only_while_active():
    """transformers' sdpa function is never wrapped or replaced: a press switches its model to the attention registered
    once by name (``kvpress_like_sdpa``, which keeps the post-RoPE queries of a compressed prefill) and back on exit
    (two models at once, exits in any order, an error inside the block)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    registered = ALL_ATTENTION_FUNCTIONS["kvpress_like_sdpa"]
    first, second = get_model("llama"), get_model("qwen3")
    one = kvpress_like.press(first, kvpress_like.KnormPress(0.5))
    two = kvpress_like.press(second, kvpress_like.KnormPress(0.5))
    one.__enter__()
    two.__enter__()
    assert first.config._attn_implementation == second.config._attn_implementation == "kvpress_like_sdpa"
    one.__exit__(None, None, None)
    assert (first.config._attn_implementation, second.config._attn_implementation) == ("sdpa", "kvpress_like_sdpa")
    two.__exit__(None, None, None)
    assert first.config._attn_implementation == second.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with kvpress_like.press(first, kvpress_like.KnormPress(0.5)):
            raise RuntimeError("inside")
    assert first.config._attn_implementation == "sdpa"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original and ALL_ATTENTION_FUNCTIONS["kvpress_like_sdpa"] is registered


def test_helpers_detect_a_difference():
    """The comparison helpers are not vacuous."""
    valid = make_valid(12, (0, 2))
    want = torch.randn(2, 2, 12, dtype=F64)
    with pytest.raises(AssertionError):
        assert_scores_close((want + 0.1).float(), want, valid)
    with pytest.raises(AssertionError):
        assert_same_kept(-want, want, valid, margin=1e-3)
    assert_same_kept(want.float(), want, valid, margin=1e-6)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_scorer_functions_match_references_over_shapes(data):
    """Non-causal attention, observed attention, CUR and leverage over random shapes, GQA groups and paddings."""
    b, h_kv, g = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    s, d = data.draw(st.integers(1, 24)), data.draw(st.sampled_from([4, 8]))
    pads = tuple(data.draw(st.integers(0, s - 1)) for _ in range(b))
    chunk, seed = data.draw(st.integers(1, 30)), data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    valid = make_valid(s, pads)
    q = torch.randn(b, h_kv * g, s, d, generator=generator)
    k = torch.where(valid[:, None, :, None], torch.randn(b, h_kv, s, d, generator=generator), 25.0)
    v = torch.randn(b, h_kv, s, d, generator=generator)
    assert_scores_close(non_causal_attention.non_causal_attention_scores(q, k, valid, 0.5, chunk),
                        ref_non_causal(q, k, valid, 0.5, chunk), valid, rtol=1e-4)
    assert_scores_close(observed_attention.observed_attention_scores(q, k, valid, 0.5, chunk),
                        ref_observed(q, k, valid, 0.5), valid, rtol=1e-4)
    assert_scores_close(cur.cur_scores(k, v, valid, 3, seed), ref_cur(k, v, valid, 3, seed), valid, rtol=1e-4)
    width = min(s - max(pads), 24) // 4  # leverage vs exact: well-conditioned only with n >= 4k real tokens
    if width >= 1:
        sketch = min(width, d)
        got = leverage.leverage_scores(k, valid, sketch_size=sketch if sketch < d else d, seed=seed)
        want = ref_leverage(k, valid, gaussian(d, sketch, seed) if sketch < d else None)
        assert_scores_close(got, want, valid, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------------
# Leverage
# ---------------------------------------------------------------------------------------------------------------------


def random_keys(b=3, h=2, s=40, d=16, pads=PADS, seed=0, offset=2.0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, s, d, generator=generator) + offset  # a common offset, removed by centring
    valid = make_valid(s, pads)
    garbage = 50.0 * torch.randn(keys.shape, generator=generator)
    return torch.where(valid[:, None, :, None], keys, garbage), valid


@pytest.mark.parametrize("sketch_size", [6, 12])
def test_leverage_matches_exact_leverage_of_centred_sketched_keys(sketch_size):
    keys, valid = random_keys()
    got = leverage.leverage_scores(keys, valid, sketch_size=sketch_size, seed=3)
    want = ref_leverage(keys, valid, gaussian(16, sketch_size, 3))
    assert_scores_close(got, want, valid, rtol=3e-3)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()
    # a hat matrix's diagonal sums to its rank: the sketch width (centred rank <= n - 1, here n - 1 > k)
    torch.testing.assert_close(got.sum(-1).to(F64), torch.full(got.shape[:2], float(sketch_size), dtype=F64),
                               rtol=5e-3, atol=0)


@pytest.mark.parametrize("sketch_size", [16, 48])
def test_leverage_without_sketch_is_exact_leverage(sketch_size):
    """``sketch_size >= D``: exact leverage of the centred keys."""
    keys, valid = random_keys(d=16)
    got = leverage.leverage_scores(keys, valid, sketch_size=sketch_size)
    assert_scores_close(got, ref_leverage(keys, valid), valid, rtol=3e-3)


def test_leverage_sketch_is_seeded_and_gaussian():
    a = leverage.gaussian_sketch(64, 48, 7, "cpu")
    torch.testing.assert_close(a, leverage.gaussian_sketch(64, 48, 7, "cpu"), rtol=0, atol=0)
    torch.testing.assert_close(a, gaussian(64, 48, 7))
    assert not torch.equal(a, leverage.gaussian_sketch(64, 48, 8, "cpu"))
    big = leverage.gaussian_sketch(256, 64, 0, "cpu")
    assert abs(float(big.var()) * 64 - 1) < 0.05


def test_leverage_rank_deficient_and_constant_keys():
    generator = torch.Generator().manual_seed(0)
    valid = make_valid(30, (0, 4))
    low_rank = torch.randn(2, 2, 30, 3, generator=generator) @ torch.randn(3, 16, generator=generator)
    got = leverage.leverage_scores(low_rank, valid, sketch_size=48)
    assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1 + 1e-4).all()
    assert_scores_close(got, ref_leverage(low_rank, valid), valid, rtol=2e-2)
    torch.testing.assert_close(got.sum(-1), torch.full((2, 2), 3.0), rtol=2e-2, atol=0)  # rank 3

    constant = torch.ones(2, 2, 30, 16) * torch.linspace(-1, 1, 16)
    got = leverage.leverage_scores(constant, valid, sketch_size=8)
    assert torch.isfinite(got).all() and (got.abs() < 1e-6).all()  # 0 up to fp32 rounding of the centring

    zeros = torch.zeros(2, 2, 30, 16)
    assert (leverage.leverage_scores(zeros, valid) == 0).all()
    one_token = make_valid(30, (29, 0))
    assert torch.isfinite(leverage.leverage_scores(low_rank, one_token, sketch_size=8)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_leverage_low_precision_inputs(dtype):
    keys, valid = random_keys(s=64, pads=(0, 9), b=2)
    keys = torch.where(valid[:, None, :, None], keys, 0.0)
    got = leverage.leverage_scores(keys.to(dtype), valid, sketch_size=12, seed=1)
    assert got.dtype == torch.float32
    # computed in fp32 from the rounded inputs: tight against the reference on the same rounded values ...
    assert_scores_close(got, ref_leverage(keys.to(dtype), valid, gaussian(16, 12, 1)), valid, rtol=5e-3)
    # ... and the kept set matches the full-precision reference up to the dtype's rounding
    want = ref_leverage(keys, valid, gaussian(16, 12, 1))
    assert_same_kept(got, want, valid, margin=RTOL[dtype] * float(want.max()))


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_leverage_press_uses_pre_rope_keys(case):
    ctx, ref = build_ctx(case)
    got = kvpress_like.LeverageScorePress(sketch_size=8, seed=5).score(ctx)
    assert_scores_close(got, ref_leverage(ref.k_pre, ref.valid, gaussian(ref.k_pre.shape[-1], 8, 5)), ref.valid,
                        rtol=3e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Non-causal attention and Compactor
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_non_causal_attention_matches_dense_chunks(chunk):
    generator = torch.Generator().manual_seed(chunk)
    b, s, d = 3, 40, 8
    q = torch.randn(b, 6, s, d, generator=generator)
    k = torch.randn(b, 2, s, d, generator=generator)
    valid = make_valid(s, PADS)
    k = torch.where(valid[:, None, :, None], k, 30.0)  # garbage keys would dominate if they leaked
    got = non_causal_attention.non_causal_attention_scores(q, k, valid, 0.4, chunk)
    assert_scores_close(got, ref_non_causal(q, k, valid, 0.4, chunk), valid)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()
    # every real query of a chunk spreads mass 1 over its chunk: per row and KV head, the total is the real count
    torch.testing.assert_close(got.sum(-1), valid.sum(-1, keepdim=True).float().expand(b, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_bytes", [1, 1 << 20])
@pytest.mark.parametrize("chunk", [5, 16])
def test_non_causal_attention_padding_anywhere_and_small_blocks(monkeypatch, block_bytes, chunk):
    """Padding after real tokens (right padding, holes) is masked; one chunk per block gives the same scores."""
    monkeypatch.setattr(non_causal_attention, "BLOCK_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(chunk)
    b, s, d = 4, 37, 8
    q = torch.randn(b, 6, s, d, generator=generator, requires_grad=True)  # grad-enabled inputs are fine
    k = torch.randn(b, 2, s, d, generator=generator)
    valid = make_valid(s, (0, 4, 0, 36))
    valid[1, 30:] = False  # left and right padding
    valid[2, 10:13] = False  # a hole inside the first chunks
    valid[2, 20] = False
    k = torch.where(valid[:, None, :, None], k, 30.0)
    got = non_causal_attention.non_causal_attention_scores(q, k, valid, 0.4, chunk)
    assert_scores_close(got, ref_non_causal(q.detach(), k, valid, 0.4, chunk), valid)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()
    torch.testing.assert_close(got.sum(-1), valid.sum(-1, keepdim=True).float().expand(b, 2), rtol=1e-5, atol=1e-4)


def test_scorers_same_scores_for_any_thread_count_and_mode():
    """Same scores with 1 or 2 torch threads, in inference mode and under CPU autocast (scored in fp32 all the same);
    bad shapes raise."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 300, 8, generator=generator)
    k = torch.randn(2, 2, 300, 8, generator=generator)
    valid = make_valid(300, (0, 7))

    def both():
        return (non_causal_attention.non_causal_attention_scores(q, k, valid, 0.3, 32),
                leverage.leverage_scores(k, valid, sketch_size=4, seed=1))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = both()
        torch.set_num_threads(2)
        for got in (both(), torch.inference_mode()(both)(), torch.autocast("cpu", dtype=torch.bfloat16)(both)()):
            assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
        with pytest.raises(RuntimeError):
            non_causal_attention.non_causal_attention_scores(q, k[:, :, :100], valid, 0.3, 32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert_scores_close(want[0], ref_non_causal(q, k, valid, 0.3, 32), valid)
    assert_scores_close(want[1], ref_leverage(k, valid, gaussian(8, 4, 1)), valid, rtol=3e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_causal_attention_low_precision(dtype):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 48, 8, generator=generator)
    k = torch.randn(2, 2, 48, 8, generator=generator)
    valid = make_valid(48, (0, 5))
    got = non_causal_attention.non_causal_attention_scores(q.to(dtype), k.to(dtype), valid, 0.5, 16)
    assert got.dtype == torch.float32
    assert_scores_close(got, ref_non_causal(q.to(dtype), k.to(dtype), valid, 0.5, 16), valid)
    want = ref_non_causal(q, k, valid, 0.5, 16)
    assert_same_kept(got, want, valid, margin=RTOL[dtype] * float(want.max()))


def test_pool_is_average_over_real_neighbours():
    x = torch.randn(3, 2, 17)
    valid = make_valid(17, (0, 1, 6))
    x = torch.where(valid[:, None, :], x, 1e3)  # padding must neither contribute nor count
    for kernel in (1, 3, 5, 7):
        torch.testing.assert_close(snapkv.pool(x, valid, kernel).to(F64), ref_avg_pool(x, kernel, valid))
        full = torch.ones_like(valid)  # the no-padding path
        got = snapkv.pool(x, full, kernel).to(F64)
        torch.testing.assert_close(got, ref_avg_pool(x, kernel, full), rtol=1e-6, atol=1e-6)


def test_standardise_matches_loops():
    generator = torch.Generator().manual_seed(0)
    valid = make_valid(25, (0, 6, 20))
    x = torch.randn(3, 2, 25, generator=generator) * 5 + 3
    x = torch.where(valid[:, None, :], x, 1e4)
    got = compactor.standardise(x, valid)
    want = ref_standardise(x, valid)
    assert_scores_close(got, want, valid, atol=1e-4)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()
    # constant scores (std 0) do not blow up
    assert torch.isfinite(compactor.standardise(torch.ones(1, 1, 5), torch.ones(1, 5, dtype=torch.bool))).all()


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_non_causal_attention_press(case):
    ctx, ref = build_ctx(case)
    got = kvpress_like.NonCausalAttentionPress(chunk_size=16, kernel_size=3).score(ctx)
    want = ref_avg_pool(ref_non_causal(ref.q, ref.k, ref.valid, ref.scale, 16), 3, ref.valid)
    assert_scores_close(got, want, ref.valid, rtol=1e-3)


def ref_standardise_layer(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row: ``(x - mean) / (std + 1e-6)`` over every head's real tokens together (population std)."""
    out = torch.zeros_like(x, dtype=F64)
    for b in range(x.shape[0]):
        real = valid[b].nonzero().flatten()
        vals = x[b][:, real].to(F64)
        out[b][:, real] = (vals - vals.mean()) / (((vals - vals.mean()) ** 2).mean().sqrt() + 1e-6)
    return out


def ref_compactor(ctx, ref, blending, sketch, chunk, kernel, seed, leverage_kernel=1, value_norm=False, scale=None,
                  over="head"):
    attention = ref_non_causal(ref.q, ref.k, ref.valid, ref.scale if scale is None else scale, chunk)
    if value_norm:
        attention = attention * ref.v.norm(dim=-1)
    attention = ref_avg_pool(attention, kernel, ref.valid)
    lev = ref_leverage(ref.k_pre, ref.valid, gaussian(ref.k_pre.shape[-1], sketch, seed) if sketch < 16 else None)
    lev = ref_avg_pool(lev, leverage_kernel, ref.valid)
    z = ref_standardise if over == "head" else ref_standardise_layer
    return z(attention, ref.valid) + blending * z(lev, ref.valid)


@pytest.mark.parametrize("case", SHAPE_CASES)
@pytest.mark.parametrize("blending,sketch,chunk,kernel", [(0.3, 48, 256, 5), (0.7, 8, 12, 3)])
def test_compactor_blend(case, blending, sketch, chunk, kernel):
    ctx, ref = build_ctx(case)
    p = kvpress_like.CompactorPress(blending=blending, sketch_size=sketch, chunk_size=chunk, kernel_size=kernel,
                                    seed=2)
    got = p.score(ctx)
    want = ref_compactor(ctx, ref, blending, sketch, chunk, kernel, 2, leverage_kernel=p.leverage_kernel_size)
    assert_scores_close(got, want, ref.valid, atol=2e-2)  # z-scores: absolute tolerance
    assert_same_kept(got, want, ref.valid, margin=2e-2)


@pytest.mark.parametrize("case", SHAPE_CASES)
@pytest.mark.parametrize("options", [
    dict(leverage_kernel_size=5),
    dict(value_norm=True, attention_scale=1.0, standardise_over="layer", kernel_size=3),
    dict(blending=None, leverage_kernel_size=3),  # blending None: the ratio weighs leverage
])
def test_compactor_options(case, options):
    ctx, ref = build_ctx(case)
    p = kvpress_like.CompactorPress(ratio=0.75, chunk_size=12, sketch_size=8, seed=1, **options)
    got = p.score(ctx)
    blending = options.get("blending", p.blending)
    want = ref_compactor(ctx, ref, 0.75 if blending is None else blending, 8, 12, p.kernel_size, 1,
                         leverage_kernel=p.leverage_kernel_size, value_norm=p.value_norm, scale=p.attention_scale,
                         over=p.standardise_over)
    assert_scores_close(got, want, ref.valid, atol=2e-2)
    assert_same_kept(got, want, ref.valid, margin=2e-2)
    assert p.score_depends_on_ratio == (blending is None)


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_pooled_leverage_press(case):
    ctx, ref = build_ctx(case)
    got = kvpress_like.LeverageScorePress(sketch_size=8, seed=3, leverage_kernel_size=5).score(ctx)
    want = ref_avg_pool(ref_leverage(ref.k_pre, ref.valid, gaussian(ref.k_pre.shape[-1], 8, 3)), 5, ref.valid)
    assert_scores_close(got, want, ref.valid, rtol=3e-3)  # as for unpooled leverage (the Gram regularisation)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compactor_low_precision_keeps_the_reference_set(dtype):
    ctx, ref = build_ctx("llama", dtype=dtype)
    p = kvpress_like.CompactorPress(chunk_size=16)
    got = p.score(ctx)
    assert got.dtype == torch.float32
    want = ref_compactor(ctx, ref, p.blending, 48, 16, p.kernel_size, 0, leverage_kernel=p.leverage_kernel_size)
    assert_same_kept(got, want, ref.valid, margin=0.25 if dtype == torch.bfloat16 else 0.05)


# ---------------------------------------------------------------------------------------------------------------------
# CUR
# ---------------------------------------------------------------------------------------------------------------------


def test_cur_scores_match_loops():
    keys, valid = random_keys(d=16)
    values, _ = random_keys(d=16, seed=1)
    got = cur.cur_scores(keys, values, valid, sketch_size=5, seed=4)
    want = ref_cur(keys, values, valid, 5, 4)
    assert_scores_close(got, want, valid, rtol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 2))
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cur_low_precision(dtype):
    keys, valid = random_keys(d=16, pads=(0, 7), b=2)
    values, _ = random_keys(d=16, pads=(0, 7), b=2, seed=1)
    keys, values = (torch.where(valid[:, None, :, None], t, 0.0) for t in (keys, values))
    got = cur.cur_scores(keys.to(dtype), values.to(dtype), valid, 20, 0)
    assert got.dtype == torch.float32
    want = ref_cur(keys, values, valid, 20, 0)
    assert_scores_close(got, want, valid, rtol=RTOL[dtype])
    assert_same_kept(got, want, valid, margin=RTOL[dtype] * float(want.max()))


@pytest.mark.parametrize("case", ["llama", "phi3"])
def test_cur_press_uses_cached_keys_and_layer_seed(case):
    ctx, ref = build_ctx(case)
    got = kvpress_like.CURPress(sketch_size=6, seed=10).score(ctx)
    assert_scores_close(got, ref_cur(ref.k, ref.v, ref.valid, 6, 10 + ctx.layer_idx), ref.valid, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Observed attention (H2O)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [5, 16, 256])
def test_observed_attention_matches_dense_causal_softmax(block):
    generator = torch.Generator().manual_seed(block)
    q = torch.randn(3, 6, 40, 8, generator=generator)
    k = torch.randn(3, 2, 40, 8, generator=generator)
    valid = make_valid(40, PADS)
    k = torch.where(valid[:, None, :, None], k, 30.0)
    got = observed_attention.observed_attention_scores(q, k, valid, 0.4, block_size=block)
    assert_scores_close(got, ref_observed(q, k, valid, 0.4), valid)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()
    # the last real key is attended only by the last query, with its own normalisation 1 query
    assert (got[:, :, -1] > 0).all() and (got <= 1 + 1e-6).all()


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_observed_attention_press(case):
    ctx, ref = build_ctx(case)
    got = kvpress_like.ObservedAttentionPress(block_size=7).score(ctx)
    assert_scores_close(got, ref_observed(ref.q, ref.k, ref.valid, ref.scale), ref.valid, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_observed_attention_low_precision(dtype):
    ctx, ref = build_ctx("qwen3", dtype=dtype)
    got = kvpress_like.ObservedAttentionPress().score(ctx)
    assert got.dtype == torch.float32
    want = ref_observed(ref.q, ref.k, ref.valid, ref.scale)
    assert_same_kept(got, want, ref.valid, margin=RTOL[dtype] * float(want.max()))


# ---------------------------------------------------------------------------------------------------------------------
# SnapKV and TOVA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SHAPE_CASES)
@pytest.mark.parametrize("window", [1, 8, 64])
def test_window_attention_matches_dense(case, window):
    ctx, ref = build_ctx(case)
    got = snapkv.window_attention(ctx, window)
    want = ref_window_attention(ref.q, ref.k, ref.valid, ref.scale, window)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.to(F64), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("case", SHAPE_CASES)
@pytest.mark.parametrize("window,kernel", [(8, 5), (16, 1), (64, 7)])
def test_snapkv_score(case, window, kernel):
    ctx, ref = build_ctx(case)
    got = kvpress_like.SnapKVPress(window=window, kernel_size=kernel).score(ctx)
    assert_scores_close(got, ref_snapkv(ref.q, ref.k, ref.valid, ref.scale, window, kernel), ref.valid, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_snapkv_low_precision(dtype):
    ctx, ref = build_ctx("llama", dtype=dtype)
    got = kvpress_like.SnapKVPress(window=8).score(ctx)
    assert got.dtype == torch.float32
    want = ref_snapkv(ref.q, ref.k, ref.valid, ref.scale, 8, 5)
    assert_same_kept(got, want, ref.valid, margin=RTOL[dtype] * float(want.max()))


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_tova_score(case):
    ctx, ref = build_ctx(case)
    got = kvpress_like.TOVAPress().score(ctx)
    b_, h_q, s, _ = ref.q.shape
    want = torch.zeros(b_, 2, s, dtype=F64)
    for b in range(b_):
        last = sum(ref_causal_attention(ref.q, ref.k, ref.valid, ref.scale, b, h)[-1] for h in range(h_q)) / h_q
        want[b] = last  # every KV head gets the same average over all query heads
    assert_scores_close(got, want, ref.valid, rtol=1e-3)
    torch.testing.assert_close(got.sum(-1), torch.ones(b_, 2))
    sets = kept_sets(got, ref.valid)
    assert all(row[0] == row[1] for row in sets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tova_low_precision(dtype):
    ctx, ref = build_ctx("gemma3", dtype=dtype)
    got = kvpress_like.TOVAPress().score(ctx)
    assert got.dtype == torch.float32
    want = torch.zeros_like(got, dtype=F64)
    for b in range(want.shape[0]):
        want[b] = sum(ref_causal_attention(ref.q, ref.k, ref.valid, ref.scale, b, h)[-1] for h in range(6)) / 6
    assert_same_kept(got, want, ref.valid, margin=RTOL[dtype] * float(want.max()))


# ---------------------------------------------------------------------------------------------------------------------
# Expected attention
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SHAPE_CASES)
@pytest.mark.parametrize("start,n", [(0, 1), (40, 1), (40, 16), (100, 512)])
def test_averaged_rotation_matches_explicit_rope_matrices(case, start, n):
    ctx, _ = build_ctx(case)
    d = ctx.keys.shape[-1]
    got = expected_attention.averaged_rotation(ctx, start, n, d)
    want = ref_averaged_rotation(ctx, start, n, d)
    torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-5)
    if n == 1:  # a single rotation is RoPE itself, orthogonal, and applied to a key gives what RoPE gives
        torch.testing.assert_close(got.T @ got, torch.eye(d), rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 1, 1, d)
        cos, sin = ctx.rotary(torch.arange(start, start + 1))
        torch.testing.assert_close(x[0, 0, 0] @ got.T, ref_rope(x, cos, sin)[0, 0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_sink", [0, 4])
def test_expected_attention_scores_match_loops(n_sink):
    generator = torch.Generator().manual_seed(n_sink)
    b, s, d = 3, 30, 8
    q_pre = torch.randn(b, 6, s, d, generator=generator) * 0.7 + 0.3
    k = torch.randn(b, 2, s, d, generator=generator)
    v = torch.randn(b, 2, s, d, generator=generator)
    valid = make_valid(s, (0, 2, 9))
    q_pre = torch.where(valid[:, None, :, None], q_pre, 40.0)  # padding queries must not enter the statistics
    rotation = torch.linalg.qr(torch.randn(d, d, generator=generator))[0] * 0.8
    got = expected_attention.expected_attention_scores(k, v, q_pre, valid, rotation, 0.35, n_sink)
    want = ref_expected_attention(k, v, q_pre, valid, rotation, 0.35, n_sink)
    assert_scores_close(got, want, valid, rtol=1e-4)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_expected_attention_press(case):
    ctx, ref = build_ctx(case)
    p = kvpress_like.ExpectedAttentionPress(n_future=64)
    got = p.score(ctx)
    rotation = ref_averaged_rotation(ctx, SEQ, 64, ref.k.shape[-1])
    want = ref_expected_attention(ref.k, ref.v, ref.q_pre, ref.valid, rotation, ref.scale, p.n_sink)
    assert_scores_close(got, want, ref.valid, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expected_attention_low_precision(dtype):
    ctx, ref = build_ctx("llama", dtype=dtype)
    got = kvpress_like.ExpectedAttentionPress(n_future=32).score(ctx)
    assert got.dtype == torch.float32
    rotation = ref_averaged_rotation(ctx, SEQ, 32, ref.k.shape[-1])
    want = ref_expected_attention(ref.k, ref.v, ref.q_pre, ref.valid, rotation, ref.scale, 4)
    assert_same_kept(got, want, ref.valid, margin=2 * RTOL[dtype] * float(want.max()))


# ---------------------------------------------------------------------------------------------------------------------
# Key norm, StreamingLLM, random
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knorm(dtype):
    ctx, ref = build_ctx("qwen3", dtype=dtype)
    got = kvpress_like.KnormPress().score(ctx)
    want = torch.stack([torch.stack([torch.stack([-ref.k[b, h, j].norm() for j in range(SEQ)]) for h in range(2)])
                        for b in range(len(PADS))])
    assert_scores_close(got, want, ref.valid, rtol=RTOL[dtype])


def test_streaming_llm_keeps_sinks_and_recent_tokens():
    ctx, ref = build_ctx("llama")
    p = kvpress_like.StreamingLLMPress(ratio=0.5)
    indices, slot_valid = p.select(ctx)
    for b, pad in enumerate(PADS):
        n = SEQ - pad
        keep = keep_count(n, 0.5)
        want = set(range(pad, pad + 4)) | set(range(SEQ - (keep - 4), SEQ))
        for h in range(2):
            assert set(indices[b, h][slot_valid[b, h]].tolist()) == want


def test_random_press_is_seeded_per_layer():
    ctx, _ = build_ctx("llama")
    a = kvpress_like.RandomPress(seed=3).score(ctx)
    torch.testing.assert_close(a, kvpress_like.RandomPress(seed=3).score(ctx), rtol=0, atol=0)
    assert not torch.equal(a, kvpress_like.RandomPress(seed=4).score(ctx))
    ctx0, _ = build_ctx("llama", layer_idx=0)
    assert not torch.equal(a, kvpress_like.RandomPress(seed=3).score(ctx0))


# ---------------------------------------------------------------------------------------------------------------------
# ChunkKV
# ---------------------------------------------------------------------------------------------------------------------


def chunk_sums(token: torch.Tensor, chunk: int, start: int = 0) -> list[float]:
    """Sums of consecutive chunks laid from ``start`` (a row's first real token)."""
    return [float(token[i:i + chunk].sum()) for i in range(start, len(token), chunk)]


@pytest.mark.parametrize("case", ["llama", "gemma3"])
@pytest.mark.parametrize("chunk", [4, 5, 10])
def test_chunkkv_keeps_whole_top_chunks(case, chunk):
    """Kept tokens (no window) are the best chunks, whole, plus at most one partial chunk; same for every head."""
    ctx, ref = build_ctx(case)
    inner_window = 8
    p = kvpress_like.ChunkKVPress(ratio=0.5, window=0, scorer=kvpress_like.SnapKVPress(window=inner_window),
                                  chunk_size=chunk)
    indices, slot_valid = p.select(ctx)
    token = ref_snapkv(ref.q, ref.k, ref.valid, ref.scale, inner_window, 5).mean(1)  # [B, S], mean over KV heads
    for b in range(token.shape[0]):
        real = ref.valid[b]
        kept = [set(indices[b, h][slot_valid[b, h]].tolist()) for h in range(2)]
        assert kept[0] == kept[1], "ChunkKV heads must keep the same tokens"
        kept = kept[0]
        assert len(kept) == keep_count(int(real.sum()), 0.5)
        assert all(real[i] for i in kept)
        start = first_real(real)
        sums = chunk_sums(torch.where(real, token[b], 0.0), chunk, start)
        members = [[i for i in range(start + c * chunk, min(start + (c + 1) * chunk, SEQ)) if real[i]]
                   for c in range(len(sums))]
        touched = [c for c, m in enumerate(members) if m and set(m) & kept]
        partial = [c for c in touched if not set(members[c]) <= kept]
        assert len(partial) <= 1, f"row {b}: partial chunks {partial}"
        untouched = [c for c, m in enumerate(members) if m and c not in touched]
        scale = max(abs(x) for x in sums)
        # chunks are taken best first: every touched chunk scores at least as much as every untouched one, and the
        # partial one is the worst of the touched
        assert not untouched or min(sums[c] for c in touched) >= max(sums[c] for c in untouched) - 1e-4 * scale
        if partial:
            assert sums[partial[0]] <= min(sums[c] for c in touched) + 1e-4 * scale
            # inside the partial chunk, its best tokens are kept
            inside = members[partial[0]]
            kept_inside = [i for i in inside if i in kept]
            dropped_inside = [i for i in inside if i not in kept]
            worst_kept = min(float(token[b, i]) for i in kept_inside)
            assert worst_kept >= max(float(token[b, i]) for i in dropped_inside) - 1e-6


def test_chunkkv_score_ranks_chunks_like_reference_sums():
    ctx, ref = build_ctx("qwen3")
    chunk = 6
    scores = kvpress_like.ChunkKVPress(scorer=kvpress_like.SnapKVPress(window=8), chunk_size=chunk).score(ctx)
    assert scores.shape == ctx.keys.shape[:3]
    torch.testing.assert_close(scores[:, 0], scores[:, 1], rtol=0, atol=0)
    token = ref_snapkv(ref.q, ref.k, ref.valid, ref.scale, 8, 5).mean(1)
    for b in range(token.shape[0]):
        start = first_real(ref.valid[b])
        sums = chunk_sums(torch.where(ref.valid[b], token[b], 0.0), chunk, start)
        order = sorted(range(len(sums)), key=lambda c: sums[c])
        got_chunk_level = [float(scores[b, 0, start + c * chunk:start + (c + 1) * chunk].floor().max())
                           for c in range(len(sums))]
        got_order = sorted(range(len(sums)), key=lambda c: got_chunk_level[c])
        assert got_order == order


def test_chunkkv_with_window_keeps_the_window_and_one_set_per_layer():
    ctx, _ = build_ctx("phi3")
    p = kvpress_like.ChunkKVPress(ratio=0.6, window=6, scorer=kvpress_like.SnapKVPress(window=6), chunk_size=5)
    indices, slot_valid = p.select(ctx)
    for b in range(len(PADS)):
        sets = [set(indices[b, h][slot_valid[b, h]].tolist()) for h in range(2)]
        assert sets[0] == sets[1]
        assert set(range(SEQ - 6, SEQ)) <= sets[0]
        assert len(sets[0]) == keep_count(SEQ - PADS[b], 0.6)


def test_chunkkv_reuses_indices_within_a_group_of_one_prefill():
    ctx, _ = build_ctx("llama", layer_idx=0)
    p = kvpress_like.ChunkKVPress(ratio=0.5, window=4, scorer=kvpress_like.SnapKVPress(window=8), chunk_size=4,
                                  reuse_group=2)
    calls = []
    original = p.select
    p.select = lambda c: calls.append(c.layer_idx) or original(c)
    first = p.compress(ctx)
    assert "chunkkv_reused" in ctx.state and not hasattr(p, "_reused")  # run state on the installation's dict
    # layer 1 of the same prefill (the installation's state is shared by its layers) but other keys: reuses
    ctx1, _ = build_ctx("llama", layer_idx=1, seed=9)
    ctx1.state = ctx.state
    second = p.compress(ctx1)
    assert calls == [0]
    torch.testing.assert_close(first.valid, second.valid)
    # another prefill (or another installation: a state of its own) selects again
    ctx_new, _ = build_ctx("llama", layer_idx=1, seed=9)
    p.compress(ctx_new)
    assert calls == [0, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, batching, memory
# ---------------------------------------------------------------------------------------------------------------------


def small_press(name: str, **kwargs):
    """A registered press at ratio 0.5 with windows and chunks sized for short test sequences."""
    p = kvpress_like.create_press(name, ratio=0.5, **kwargs)
    if p.window > 8:
        p = kvpress_like.create_press(name, ratio=0.5, window=8, **kwargs)
    return p


@pytest.mark.parametrize("name", PREFILL_PRESSES)
@pytest.mark.parametrize("case", ["llama", "gemma3"])
def test_same_input_same_kept_tokens(name, case):
    ctx, _ = build_ctx(case)
    a = small_press(name).select(ctx)
    b = small_press(name).select(ctx)  # a fresh press object
    c = small_press(name).select(build_ctx(case)[0])  # the same input rebuilt
    for other in (b, c):
        torch.testing.assert_close(a[0], other[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], other[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", PREFILL_PRESSES)
def test_select_keeps_the_uniform_budget_of_real_tokens(name):
    ctx, _ = build_ctx("llama")
    p = small_press(name)
    indices, slot_valid = p.select(ctx)
    for b, pad in enumerate(PADS):
        n = SEQ - pad
        want = max(keep_count(n, 0.5), min(n, p.n_sink + p.window))
        for h in range(2):
            kept = indices[b, h][slot_valid[b, h]]
            assert len(kept) == want and bool((kept >= pad).all()) and len(set(kept.tolist())) == want


#: presses whose scores of a row do not depend on how much left padding the batch adds (same positions). Not here:
#: ``random`` (draws depend on the padded shape, by design) and ``expected_attention`` (future positions start at the
#: padded length, a documented departure). Pooling runs over real tokens only, so the pooled scorers are in.
PADDING_INVARIANT = ("knorm", "streaming_llm", "cur", "leverage", "observed_attention", "tova", "snapkv", "compactor",
                     "non_causal_attention")
#: the chunked scorers with chunks shorter than the row: chunks start at each row's first real token
CHUNKED = [
    pytest.param("non_causal_attention", dict(chunk_size=8, kernel_size=1), id="non_causal_attention-chunks"),
    pytest.param("compactor", dict(chunk_size=8), id="compactor-chunks"),
    pytest.param("chunkkv", dict(scorer="knorm", chunk_size=4), id="chunkkv-chunks"),
]

def padded_and_alone(pad: int = 9):
    """Row 1 of a left-padded batch, and the same real tokens as a batch of one (same positions, same keys)."""
    padded, _ = build_ctx("llama", pads=(0, pad), seq=SEQ)
    alone = dataclasses.replace(
        padded, hidden_states=padded.hidden_states[1:, pad:],
        position_embeddings=tuple(t[1:, pad:] for t in padded.position_embeddings),
        keys=padded.keys[1:, :, pad:], values=padded.values[1:, :, pad:], valid=padded.valid[1:, pad:],
    )
    return padded, alone


def check_padding_invariance(name: str, kwargs: dict, pad: int = 9):
    padded, alone = padded_and_alone(pad)
    p = small_press(name, **kwargs)
    if name != "streaming_llm":  # its score is the token index: shifted by the padding, same order
        torch.testing.assert_close(p.score(padded)[1:, :, pad:], p.score(alone), rtol=1e-4, atol=1e-6)
    indices, slot_valid = p.select(padded)
    alone_indices, alone_slots = p.select(alone)
    for h in range(2):
        kept_alone = set(alone_indices[0, h][alone_slots[0, h]].tolist())
        assert set((indices[1, h][slot_valid[1, h]] - pad).tolist()) == kept_alone


@pytest.mark.parametrize("name", PADDING_INVARIANT)
def test_padding_does_not_change_a_rows_scores(name):
    """The scores and kept tokens of a row are the same alone and left-padded inside a batch."""
    check_padding_invariance(name, {})


@pytest.mark.parametrize("name,kwargs", CHUNKED)
def test_padding_does_not_change_a_rows_chunks(name, kwargs):
    """Same property for the chunked scorers with chunks shorter than the row."""
    check_padding_invariance(name, kwargs)


class MaxTensorRecorder(TorchDispatchMode):
    """Records the largest tensor (numel) any aten op returns (floating-point ones only with ``floats_only``)."""

    def __init__(self, floats_only: bool = False):
        super().__init__()
        self.largest = 0
        self.op = None
        self.floats_only = floats_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.numel() > self.largest
                    and (t.is_floating_point() or not self.floats_only)):
                self.largest, self.op = t.numel(), str(func)
        return out


def test_recorder_sees_a_dense_matrix():
    x = torch.randn(512, 8)
    with MaxTensorRecorder() as rec:
        torch.softmax(x @ x.T, dim=-1)
    assert rec.largest == 512 * 512


_LONG: dict = {}


def long_ctx(seq: int):
    """``[1, seq]`` context on a 2-query-head / 1-KV-head llama (so per-head buffers are comparable with S^2)."""
    if seq not in _LONG:
        model = tiny_model("llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                           max_position_embeddings=8192)
        attn = model.model.layers[1].self_attn
        hidden = torch.randn(1, seq, 64, generator=torch.Generator().manual_seed(0))
        positions = torch.arange(seq)[None]
        cos, sin = model.model.rotary_emb(hidden, positions)
        with torch.no_grad():
            _, k_pre, v = ref_projections(attn, hidden, dtype=torch.float32)
        ctx = layer_context(model, module=attn, layer_idx=1, hidden_states=hidden, position_embeddings=(cos, sin),
                            keys=ref_rope(k_pre, cos, sin), values=v, valid=torch.ones(1, seq, dtype=torch.bool),
                            rotary=lambda pos: model.model.rotary_emb(hidden[:1, :1], pos[None]))
        _LONG[seq] = ctx
    return _LONG[seq]


@pytest.mark.parametrize("name", PREFILL_PRESSES)
def test_no_scorer_builds_an_s_by_s_tensor(name):
    """At S = 2048 with chunks/blocks of 256, no op of score -> select -> store returns >= S*S/2 elements, and the
    largest tensor grows linearly (doubling S at most ~doubles it)."""
    largest = {}
    for seq in (1024, 2048):
        ctx = long_ctx(seq)
        p = kvpress_like.create_press(name, ratio=0.5)
        for attr in ("chunk_size", "block_size"):
            if hasattr(p, attr) and name != "chunkkv":
                p = p.replace(**{attr: 256})
        with torch.no_grad(), MaxTensorRecorder() as rec:
            p.compress(ctx)
        largest[seq] = (rec.largest, rec.op)
    assert largest[2048][0] < 2048 * 2048 / 2, largest
    assert largest[2048][0] <= 2.2 * largest[1024][0], largest


@pytest.mark.parametrize("name", WHOLE_MODEL_PRESSES)
def test_whole_model_presses_build_no_s_by_s_tensor(name):
    """The same bound for the presses that run their own forwards, measured over a whole prefill of a tiny model:
    floating-point tensors only, because transformers itself builds the boolean S x S causal mask of every forward
    (sdpa attention never returns S x S weights). KVzip's reconstruction chunks are 256 tokens here, as the other
    chunked scorers' (a chunk's float mask is chunk x (S + chunk))."""
    from tiny_models import cached_tiny_model

    model = cached_tiny_model("llama")
    largest = {}
    for seq in (1024, 2048):
        ids = torch.randint(1, 100, (1, seq), generator=torch.Generator().manual_seed(0))
        p = kvpress_like.create_press(name, ratio=0.5, **({"chunk_size": 256} if name == "kvzip" else {}))
        with torch.no_grad(), kvpress_like.press(model, p), MaxTensorRecorder(floats_only=True) as rec:
            model(ids, use_cache=True)
        largest[seq] = (rec.largest, rec.op)
    # below one head's S x S (KVzip's blocks of reconstruction weights are heads x chunk x S), and linear in S
    assert largest[2048][0] < 2048 * 2048, largest
    assert largest[2048][0] <= 2.2 * largest[1024][0], largest


def test_chunkkv_in_the_batched_select_flow_respects_padding():
    """Whole-chunk selection never keeps padding, and rows of different padding are handled independently."""
    ctx, _ = build_ctx("qwen3", pads=(0, 13))
    p = kvpress_like.ChunkKVPress(ratio=0.5, window=0, scorer="knorm", chunk_size=4)
    indices, slot_valid = p.select(ctx)
    kept1 = indices[1, 0][slot_valid[1, 0]]
    assert bool((kept1 >= 13).all()) and len(kept1) == keep_count(SEQ - 13, 0.5)
