"""``press(model, p)``: install a press on enter, always restore the model on exit (also on error).

Two forward hooks per compressible attention module do all the work:

* the pre-hook notes whether this forward is the layer's first (the prefill of a context);
* the post-hook compresses the layer after its prefill attention, so the full layer is freed at once and the peak
  stays near one layer's full KV.

Decoding steps and any later forward on the same cache are never compressed by a prefill press.

The hooks act only in the thread that entered ``press(...)``: a forward of the same model in another thread runs as
without a press (and does not disturb the pressed thread's state).

Attending over compressed layers is not the hooks' job: while a press is active the model's attention implementation
is the one :mod:`kvpress_like.attention` registered once by name (``sdpa`` -> ``kvpress_like_sdpa``, ``eager`` ->
``kvpress_like_eager``; restored on exit), which reads masks and per-row / per-head validity from the cache layer
itself, so a compressed cache gives the same results inside the block and outside it. Under ``kvpress_like_sdpa`` the
post-RoPE queries of a prefill being compressed are kept (and forward hooks keep the outputs of the query and key
projections), so scorers need not recompute them.

What lives for one run lives here, on the installation that ``press(model, p)`` creates, never on the press: the
:class:`LayerHooks` of every compressible layer, the :class:`ModelScope` that holds scores across layers, and a
per-prefill ``state`` dict that every :class:`~kvpress_like.press.LayerContext` of one prefill shares (e.g. ChunkKV's
reused indices). One press may so be installed on several models at once, each with its own run state.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .attention import PLAIN, observe_queries
from .cache import SlidingPrefillLayer, cache_in, full_keys_values, like_source, valid_tokens
from .forward_notes import KVPRESS_ATTENTION
from .press import LayerContext, Press, declare_installer, select_top, store
from .registry import architecture_for

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Press] = weakref.WeakKeyDictionary()  # model -> press
_HOOKED: weakref.WeakKeyDictionary[nn.Module, LayerHooks] = weakref.WeakKeyDictionary()  # attention module -> hooks
SUPPORTED_ATTENTION = ("sdpa", "eager")


class ModelScope:
    """Scores of every compressible layer of one prefill, held until the last one is in (model-scope allocators),
    or until the press chooses its ratio after the whole forward (presses with ``defers_selection``, which get it in
    :meth:`Press.install <kvpress_like.press.Press.install>` and call :meth:`finalize`).

    Attributes:
        press: the installed press.
        layers: indices of the compressible layers, ascending.
        pending: layer index -> ``(scores [B, H_kv, S] fp32, protected [B, S], valid [B, S])`` of this prefill.
        cache: the cache of the prefill being compressed.
    """

    def __init__(self, p: Press, layers: tuple[int, ...], owner: int | None = None):
        self.press, self.layers, self.owner = p, layers, owner
        self.pending: dict[int, tuple] = {}
        self.cache = None

    def in_owner_thread(self) -> bool:
        """Whether the calling thread is the one that entered ``press(...)`` (hooks act only there); any thread when
        no owner was given."""
        return self.owner is None or threading.get_ident() == self.owner

    def add(self, ctx: LayerContext, cache) -> None:
        if ctx.layer_idx == self.layers[0]:
            self.pending.clear()  # a new prefill (or a previous one that raised midway)
        scores, protected = self.press.layer_scores(ctx)
        self.pending[ctx.layer_idx] = (scores, protected, ctx.valid)
        self.cache = cache
        if ctx.layer_idx == self.layers[-1] and not self.press.defers_selection:
            self.finalize(cache, self.press.ratio)
            self.pending.clear()

    def finalize(self, cache, ratio: float) -> None:
        """Compress every compressible layer of ``cache`` (still holding the full context) at ``ratio`` with the
        held scores and the press's allocator."""
        if sorted(self.pending) != list(self.layers):
            raise RuntimeError("model-scope compression did not see every compressible layer of this prefill")
        allocator = self.press.allocator_instance
        all_scores = [self.pending[i][0] for i in self.layers]
        _, protected, valid = self.pending[self.layers[-1]]
        if allocator.scope == "model":
            counts = allocator.allocate_model(all_scores, valid, protected, ratio, self.layers)
        else:
            counts = [allocator.allocate(s, valid, protected, ratio, i, self.layers) for i, s in
                      zip(self.layers, all_scores)]
        for idx, layer_scores, layer_counts in zip(self.layers, all_scores, counts):
            full = cache.layers[idx]
            keys, values = full_keys_values(full)
            indices, slot_valid = select_top(layer_scores, layer_counts.to(layer_scores.device))
            cache.layers[idx] = like_source(full, store(keys, values, indices, slot_valid))


