"""FastKV press: Token-Selective Propagation (TSP) plus GQA-aware KV selection.

Paper: Jo, Song, Kim, Kim, "FastKV: KV Cache Compression for Fast Long-Context Processing with Token-Selective
Propagation", arXiv 2502.01068 (retitled from v3 "FastKV: Decoupling of Context Reduction and KV Cache Compression for
Prefill-Decoding Acceleration"). Public code: github.com/dongwonjo/FastKV (read, not copied).

The method, as implemented here:

* **GQA-aware scores** (every layer): the last ``window`` prompt queries attend to every key (softmax in fp32, causal
  inside the window); each query head sums its weights over the window; the sums of the ``N - window`` keys before the
  window are pooled over ``kernel_size`` neighbours (zero-padded average, or max), then summed over the query heads of
  each KV group: ``s_g(j) = sum_{h in g} pool(sum_i A_h(i, j))``. The window itself is always kept.
* **KV selection** (every layer): each KV head keeps its top ``N - floor(ratio * N)`` entries (window included), ``N``
  being the context length; the budget is the same for every layer and head (``retain_rate = 1 - ratio``).
* **Token-Selective Propagation** at layer ``tsp_layer``: ``s(j) = sum_g s_g(j)`` (one score per token, summed over
  all KV heads); the top ``T = int(tsp_rate * N)`` tokens (window included) are kept in their original order, and
  only their output hidden states, positions (RoPE tables), attention-mask rows/columns go on to the deeper layers.
  Layers before and at ``tsp_layer`` run on all ``N`` tokens; deeper layers run on ``T`` tokens, so the prefill gets
  cheaper, and store only those tokens' KV, compressed again to the same budget ``N - floor(ratio * N)`` (at most
  ``T``) with their own scores. The last prompt token is in the window, so the next-token logits come from the full
  model's computation over the propagated tokens.

After the prefill, every layer's logical length is ``N``: later tokens keep the positions they would have had without
compression, and decoding is unchanged.

Departures from the paper and its code:

* the budget is ``ratio`` (fraction removed, as for every press here), not the paper's ``retain_rate`` /
  ``max_capacity_prompt``; ``tsp_rate`` defaults to ``max(0.2, 1 - ratio)`` (the paper requires
  ``retain_rate <= tsp_rate``; its Llama-3.1-8B scripts use ``tsp_rate = 0.2``, ``retain_rate = 0.1``);
* ``tsp_layer`` defaults to ``num_layers * 15 // 32`` (the paper's layer 15 of 32 for Llama-3.1-8B, scaled); the paper
  tunes it per model;
* pooling defaults to average (the class default of the public code; its evaluation scripts use max pooling,
  ``pooling="max"`` here);
* the model's output covers every prompt position: rows of tokens that were not propagated are NaN (the public code
  returns only the last position); per-token outputs of the prompt (logits, ``output_hidden_states``) are therefore
  not those of the full model, and a loss over the prompt is NaN;
* optional ``n_sink`` first tokens are protected (0 by default, as in the paper).

Limits (clear errors): only models whose every layer is full attention (Llama, Mistral, Qwen2, Qwen3, Phi3 without a
sliding window; not Gemma3); the prefill must be unpadded (rows of equal length); the uniform allocator only; no
chunked prefill, calibrated ratio or decoding-time wrapper (TSP needs the whole prefill in one forward).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..allocators.uniform import UniformAllocator
from ..checks import check_int, check_odd_kernel
from ..patches.base import layer_types
from ..press import LayerContext, Press, select_top, store_dense
from .snapkv import window_attention

_RUNS: weakref.WeakKeyDictionary[nn.Module, _Propagation] = weakref.WeakKeyDictionary()  # attention -> installation


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Pool ``[..., n]`` scores over ``kernel_size`` neighbours along the last dim: average with zero padding counted in
    the divisor (``"avg"``) or maximum (``"max"``); returns the same shape."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    args = dict(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    pooled = F.avg_pool1d(flat, **args) if pooling == "avg" else F.max_pool1d(flat, **args)
    return pooled.view(scores.shape)


def gqa_scores(ctx: LayerContext, window: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """FastKV's GQA-aware scores of one layer.

    Returns:
        ``[B, H_kv, S]`` fp32: for the ``S - W`` keys before the window (``W = min(window, S)``), the window attention
        each query head gives them, summed over the window, pooled (:func:`pool_scores`) and summed over the query
        heads of the KV group; 0 on the window (which the press protects).
    """
    weights = window_attention(ctx, window)  # [B, H_kv, G, W, S]
    s, w = weights.shape[-1], weights.shape[3]
    summed = weights.sum(dim=3)[..., : s - w]  # [B, H_kv, G, S - W]
    return F.pad(pool_scores(summed, kernel_size, pooling).sum(dim=2), (0, w))


class _Propagation:
    """One installation's token propagation (per ``press(model, p)`` block): the tokens the TSP layer selected in the
    running prefill and the gathered forward arguments of the deeper layers. Acts only in the thread that entered the
    block."""

    def __init__(self, tsp_layer: int, owner: int):
        self.tsp_layer, self.owner = tsp_layer, owner
        self.clear()

    def clear(self) -> None:
        self.selected: torch.Tensor | None = None  # [B, T] long, ascending token indices
        self.length: int | None = None  # N, the prefill's length
        self.kwargs: dict = {}

    def mine(self) -> bool:
        return threading.get_ident() == self.owner

    def start(self, module, args, kwargs):
        """Pre-hook of the first decoder layer: every forward starts without a selection."""
        if self.mine():
            self.clear()

    def propagate(self, module, args, kwargs, output):
        """Forward hook of the TSP decoder layer: keep only the selected tokens' output ``[B, T, hidden]`` and gather
        the arguments the deeper layers receive (RoPE tables, position ids, attention mask) at the same tokens."""
        if not self.mine() or self.selected is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"FastKV: decoder layer {self.tsp_layer} returned {type(output).__name__}, expected the "
                            "hidden-states tensor (transformers >= 5 decoder layers)")
        idx = self.selected.to(output.device)
        b, t = idx.shape
        s = output.shape[1]

        def rows(x: torch.Tensor) -> torch.Tensor:  # [1 or B, S, ...] -> [B, T, ...]
            x = x.expand(b, *x.shape[1:])
            return x.gather(1, idx.view(b, t, *[1] * (x.ndim - 2)).expand(b, t, *x.shape[2:]))

        if not isinstance(kwargs.get("position_embeddings"), tuple):
            raise ValueError(f"FastKV: decoder layer {self.tsp_layer} was not given its RoPE tables as the keyword "
                             "position_embeddings=(cos, sin); token propagation supports decoder loops that pass "
                             "position_embeddings, position_ids and attention_mask by keyword (Llama-style)")
        cos, sin = kwargs["position_embeddings"]
        gathered = {"position_embeddings": (rows(cos), rows(sin))}
        if kwargs.get("position_ids") is not None:
            gathered["position_ids"] = rows(kwargs["position_ids"])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if mask.ndim != 4 or mask.shape[-2:] != (s, s):
                raise ValueError(f"FastKV: unexpected attention mask of shape {tuple(mask.shape)} at the TSP layer "
                                 f"(expected [B, 1, {s}, {s}] for a prefill of {s} tokens on an empty cache)")
            mask = mask.expand(b, *mask.shape[1:])
            heads = mask.shape[1]
            mask = mask.gather(2, idx[:, None, :, None].expand(b, heads, t, s))
            mask = mask.gather(3, idx[:, None, None, :].expand(b, heads, t, t))
        elif mask is not None:
            raise TypeError(f"FastKV: unsupported attention mask type {type(mask).__name__} at the TSP layer")
        gathered["attention_mask"] = mask
        self.kwargs = gathered
        return rows(output)

    def narrow(self, module, args, kwargs):
        """Pre-hook of each decoder layer after the TSP layer: the gathered arguments replace the full ones."""
        if not self.mine() or self.selected is None:
            return None
        return args, {**kwargs, **self.kwargs}

    def restore(self, module, args, kwargs, output):
        """Forward hook of the last decoder layer: the output back at every prompt position ``[B, N, hidden]``, NaN on
        the tokens that were not propagated."""
        if not self.mine() or self.selected is None:
            return None
        idx = self.selected.to(output.device)
        full = output.new_full((output.shape[0], self.length, output.shape[-1]), float("nan"))
        full.scatter_(1, idx[..., None].expand(*idx.shape, output.shape[-1]), output)
        self.clear()
        return full


class _Forget:
    """Handle that unregisters an installation's attention modules on exit."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            _RUNS.pop(module, None)


