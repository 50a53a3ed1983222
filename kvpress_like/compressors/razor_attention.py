"""RazorAttention press: retrieval heads keep their whole cache, the other heads keep sinks, a recent window and one
compensation token.

Paper: Tang, Lin, Lin, Han, Ke, Hong, Yao, Wang, "RazorAttention: Efficient KV Cache Compression Through Retrieval
Heads", arXiv 2407.15891 (ICLR 2025). A few heads ("retrieval heads") attend across the whole context; the others
attend mostly to the first tokens and a local window. For RoPE models the retrieval heads are the **echo heads**
(a token attends to the earlier copy of itself) and the **induction heads** (it attends to the token that followed
that copy), found once per model from the attention of a random token sequence repeated several times. Retrieval
heads keep their full KV cache; every other head keeps its first ``N0`` tokens (``n_sink``), its most recent
tokens, and one compensation token whose key and value are the means of the keys and values it dropped (the
paper's Algorithm 1 and eq. 4, on the cached keys, i.e. after RoPE).

Heads are profiled here from the model itself, once per model and settings, in memory (:func:`profile_heads`): one
forward over a BOS token (when the model has one) and ``profile_period`` random token ids (special tokens excluded)
repeated ``profile_repeats`` times (defaults 256 x 4: 1,025 tokens); a head's echo (induction) score is the
attention mass the queries of the second and later copies put on the earlier copies of their own token (of the
token after it), averaged over those queries. Queries are processed in chunks of 128, so no ``T x T`` matrix is
built. The top ``induction_fraction`` (14 %) of the KV heads of the compressible layers by induction score and the
top ``echo_fraction`` (1 %) by echo score are retrieval heads (their union; 14 of SmolLM2-135M's 90 KV heads).

Departures:

* The fractions 14 % + 1 % are those of Huawei's public port (MindSpore Golden-Stick); the paper's own head counts
  could not be checked. Profiling length (256 x 4) is ours (the port uses 2,500 x 4).
* Budgets follow ``ratio`` (this library's convention, the fraction of KV pairs removed) instead of the paper's
  compression ratio ``C`` and threshold ``S0`` (buffer ``max(S0, N / C)``): every non-retrieval head of the model
  keeps the same recent window, the largest for which the whole model keeps at most ``n - floor(ratio * n)`` entries
  per head on average (retrieval heads count ``n`` each, the compensation token one). ``window`` plays the part of
  ``S0``: a lower bound on that recent window, which then removes less than ``ratio``. A ratio the retrieval heads
  alone already exceed is refused with an error naming the largest reachable one.
* GQA: storage is per KV head, so a KV head is a retrieval head when one of its query heads is (scores are the
  maximum over the group's query heads, as in the public port).
* The compensation token is an ordinary cache entry attended once. The paper's eq. 5 (not checked: its text was not
  available) may weight it by the number of dropped tokens; the attention functions of this library have no
  per-entry logit bias, so it is not weighted. As the port, this gives it a weight comparable to one token.
  ``compensation=False`` leaves it out.
* Only the prefill is compressed: tokens decoded afterwards are appended to every head. ALiBi models (the paper's
  other case) are not among the supported architectures.

Storage: a ragged per-head layer (:class:`~kvpress_like.cache.RaggedLayer`): bytes held are the kept entries, for
every layer (also those without retrieval heads). The allocator is not used (the method decides every head's budget
itself); only ``allocator="uniform"`` is accepted.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..allocators.base import keep_count
from ..cache import RaggedLayer
from ..checks import check_int
from ..press import LayerContext, Press

QUERY_CHUNK = 128

# model -> {(period, repeats, seed): HeadProfile}; attention module -> (model, row of the module's layer in the profile)
_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class HeadProfile:
    """Echo and induction scores of every KV head of the compressible layers of one model.

    Attributes:
        layers: indices of the profiled (compressible) layers, ascending.
        echo: ``[L, H_kv]`` fp32, mean attention mass on earlier copies of the query's own token (max over the query
            heads of each KV group).
        induction: ``[L, H_kv]`` fp32, the same on the tokens that followed those copies.
        tokens: length of the profiling input.
    """

    layers: tuple[int, ...]
    echo: torch.Tensor
    induction: torch.Tensor
    tokens: int


def profiling_ids(config, period: int, repeats: int, seed: int) -> tuple[torch.Tensor, int]:
    """``([1, offset + period * repeats] ids, offset)``: a BOS token when the config has one (``offset = 1``), then
    ``period`` seeded random ids (special tokens excluded) repeated ``repeats`` times."""
    special = {getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {int(t) for s in special if s is not None for t in (s if isinstance(s, (list, tuple)) else [s])}
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    block = allowed[torch.randint(len(allowed), (period,), generator=generator)]
    ids = block.repeat(repeats)
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int):
        return torch.cat([torch.tensor([bos]), ids])[None], 1
    return ids[None], 0


def copy_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, offset: int, period: int):
    """Echo and induction attention masses of one layer.

    Args:
        queries: ``[H_q, T, D]`` post-RoPE queries of the profiling input.
        keys: ``[H_kv, T, D]`` post-RoPE keys.
        scaling: the layer's logit scale.
        offset: tokens before the first copy (the BOS token).
        period: length of one copy.

    Returns:
        ``(echo, induction)``, each ``[H_kv]`` fp32: for every query ``t >= offset + period`` the causal softmax weight
        on the earlier copies ``t - m * period >= offset`` (``m >= 1``) of its token (echo) and on the tokens right
        after them (induction), summed, averaged over those queries, then the maximum over the query heads of each KV
        head.
    """
    h_q, t, d = queries.shape
    h_kv = keys.shape[0]
    group = h_q // h_kv
    keys = keys.float()
    echo = torch.zeros(h_q)
    induction = torch.zeros(h_q)
    key_pos = torch.arange(t)
    first = offset + period
    for start in range(first, t, QUERY_CHUNK):
        query_pos = torch.arange(start, min(start + QUERY_CHUNK, t))
        chunk = queries[:, query_pos].float().view(h_kv, group, len(query_pos), d)
        logits = torch.einsum("hgqd,hkd->hgqk", chunk, keys) * scaling
        lag = query_pos[:, None] - key_pos[None, :]  # [q, T]
        logits = logits.masked_fill(lag < 0, float("-inf"))
        weights = logits.softmax(dim=-1).view(h_q, len(query_pos), t)
        is_echo = (lag >= period) & (lag % period == 0) & (key_pos[None, :] >= offset)
        # the token after an earlier copy (itself at or after the first copy, so never after the BOS token)
        is_induction = (lag + 1 >= period) & ((lag + 1) % period == 0) & (key_pos[None, :] > offset)
        echo += (weights * is_echo).sum(dim=(1, 2))
        induction += (weights * is_induction).sum(dim=(1, 2))
    n_queries = t - first
    return (echo / n_queries).view(h_kv, group).amax(-1), (induction / n_queries).view(h_kv, group).amax(-1)


def profile_heads(model: nn.Module, period: int = 256, repeats: int = 4, seed: int = 0) -> HeadProfile:
    """Echo and induction scores of every KV head of ``model``'s compressible layers (cached per model and settings).

    One forward of ``model`` (no cache, logits of the last token only) over :func:`profiling_ids`; each compressible
    attention module's queries and keys are recomputed from its input with its own projections, norms and RoPE, and
    scored by :func:`copy_attention`.
    """
    key = (period, repeats, seed)
    cached = _PROFILES.get(model, {})
    if key in cached:
        return cached[key]
    from ..registry import architecture_for

    arch = architecture_for(model.config)
    layers = tuple(arch.compressible_layers(model.config))
    decoder = arch.decoder_layers(model)
    ids, offset = profiling_ids(model.config, period, repeats, seed)
    h_kv = arch.num_heads(arch.attention(decoder[layers[0]]), "k")
    echo, induction = torch.zeros(len(layers), h_kv), torch.zeros(len(layers), h_kv)
    handles = []

    def scorer(row: int):
        def hook(module, args, kwargs):
            inputs = arch.attention_inputs(args, kwargs)
            hidden = inputs["hidden_states"]
            cos, sin = inputs["position_embeddings"]
            q, k = arch.apply_rope(arch.pre_rope_queries(module, hidden), arch.pre_rope_keys(module, hidden), cos, sin)
            echo[row], induction[row] = copy_attention(q[0], k[0], arch.scaling(module), offset, period)

        return hook

    try:
        for row, idx in enumerate(layers):
            attn = arch.attention(decoder[idx])
            handles.append(attn.register_forward_pre_hook(scorer(row), with_kwargs=True))
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    profile = HeadProfile(layers, echo, induction, ids.shape[1])
    _PROFILES.setdefault(model, {})[key] = profile
    return profile


def retrieval_heads(profile: HeadProfile, induction_fraction: float, echo_fraction: float) -> torch.Tensor:
    """``[L, H_kv]`` bool: the top ``ceil(induction_fraction * L * H_kv)`` heads by induction score and the top
    ``ceil(echo_fraction * L * H_kv)`` by echo score (their union)."""
    total = profile.echo.numel()
    chosen = torch.zeros(total, dtype=torch.bool)
    for scores, fraction in ((profile.induction, induction_fraction), (profile.echo, echo_fraction)):
        count = min(math.ceil(fraction * total - 1e-9), total)
        chosen[scores.flatten().topk(count).indices] = True
    return chosen.view_as(profile.echo)


def recent_window(n: int, ratio: float, n_retrieval: int, n_heads: int, n_sink: int, window: int,
                  compensation: bool) -> int:
    """Recent tokens a non-retrieval head keeps out of a row's ``n`` real tokens.

    The largest ``w`` such that the ``n_heads`` KV heads of the model (``n_retrieval`` of them keeping all ``n``) keep
    at most ``n_heads * keep_count(n, ratio)`` entries, a non-retrieval head holding ``min(n_sink, n) + w`` tokens
    plus the compensation token (when ``compensation`` and it drops something); at least ``window``; at most every
    token after the sinks.

    Raises:
        ValueError: the retrieval heads, sinks and compensation tokens alone exceed the budget.
    """
    sinks = min(n_sink, n)
    others = n_heads - n_retrieval
    if others == 0 or n - sinks == 0:
        return n - sinks
    spare = n_heads * keep_count(n, ratio) - n_retrieval * n
    w = spare // others - sinks - int(compensation)
    if w < 0:
        reachable = 1 - (n_retrieval * n + others * (sinks + int(compensation))) / (n_heads * n)
        raise ValueError(
            f"RazorAttention cannot remove {ratio:g} of a {n}-token context: its {n_retrieval} retrieval heads (of "
            f"{n_heads} KV heads) keep every token and the others at least {sinks} sink(s) and the compensation token, "
            f"so it removes at most {max(reachable, 0):.3f}; lower ratio, induction_fraction or echo_fraction")
    return min(max(w, window), n - sinks)


def razor_layer(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, retrieval: torch.Tensor,
                windows: list[int], n_sink: int, compensation: bool) -> RaggedLayer:
    """Store one layer: retrieval heads keep every real token, the others sinks + recent window + compensation token.

    Args:
        keys, values: ``[B, H, S, D]`` the layer's full prefill (post-RoPE keys, as cached).
        valid: ``[B, S]`` bool, False on padding (never stored).
        retrieval: ``[H]`` bool, the layer's retrieval heads.
        windows: recent window of each row's non-retrieval heads (:func:`recent_window`).
        n_sink: first real tokens kept.
        compensation: add the mean of the dropped keys and values as one more entry.

    Returns:
        A :class:`RaggedLayer` with logical length ``S``. A non-retrieval head's entries are its sinks, the
        compensation token (``mean`` over dropped tokens, computed in fp32) when it dropped at least one token, then
        its recent tokens; a retrieval head's entries are its real tokens in order.
    """
    b, h, s, d = keys.shape
    flat_keys, flat_values, lengths = [], [], torch.zeros(b, h, dtype=torch.long)
    for row in range(b):
        real = valid[row].nonzero().squeeze(-1)
        n = real.numel()
        sinks = min(n_sink, n)
        recent = real[n - windows[row]:] if windows[row] else real[:0]
        kept = torch.cat([real[:sinks], recent])
        dropped = real[sinks:n - windows[row]]
        for head in range(h):
            if retrieval[head] or not len(dropped):
                parts_k, parts_v = [keys[row, head, real]], [values[row, head, real]]
            else:
                parts_k, parts_v = [keys[row, head, kept[:sinks]]], [values[row, head, kept[:sinks]]]
                if compensation:
                    parts_k.append(keys[row, head, dropped].float().mean(0, keepdim=True).to(keys.dtype))
                    parts_v.append(values[row, head, dropped].float().mean(0, keepdim=True).to(values.dtype))
                parts_k.append(keys[row, head, recent])
                parts_v.append(values[row, head, recent])
            flat_keys += parts_k
            flat_values += parts_v
            lengths[row, head] = sum(len(p) for p in parts_k)
    return RaggedLayer(torch.cat(flat_keys).contiguous(), torch.cat(flat_values).contiguous(),
                       lengths.to(keys.device), s, tuple(keys.shape))


@dataclass
class RazorAttentionPress(Press):
    """Retrieval (echo/induction) heads keep their whole cache; the others sinks, a recent window and a compensation
    token.

    Args:
        n_sink: first tokens every head keeps (the paper's ``N0``).
        window: least number of recent tokens a non-retrieval head keeps (the paper's ``S0``); 0 = as ``ratio`` allows.
        induction_fraction: fraction of the model's KV heads taken as induction heads (top induction scores).
        echo_fraction: fraction taken as echo heads (top echo scores); retrieval heads are the union.
        compensation: keep the mean of each non-retrieval head's dropped keys and values as one entry.
        profile_period: length of the random sequence that is repeated to find the heads.
        profile_repeats: number of copies of it.
        seed: seed of the random sequence.
    """

    name = "razor_attention"
    is_plain_scorer = False  # compress() keeps retrieval heads whole; install() profiles them
    installs_hooks = True
    n_sink: int = 4
    induction_fraction: float = 0.14
    echo_fraction: float = 0.01
    compensation: bool = True
    profile_period: int = 256
    profile_repeats: int = 4
    seed: int = 0

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        if self._allocator.name != "uniform":
            raise ValueError(f"RazorAttention decides every head's budget itself (a head policy); allocator must be "
                             f"'uniform', got {self._allocator.name!r}")
        for name in ("induction_fraction", "echo_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
        for name, least in (("profile_period", 2), ("profile_repeats", 2)):
            check_int(name, getattr(self, name), minimum=least)

    def install(self, model: nn.Module, scope) -> list:
        """Profile ``model``'s heads (once per model and settings) and note which layer each attention module is; no
        hook is added."""
        if self.ratio == 0:
            return []
        profile = profile_heads(model, self.profile_period, self.profile_repeats, self.seed)
        from ..registry import architecture_for

        arch = architecture_for(model.config)
        decoder = arch.decoder_layers(model)
        for row, idx in enumerate(profile.layers):
            _OWNERS[arch.attention(decoder[idx])] = (weakref.ref(model), row)
        return []

    def retrieval_heads(self, model: nn.Module) -> torch.Tensor:
        """``[L, H_kv]`` bool retrieval heads of ``model``'s compressible layers (profiled on first use)."""
        profile = profile_heads(model, self.profile_period, self.profile_repeats, self.seed)
        return retrieval_heads(profile, self.induction_fraction, self.echo_fraction)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError("RazorAttention is a head policy without token scores: it selects in compress()")

    def compress(self, ctx: LayerContext) -> RaggedLayer:
        owner = _OWNERS.get(ctx.module)
        model = owner[0]() if owner is not None else None
        if model is None:
            raise RuntimeError("RazorAttentionPress finds its retrieval heads when installed on a model: use it "
                               "through press(model, p) (or `with p(model):`)")
        retrieval = self.retrieval_heads(model)
        n_heads, n_retrieval = retrieval.numel(), int(retrieval.sum())
        windows = [recent_window(int(n), self.ratio, n_retrieval, n_heads, self.n_sink, self.window, self.compensation)
                   for n in ctx.valid.sum(-1).tolist()]
        return razor_layer(ctx.keys, ctx.values, ctx.valid, retrieval[owner[1]], windows, self.n_sink,
                           self.compensation)