class LayerHooks:
    """The forward hooks of one compressible attention module under one ``press(model, p)`` (what
    :meth:`Press.after_forward <kvpress_like.press.Press.after_forward>` receives as ``hooks``).

    Attributes:
        press: the installed press.
        arch: the model's :class:`~kvpress_like.patches.base.Architecture`.
        layer_idx: this layer's index; ``layers``: every compressible layer's, ascending; ``num_layers``: decoder
            layers.
        sliding_window: this layer's window when it is a sliding-window layer, else ``None``.
        state: the installation's per-prefill dict (cleared when a new prefill starts), shared by every layer.

    :meth:`context` builds the :class:`~kvpress_like.press.LayerContext` a scorer reads.
    """

    def __init__(self, p: Press, arch, layer_idx: int, num_layers: int, layers: tuple[int, ...],
                 rotary_emb: nn.Module | None, model_scope: ModelScope | None, owner: int,
                 sliding_window: int | None = None, state: dict | None = None):
        self.press, self.arch, self.layer_idx, self.num_layers = p, arch, layer_idx, num_layers
        self.sliding_window = sliding_window  # this layer's window when it is a sliding-window layer
        self.layers, self.rotary_emb, self.model_scope, self.owner = layers, rotary_emb, model_scope, owner
        self.state = {} if state is None else state
        self.is_prefill = False
        self.projections: dict[str, torch.Tensor] = {}  # query/key projection outputs captured during a prefill
        self._captures: list = []

    def _capture_projections(self, module: nn.Module) -> None:
        """Hook the modules whose outputs hold the queries and the keys (``self.arch.projection_module``: one hook
        for a fused projection) to keep those outputs, ``[B, S, out]`` each, for ``self.arch.from_projection``."""
        targets = {which: self.arch.projection_module(module, which) for which in ("q", "k")}
        for target in {id(m): m for m in targets.values()}.values():
            names = [which for which, m in targets.items() if m is target]

            def keep(mod, args, output, names=names):
                if self.in_owner_thread():
                    self.projections.update(dict.fromkeys(names, output))

            self._captures.append(target.register_forward_hook(keep))

    def in_owner_thread(self) -> bool:
        """Whether the calling thread is the one that entered ``press(...)`` (hooks act only there)."""
        return threading.get_ident() == self.owner

    def note_query(self, query: torch.Tensor) -> None:
        """Keep the post-RoPE queries ``[B, H_q, S, D]`` the attention function receives during a compressed
        prefill."""
        if self._captures and self.in_owner_thread():
            self.projections["q_rope"] = query

    def rope_at(self, module: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
        """``(cos, sin)`` of this layer's RoPE at ``positions`` ``[n]``, each ``[1, n, rotary_dim]``."""
        if self.rotary_emb is None:
            raise ValueError("this model exposes no `rotary_emb` module; the scorer needs RoPE tables")
        return self.arch.rope_tables(self.rotary_emb, module, hidden, positions)

    def before(self, module: nn.Module, args, kwargs):
        if not self.in_owner_thread():
            return None
        kwargs = self.arch.attention_inputs(args, kwargs)  # hidden_states, cache, ... under the names read here
        cache = cache_in(kwargs)
        self.is_prefill = False  # (also after a forward that raised)
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
        self.is_prefill = layer is None or layer.get_seq_length() == 0
        if self.is_prefill and self.layer_idx == self.layers[0]:
            self.state.clear()  # a new prefill: nothing carries over from the previous one
        if self.is_prefill and self.press.compresses_prefill() and not self._captures:
            self._capture_projections(module)
        if layer is not None and not (isinstance(layer, DynamicLayer) or getattr(layer, "is_dynamic", False)):
            raise ValueError(
                f"{type(cache).__name__} ({type(layer).__name__} layers) is not supported under a press: its layers "
                "have a fixed size and cannot hold a compressed context. Use a DynamicCache (generate's default, or "
                "DynamicCache(config=model.config)); cache_implementation='static' is not supported"
            )
        if self.is_prefill and hasattr(layer, "fresh_layer"):
            cache.layers[self.layer_idx] = layer.fresh_layer()  # a reset compressed layer: start afresh
        if self.is_prefill and self.sliding_window is not None and (self.press.compresses_prefill()
                                                                     or self.press.reads_whole_prefill):
            self._hold_sliding_prefill(cache, layer, kwargs["hidden_states"].shape[1])
        return None

    def _hold_sliding_prefill(self, cache, layer, length: int) -> None:
        """Before a sliding-window layer's compressed prefill: refuse a prefill longer than the window, and give the
        layer one that holds the whole prefill (a sliding layer drops its oldest token when the prefill fills the
        window)."""
        window = self.sliding_window
        if length > window:
            raise ValueError(
                f"the prefill has {length} tokens, more than the sliding window ({window}) of layer {self.layer_idx}: "
                f"a sliding-window layer is compressed only when the context fits in its window (without a press it "
                f"keeps only its last {window - 1} tokens anyway). Prefill at most {window} tokens under the press "
                "(longer contexts without one)"
            )
        if self.layer_idx < len(cache.layers):
            cache.layers[self.layer_idx] = SlidingPrefillLayer(window)
        elif self.layer_idx == len(cache.layers):  # a cache built without a config grows its layers lazily
            cache.layers.append(SlidingPrefillLayer(window))

    def context(self, module, kwargs, keys, values, valid, hidden=None, position_embeddings=None) -> LayerContext:
        """A :class:`LayerContext` of this layer for ``keys``/``values`` ``[B, H_kv, S, D]``; the hidden states
        and RoPE tables default to this forward's."""
        hidden = kwargs["hidden_states"] if hidden is None else hidden
        return LayerContext(
            module=module,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
            layers=self.layers,
            arch=self.arch,
            hidden_states=hidden,
            position_embeddings=kwargs["position_embeddings"] if position_embeddings is None else position_embeddings,
            keys=keys,
            values=values,
            valid=valid,
            rotary=lambda positions: self.rope_at(module, hidden, positions),
            projections=self.projections if hidden is kwargs["hidden_states"] else {},
            state=self.state,
        )

    def after(self, module: nn.Module, args, kwargs, output):
        if not self.in_owner_thread():
            return None
        kwargs = self.arch.attention_inputs(args, kwargs)
        cache = cache_in(kwargs)
        was_prefill, self.is_prefill = self.is_prefill, False
        for handle in self._captures:
            handle.remove()
        self._captures = []
        try:
            return self._after(module, kwargs, cache, was_prefill)
        finally:
            self.projections = {}

    def _after(self, module: nn.Module, kwargs, cache, was_prefill: bool):
        if cache is None:
            return None
        with torch.no_grad():
            if was_prefill and self.press.compresses_prefill():
                layer = cache.layers[self.layer_idx]
                hidden = kwargs["hidden_states"]
                valid = valid_tokens(kwargs.get("attention_mask"), hidden.shape[0], hidden.shape[1], hidden.device)
                keys, values = full_keys_values(layer)
                ctx = self.context(module, kwargs, keys, values, valid)
                if self.model_scope is not None:
                    self.model_scope.add(ctx, cache)
                else:
                    cache.layers[self.layer_idx] = like_source(layer, self.press.compress(ctx))
            self.press.after_forward(self, module, kwargs, cache, was_prefill)
        return None


@contextmanager
def press(model: nn.Module, p: Press):
    """Compress every context prefilled by ``model`` inside the block with press ``p``, in this thread: forwards of
    ``model`` in other threads are not pressed (enter the block in the thread that runs them).

    Args:
        model: a supported transformers causal LM (``kvpress-like presses`` lists the architectures).
        p: the press to apply.

    Raises:
        TypeError: ``p`` is not a press, or ``model`` is not a module.
        ValueError: the model is unsupported, already has a press, uses an unsupported attention
            implementation, or has no compressible layer.
    """
    if not isinstance(p, Press):
        raise TypeError(f"press(model, p): p must be a Press, got {type(p).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"press(model, p): model must be a torch.nn.Module, got {type(model).__name__}")
    if any(t.is_meta for t in model.parameters()) and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        # meta weights without accelerate's offload hooks (which load them on the fly): nothing to run
        raise ValueError("press(model, p): the model's weights are on the meta device (not loaded); load or "
                         "materialise them (e.g. from_pretrained, or to_empty + load_state_dict) before press()")
    arch = architecture_for(model.config)
    impl = model.config._attn_implementation
    if PLAIN.get(impl, impl) not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported; load the model with attn_implementation="
            f"one of {SUPPORTED_ATTENTION}"
        )
    layers = arch.decoder_layers(model)
    compressible = arch.compressible_layers(model.config)
    if not compressible:
        raise ValueError(
            f"{type(model).__name__} has no full-attention layer to compress (all layers use sliding-window attention)"
        )
    rotary_emb = arch.rotary_embedding(model)
    attentions = [arch.attention(layers[idx]) for idx in compressible]
    installed = next((_HOOKED[a].press for a in attentions if a in _HOOKED), None)
    if installed is not None:
        raise ValueError(
            f"model already has a press installed ({type(installed).__name__}); "
            "exit its `with press(...)` block before installing another"
        )
    p.check_supported()
    layer_ids = tuple(compressible)
    owner = threading.get_ident()
    model_scope = (ModelScope(p, layer_ids, owner) if p.allocator_instance.scope == "model" or p.defers_selection
                   else None)
    state: dict = {}  # this installation's per-prefill run state, shared by its layers
    handles, all_hooks = [], []
    _ACTIVE[model] = (p, owner)
    # the attention functions registered once by name attend over compressed layers (the same inside the block and
    # outside it); the name is switched, never the function behind a name
    model.config._attn_implementation = KVPRESS_ATTENTION.get(impl, impl)
    try:
        for idx, attn in zip(compressible, attentions):
            hooks = LayerHooks(p, arch, idx, len(layers), layer_ids, rotary_emb, model_scope, owner,
                               arch.sliding_window(model.config, idx), state)
            all_hooks.append(hooks)
            _HOOKED[attn] = hooks
            observe_queries(attn, hooks.note_query)
            handles.append(attn.register_forward_pre_hook(hooks.before, with_kwargs=True))
            handles.append(attn.register_forward_hook(hooks.after, with_kwargs=True))
        if p.defers_selection or p.installs_hooks:
            handles.extend(p.install(model, model_scope))
        yield model
    finally:
        for handle in handles + [c for h in all_hooks for c in h._captures]:
            handle.remove()
        for attn in attentions:
            _HOOKED.pop(attn, None)
            observe_queries(attn, None)
        _ACTIVE.pop(model, None)
        model.config._attn_implementation = impl


def active_press(model: nn.Module) -> Press | None:
    """The press installed on ``model`` by this thread (the one that applies to its forwards), or ``None``."""
    p, owner = _ACTIVE.get(model, (None, None))
    return p if owner == threading.get_ident() else None


declare_installer(press)  # `with p(model):` (Press.__call__) calls press(model, p)