@dataclass
class FastKVPress(Press):
    """FastKV: GQA-aware KV selection in every layer, and only the ``tsp_rate`` most attended tokens propagated past
    layer ``tsp_layer`` in the prefill.

    Args:
        ratio: fraction of the context's KV pairs removed in every layer (0 disables the press entirely).
        window: observation window (last prompt tokens), always kept and always propagated.
        kernel_size: pooling width over neighbouring tokens (odd).
        pooling: ``"avg"`` or ``"max"``.
        tsp_layer: index of the TSP layer (``None``: ``num_layers * 15 // 32``); must be before the last layer.
        tsp_rate: fraction of the prompt propagated past the TSP layer (``None``: ``max(0.2, 1 - ratio)``); at least
            ``1 - ratio``.
    """

    name = "fastkv"
    is_plain_scorer = False  # compress() and install(): token propagation
    installs_hooks = True
    window: int = 8
    kernel_size: int = 7
    pooling: str = "avg"
    tsp_layer: int | None = None
    tsp_rate: float | None = None

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        if not isinstance(self._allocator, UniformAllocator):
            raise ValueError(f"FastKV keeps the same budget in every layer and head: only the 'uniform' allocator is "
                             f"supported; got {self._allocator.name!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 for FastKV (the observation window); got {self.window!r}")
        check_odd_kernel("kernel_size", self.kernel_size)
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max'; got {self.pooling!r}")
        if self.tsp_layer is not None:
            check_int("tsp_layer", self.tsp_layer)
        if self.tsp_rate is not None:
            if isinstance(self.tsp_rate, bool) or not isinstance(self.tsp_rate, (int, float)) or not (
                    0 < self.tsp_rate <= 1):
                raise ValueError(f"tsp_rate must be None or a number in (0, 1]; got {self.tsp_rate!r}")
            self.propagation_rate  # noqa: B018  (checks tsp_rate >= 1 - ratio)

    @property
    def propagation_rate(self) -> float:
        """The fraction of the prompt propagated past the TSP layer (``tsp_rate``, or its default)."""
        keep = 1.0 - self.ratio
        if self.tsp_rate is None:
            return max(0.2, keep)
        if self.tsp_rate < keep:
            raise ValueError(f"tsp_rate ({self.tsp_rate:g}) must be at least 1 - ratio ({keep:g}): deeper layers can "
                             "only keep KV of propagated tokens")
        return float(self.tsp_rate)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """GQA-aware scores ``[B, H_kv, S]`` (:func:`gqa_scores`)."""
        return gqa_scores(ctx, self.window, self.kernel_size, self.pooling)

    def compress(self, ctx: LayerContext):
        """Select this layer's KV (and, at the TSP layer, the tokens to propagate); returns the compressed layer, whose
        logical length is the prompt's ``N`` also in layers that saw only the propagated tokens."""
        run = _RUNS.get(ctx.module)
        if run is None or not run.mine():
            raise RuntimeError("FastKVPress compresses only when installed with press(model, p) (its token "
                               "propagation needs its own hooks); it cannot be wrapped (chunked prefill, calibrated "
                               "ratio, decoding press)")
        if not bool(ctx.valid.all()):
            raise ValueError("FastKV needs an unpadded prefill (rows of equal length, no padding): token propagation "
                             "keeps the same number of tokens in every row; prefill padded rows one at a time")
        scores, _ = self.layer_scores(ctx)  # [B, H_kv, S], +inf on the window (and sinks)
        b, h, s = scores.shape
        n = run.length if run.selected is not None else s  # the prompt's length (deeper layers see only s = T)
        keep = min(s, max(n - math.floor(self.ratio * n), self.n_sink + self.window, 1))
        if ctx.layer_idx == run.tsp_layer and run.selected is None:
            t = max(int(n * self.propagation_rate), self.n_sink + self.window, 1)
            if t < s:
                run.selected = scores.sum(dim=1).topk(t, dim=-1).indices.sort(dim=-1).values  # [B, T]
                run.length = s
        counts = torch.full((b, h), keep, dtype=torch.long, device=scores.device)
        indices, slot_valid = select_top(scores, counts)
        return store_dense(ctx.keys, ctx.values, indices, slot_valid, logical_length=n)

    def install(self, model: nn.Module, scope) -> list:
        """Hook the decoder layers (pre-hook on the first, forward hook on the TSP layer, pre-hooks after it, forward
        hook on the last); returns the handles.

        Raises:
            ValueError: a model with sliding-window layers, or ``tsp_layer`` not before the last layer.
        """
        from ..registry import architecture_for

        arch = architecture_for(model.config)
        config = model.config
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if any(kind != "full_attention" for kind in layer_types(config)):
            raise ValueError(f"FastKV supports only models whose every layer is full attention; "
                             f"{type(model).__name__} has sliding-window layers (token propagation would need each "
                             "sliding layer's window over the propagated tokens)")
        layers = arch.decoder_layers(model)
        n_layers = len(layers)
        tsp = n_layers * 15 // 32 if self.tsp_layer is None else self.tsp_layer
        if not 0 <= tsp < n_layers - 1:
            raise ValueError(f"tsp_layer must be in [0, {n_layers - 2}] for this {n_layers}-layer model (deeper layers "
                             f"must remain after it); got {tsp}")
        self.propagation_rate  # noqa: B018  (checks tsp_rate against the ratio as set now)
        run = _Propagation(tsp, threading.get_ident())
        attentions = [arch.attention(layer) for layer in layers]
        for attention in attentions:
            _RUNS[attention] = run
        handles = [_Forget(attentions),
                   layers[0].register_forward_pre_hook(run.start, with_kwargs=True),
                   layers[tsp].register_forward_hook(run.propagate, with_kwargs=True),
                   layers[-1].register_forward_hook(run.restore, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(run.narrow, with_kwargs=True) for layer in layers[tsp + 1:]]
        return handles
