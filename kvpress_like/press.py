"""The press object and the prefill flow of one layer: score -> allocate -> select -> store.

A press is small configuration (:class:`Press`): ``ratio``, an allocator, protected tokens (``n_sink`` first tokens
and the last ``window`` tokens of the context), plus the parameters of its scorer. Its :meth:`Press.score` gives one
score per cached token per KV head; :meth:`Press.compress` turns a freshly prefilled cache layer into a
:class:`~kvpress_like.cache.CompressedLayer` holding only the kept entries.

Kept count (exact): a row with ``n`` real context tokens keeps ``n - floor(ratio * n)`` entries per KV head under the
uniform allocator, and never fewer than ``min(n, n_sink + window)`` (its protected tokens) nor fewer than 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, InitVar, dataclass, field, fields
from functools import cached_property
from numbers import Integral, Real
from typing import ClassVar

import torch
from torch import nn

from . import registry
from .allocators.base import Allocator
from .cache import CompressedLayer, RaggedLayer
from .checks import check_int, check_ratio
from .patches.base import Architecture
from .scorer import check_scorer


@dataclass
class LayerContext:
    """Everything a scorer may read about one layer right after its prefill attention.

    Attributes:
        module: the layer's attention module (read through ``arch``: projections, heads, scale).
        layer_idx: the layer's index in the model.
        num_layers: number of decoder layers.
        layers: indices of the compressible layers, ascending.
        arch: the model's :class:`Architecture`.
        hidden_states: ``[B, S, hidden]`` the attention module's input (after the input norm).
        position_embeddings: ``(cos, sin)``, each ``[B or 1, S, rotary_dim]``.
        keys: ``[B, H_kv, S, D]`` post-RoPE keys as cached (model dtype).
        values: ``[B, H_kv, S, D]`` values as cached.
        valid: ``[B, S]`` bool, ``False`` on padding tokens.
        rotary: ``rotary(positions [n]) -> (cos, sin)`` each ``[1, n, rotary_dim]``: the layer's RoPE tables at
            arbitrary positions (used by scorers that reason about future queries).
        projections: what this forward computed anyway, captured so scorers need not recompute it: the outputs
            ``[B, S, out]`` of the query (``"q"``) and key (``"k"``) projections and the post-RoPE queries
            ``[B, H_q, S, D]`` (``"q_rope"``, sdpa only); each may be missing.
        state: run state of the installation (``press(model, p)``) for the current prefill, shared by every layer
            of it and cleared when the next prefill starts: what a press carries from one layer to the next (e.g.
            ChunkKV's reused indices) goes here, never on the press, so that one press installed on two models at
            once gives each its own result.
    """

    module: nn.Module
    layer_idx: int
    num_layers: int
    layers: tuple[int, ...]
    arch: Architecture
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    projections: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (``H_q / H_kv``)."""
        return self.arch.num_heads(self.module, "q") // self.arch.num_heads(self.module, "k")

    @property
    def scaling(self) -> float:
        """The factor the layer multiplies attention logits ``q . k`` by before the softmax."""
        return self.arch.scaling(self.module)

    def queries(self, last: int | None = None) -> torch.Tensor:
        """Post-RoPE queries ``[B, H_q, n, D]`` of the last ``last`` tokens (all if ``None``)."""
        start = 0 if last is None else max(self.hidden_states.shape[1] - last, 0)
        if "q_rope" in self.projections:
            return self.projections["q_rope"][:, :, start:]
        if "q" in self.projections:
            q = self.arch.from_projection(self.module, self.projections["q"][:, start:], "q")
        else:
            q = self.arch.pre_rope_queries(self.module, self.hidden_states[:, start:])
        cos, sin = self.position_embeddings
        q, _ = self.arch.apply_rope(q, q[:, :1], cos[:, start:], sin[:, start:])  # one dummy head, not a copy
        return q

    @cached_property
    def pre_rope_keys(self) -> torch.Tensor:
        """``[B, H_kv, S, D]`` keys before RoPE (after ``k_norm`` where the model has one)."""
        if "k" in self.projections:
            return self.arch.from_projection(self.module, self.projections["k"], "k")
        return self.arch.pre_rope_keys(self.module, self.hidden_states)

    @cached_property
    def pre_rope_queries(self) -> torch.Tensor:
        """``[B, H_q, S, D]`` queries before RoPE (after ``q_norm`` where the model has one)."""
        if "q" in self.projections:
            return self.arch.from_projection(self.module, self.projections["q"], "q")
        return self.arch.pre_rope_queries(self.module, self.hidden_states)


_NUMBER_TYPES = {"int": (Integral, "an int"), "float": (Real, "a number"), "bool": (bool, "True or False")}


def _check_type(name: str, annotation, value) -> None:
    """Raise a ``TypeError`` when ``value`` does not fit a field annotated ``int``, ``float`` or ``bool`` (optionally
    ``| None``); other annotations are left to the press's own checks."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    optional = text.endswith(" | None")
    kind = text.removesuffix(" | None")
    if kind not in _NUMBER_TYPES or (optional and value is None):
        return
    allowed, described = _NUMBER_TYPES[kind]
    if not isinstance(value, allowed) or (isinstance(value, bool) and kind != "bool"):
        raise TypeError(f"{name} must be {described}{' or None' if optional else ''}; got {value!r}")


_CALIBRATION_ARGS = ("quality", "params", "nll_positions", "min_retention")


def _description(p) -> dict | None:
    """``p.to_dict()``, or ``None`` when a part of ``p`` has no dict form (a :class:`ScorerPress` around a scorer
    written as a plain class)."""
    try:
        return p.to_dict()
    except TypeError:
        return None


def _parts(p) -> list:
    """``p``'s parameters as compared when it has no dict form (the allocator by its description)."""
    return [p.allocator_instance.to_dict() if f.name == "allocator" else getattr(p, f.name)
            for f in fields(p) if f.init]


def _hash_or_type(value) -> int:
    try:
        return hash(value)
    except TypeError:  # unhashable (a dict, a plain dataclass): equal values still share their type
        return hash(type(value))


def _hash_by_parameters(p) -> int:
    """Presses are configuration: presses with the same description (:meth:`Press.to_dict`) hash alike (without
    one, presses with equal parameters do)."""
    description = _description(p)
    if description is None:
        return hash((type(p), *(_hash_or_type(v) for v in _parts(p) if not isinstance(v, dict))))
    return hash(json.dumps(description, sort_keys=True, default=repr))


def _equal_parameters(p, other) -> bool:
    """Two presses are equal when they are of the same class with the same description (an allocator given by name
    equals the same allocator given as an instance with its default parameters); without a description, when their
    parameters are equal (a plain scorer compares as its class defines)."""
    if type(other) is not type(p):
        return NotImplemented
    mine, theirs = _description(p), _description(other)
    if mine is None or theirs is None:
        return _parts(p) == _parts(other)
    return mine == theirs


class _CheckedPress(type):
    """Once a press is built (after its own ``__post_init__`` checks, whose messages come first), every parameter
    annotated ``int``, ``float`` or ``bool`` must hold one; from then on assignments are checked as they happen.

    Every press class compares and hashes by its parameters (``@dataclass`` keeps an ``__eq__`` and ``__hash__`` its
    class defines, and would otherwise remove ``__hash__``).
    """

    def __new__(mcs, name, bases, namespace, **kwargs):
        namespace.setdefault("__eq__", _equal_parameters)
        namespace.setdefault("__hash__", _hash_by_parameters)
        return super().__new__(mcs, name, bases, namespace, **kwargs)

    def __call__(cls, *args, **kwargs):
        """Build and check a press; ``ratio="auto"`` is routed to the factory :meth:`Press.calibrated` (so
        ``CompactorPress(ratio="auto", quality=0.95)`` returns a :class:`~kvpress_like.calibration.CalibratedPress`
        around a ``CompactorPress``; no class swaps its instances in ``__new__``)."""
        if "auto" in (kwargs.get("ratio"), kwargs.get("compression_ratio"), args[0] if args else None):
            rest = {k: v for k, v in kwargs.items() if k not in ("ratio", "compression_ratio")}
            return cls.calibrated(*args[1:], **rest)  # args[0], when given, is the ratio
        instance = cls.__new__(cls)
        object.__setattr__(instance, "_ratio_passed", bool(args) or "ratio" in kwargs)
        instance.__init__(*args, **kwargs)
        for f in fields(instance):
            _check_type(f.name, f.type, getattr(instance, f.name))
        instance.check_supported()
        object.__setattr__(instance, "_built", True)
        return instance


@dataclass
class Press(metaclass=_CheckedPress):
    """Base press: configuration plus a scorer. Subclasses set ``name`` and implement :meth:`score`.

    Args:
        ratio: fraction of each context's KV pairs removed, in [0, 1). 0 keeps everything, 0.6 keeps 40 %.
        allocator: an allocator name (``kvpress-like presses`` lists them) or an :class:`Allocator`.
        n_sink: number of first context tokens always kept.
        window: number of last context tokens always kept.
        compression_ratio: alias of ``ratio`` for users coming from kvpress.

    A press is immutable configuration: it compares and hashes by its parameters, assigning one raises an
    ``AttributeError``, and :meth:`replace` returns a changed copy.
    """

    name: ClassVar[str] = ""
    supports_decoding: ClassVar[bool] = False  # score() works from keys/values and the latest queries only

    ratio: float = 0.0
    allocator: str | Allocator = "uniform"
    n_sink: int = 0
    window: int = 0
    compression_ratio: InitVar[float | None] = None

    @classmethod
    def calibrated(cls, *args, **kwargs) -> Press:
        """A :class:`~kvpress_like.calibration.CalibratedPress` that chooses the ratio per context and scores with
        ``cls(*args, **parameters)``; the calibration arguments (``quality``, ``params``, ``nll_positions``,
        ``min_retention``) go to the calibrated press, the rest to the scorer. ``CompactorPress.calibrated(
        quality=0.95)`` is what ``CompactorPress(ratio="auto", quality=0.95)`` returns.

        Raises:
            ValueError: ``cls`` is itself calibrated, or the scorer is not a plain scorer.
        """
        CalibratedPress = registry.get_press_class("calibrated")  # registered by the built-in plugin
        if issubclass(cls, CalibratedPress):
            raise ValueError("CalibratedPress chooses the ratio itself: do not pass ratio")
        inner = {k: v for k, v in kwargs.items() if k not in _CALIBRATION_ARGS}
        calibration = {k: kwargs[k] for k in _CALIBRATION_ARGS if k in kwargs}
        return CalibratedPress(scorer=cls(*args, **inner), **calibration)

    def __post_init__(self, compression_ratio: float | None = None):
        if compression_ratio is not None:
            if getattr(self, "_ratio_passed", False) or self.ratio != 0:
                raise ValueError("pass either ratio or compression_ratio, not both")
            self.ratio = compression_ratio

    def __setattr__(self, name: str, value) -> None:
        """Parameters are checked as they are set while the press is built; once built, a press is immutable
        configuration (it may be a dict key, and its hash follows its parameters), so assigning a parameter raises
        an ``AttributeError`` that points to :meth:`replace`."""
        built = self.__dict__.get("_built")
        if built and (name == "compression_ratio" or (name in self.__dataclass_fields__
                                                      and self.__dataclass_fields__[name].init)):
            raise AttributeError(
                f"{type(self).__name__} is immutable configuration: cannot assign {name}; build a changed copy with "
                f"p.replace({name}=...)")
        if name == "ratio":
            value = check_ratio(value)
        elif name in ("n_sink", "window"):
            value = check_int(name, value)
        elif name == "allocator":
            if isinstance(value, str):
                object.__setattr__(self, "_allocator", registry.get_allocator(value))
            elif isinstance(value, Allocator):
                object.__setattr__(self, "_allocator", value)
            else:
                raise TypeError(f"allocator must be an allocator name or an Allocator; got {value!r}")
        object.__setattr__(self, name, value)

    def replace(self, **changes) -> Press:
        """A copy of this press with some parameters changed, built (and checked) like a new press:
        ``p.replace(ratio=0.25)``, ``p.replace(allocator="pyramid")``; ``compression_ratio=`` is accepted as the
        alias of ``ratio``. The press itself never changes.

        Raises:
            TypeError: a name that is not a parameter of this press.
            ValueError: both ``ratio`` and ``compression_ratio``, or a value the press refuses.
        """
        if "compression_ratio" in changes:
            if "ratio" in changes:
                raise ValueError("pass either ratio or compression_ratio, not both")
            changes["ratio"] = changes.pop("compression_ratio")
        allowed = [f.name for f in fields(self) if f.init]
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise TypeError(f"{type(self).__name__}.replace got unknown parameter(s) {', '.join(unknown)}; "
                            f"its parameters are {', '.join(allowed)} (and compression_ratio, the alias of ratio)")
        return dataclasses.replace(self, **changes)

    @property
    def allocator_instance(self) -> Allocator:
        """The :class:`Allocator` this press uses (``allocator`` resolved when given by name)."""
        return self._allocator

    def check_supported(self) -> None:
        """Raise a ``ValueError`` when this combination of parameters cannot act as configured (checked when the
        press is built and when it is installed); the base press accepts every combination."""

    # -- scorer -----------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Importance of each cached token: ``[B, H_kv, S]`` (higher = keep), computed in fp32."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(ctx)")

    # -- prefill flow -----------------------------------------------------------------------------------
    def protected_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` bool: the first ``n_sink`` and last ``window`` real tokens of each row."""
        rank = valid.long().cumsum(-1) - 1  # rank among real tokens
        n_real = valid.sum(-1, keepdim=True)
        return valid & ((rank < self.n_sink) | (rank >= n_real - self.window))

    def layer_scores(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated fp32 scores ``[B, H_kv, S]`` with ``+inf`` on protected and ``-inf`` on padding tokens, and the
        ``[B, S]`` protected mask."""
        scores = self.score(ctx)
        expected = ctx.keys.shape[:3]
        if scores.shape != expected:
            name = type(self).__name__
            raise ValueError(f"{name}.score returned shape {tuple(scores.shape)}, expected {tuple(expected)}")
        scores = scores.float()
        if torch.isnan(scores).any():
            raise ValueError(f"{type(self).__name__}.score returned NaN in layer {ctx.layer_idx}")
        protected = self.protected_mask(ctx.valid)
        big = torch.finfo(torch.float32).max
        scores = scores.clamp(-big, big)
        scores = scores.masked_fill(protected[:, None, :], math.inf).masked_fill(~ctx.valid[:, None, :], -math.inf)
        return scores, protected

    def select(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and allocate one layer (layer-scope allocator); returns ``(indices, slot_valid)`` of
        :func:`select_top`."""
        scores, protected = self.layer_scores(ctx)
        counts = self._allocator.allocate(scores, ctx.valid, protected, self.ratio, ctx.layer_idx, ctx.layers)
        return select_top(scores, counts.to(scores.device))

    def compress(self, ctx: LayerContext) -> CompressedLayer:
        """Score, allocate, select and store one layer; returns the layer holding only kept entries."""
        indices, slot_valid = self.select(ctx)
        return store(ctx.keys, ctx.values, indices, slot_valid)

    def compresses_prefill(self) -> bool:
        """Whether a context's first forward is compressed (``ratio > 0``)."""
        return self.ratio > 0

    # -- capabilities: what a press declares about itself, read by the modules that build on presses -----------------
    defers_selection: ClassVar[bool] = False  # True: select after the whole prefill forward (see ``install``)
    installs_hooks: ClassVar[bool] = False  # True: install() adds model-level hooks (FastKV's token propagation)
    # True: after_forward selects among every entry of a cache's first forward (chunked prefill), so a sliding-window
    # layer must hold that forward whole, as when the prefill is compressed
    reads_whole_prefill: ClassVar[bool] = False
    # True: the prefill flow is exactly score() -> allocator -> select_top -> store, with no selection, hooks or
    # decoding action of its own, so a caller may take score() and select by itself (chunked prefill, calibration,
    # the runner's shared prefill). A class overriding select, compress, install or after_forward must declare it.
    is_plain_scorer: ClassVar[bool] = True
    # True: after_forward changes the cache after forwards that are not the prefill (decoding-time compression), so
    # a cache answered on under this press cannot be cropped back. A class overriding after_forward must declare it.
    acts_while_decoding: ClassVar[bool] = False
    # what score() reads from the layer context beyond keys, values and valid (names of kvpress_like.scorer.NEEDS)
    needs: ClassVar[frozenset[str]] = frozenset()
    # True: the press chooses the ratio per context (its own and its scorer's ratio are ignored) and records the
    # choice on the cache it compressed (see record_compression)
    chooses_ratio: ClassVar[bool] = False

    _FLOW_METHODS: ClassVar[dict[str, tuple[str, ...]]] = {
        "is_plain_scorer": ("select", "compress", "install", "after_forward"),
        "acts_while_decoding": ("after_forward",),
    }

    def __init_subclass__(cls, **kwargs):
        """A class that replaces part of the prefill flow declares the capabilities that change with it (a missing
        declaration would let chunked prefill or calibration silently bypass the replaced method)."""
        super().__init_subclass__(**kwargs)
        for flag, methods in Press._FLOW_METHODS.items():
            replaced = [m for m in methods if m in cls.__dict__]
            declared = any(flag in k.__dict__ for k in cls.__mro__ if k is not Press)
            if replaced and not declared:
                raise TypeError(f"{cls.__name__} overrides {', '.join(replaced)}: declare the class attribute {flag} "
                                f"(True or False; see Press and docs/plugins.md, 'writing a scorer')")

    @property
    def score_depends_on_ratio(self) -> bool:
        """Whether :meth:`score` changes with ``ratio`` (scores recorded at one ratio cannot serve another)."""
        return False

    def install(self, model: nn.Module, scope) -> list:
        """Presses with ``defers_selection`` or ``installs_hooks`` register their model-level hooks here and return the
        handles (removed on exit); presses with ``defers_selection`` call ``scope.finalize(cache, ratio)`` once they
        have chosen the ratio."""
        raise NotImplementedError

    def after_forward(self, hooks, module: nn.Module, kwargs: dict, cache, was_prefill: bool) -> None:
        """Called after every forward of a compressible layer (prefill or not); presses acting while decoding
        override it (see :class:`~kvpress_like.decoding.DecodingPress`)."""

    # -- conveniences ----------------------------------------------------------------------------------
    def __call__(self, model: nn.Module):
        """``with p(model): ...`` works like ``with press(model, p): ...`` (:func:`kvpress_like.context.press`, which
        declares itself with :func:`declare_installer`: this module does not import the layer above it)."""
        if _installer is None:
            raise RuntimeError("p(model) needs kvpress_like.context (import kvpress_like.context, or use "
                               "kvpress_like.press(model, p))")
        return _installer(model, self)

    def to_dict(self) -> dict:
        """JSON-ready description: ``{"press": name, **parameters}`` (:func:`~kvpress_like.registry.press_from_dict`
        reverses it). A wrapped press becomes its own dict; an allocator its name, or
        ``{"allocator": name, **parameters}`` when it has parameters (``PyramidAllocator(beta=5)``)."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for key, value in params.items():
            if isinstance(value, Press):
                params[key] = value.to_dict()
            elif isinstance(value, Allocator):
                params[key] = value.name if value.params() == value.default_params() else value.to_dict()
        return {"press": self.name, **params}


_installer: Callable | None = None


def declare_installer(installer: Callable) -> None:
    """Declare the function ``p(model)`` calls: ``installer(model, p)`` returns the ``with`` context
    (:func:`kvpress_like.context.press` declares itself when its module is imported)."""
    global _installer
    _installer = installer


registry.declare_press_class(Press)


@dataclass
class ScorerPress(Press):
    """A press made of any scorer (:class:`~kvpress_like.scorer.Scorer`: a plain class with ``score(ctx)`` and its
    declarations, or a press used for its scores) plus a selection policy::

        ScorerPress(scorer=MyScorer(), ratio=0.5, allocator="head_adaptive", n_sink=4, window=8)

    Args:
        scorer: the scorer; its ``score(ctx)`` gives ``[B, H_kv, S]`` and the allocator selects from it.
        ratio, allocator, n_sink, window: as for every :class:`Press`.

    It compares by its parameters (the scorer as its class defines ``==``) and hashes alike; it has no dict form
    (:meth:`to_dict` raises a ``TypeError``): ``press_from_dict`` rebuilds registered presses only.

    Raises:
        TypeError: ``scorer`` is not a scorer (the missing members are named).
        ValueError: the scorer selects, installs hooks or acts while decoding by itself (``is_plain_scorer`` false
            or ``acts_while_decoding`` true), needs a second forward, or is a press whose scores depend on its own
            ratio, which differs from ``ratio``.
    """

    name: ClassVar[str] = "scorer"
    scorer: object = None

    def __post_init__(self, compression_ratio: float | None = None):
        super().__post_init__(compression_ratio)
        check_scorer(self.scorer, "ScorerPress(scorer=...)")
        kind = type(self.scorer).__name__
        if not self.scorer.is_plain_scorer or self.scorer.acts_while_decoding:
            raise ValueError(f"{kind} selects, installs hooks or acts while decoding by itself (is_plain_scorer="
                             f"{self.scorer.is_plain_scorer}, acts_while_decoding={self.scorer.acts_while_decoding});"
                             " ScorerPress hosts scorers whose tokens its allocator selects")
        if "second_forward" in self.scorer.needs:
            raise ValueError(f"{kind} needs a second forward, which ScorerPress's layer-by-layer flow does not run")
        if isinstance(self.scorer, Press) and self.scorer.score_depends_on_ratio and self.scorer.ratio != self.ratio:
            raise ValueError(f"{kind}'s scores depend on its ratio ({self.scorer.ratio:g}), which differs from "
                             f"ratio={self.ratio:g}: give both the same ratio")

    @property
    def needs(self) -> frozenset[str]:
        """The scorer's needs."""
        return frozenset(self.scorer.needs)

    @property
    def supports_decoding(self) -> bool:
        """Whether the scorer works from keys, values and the latest queries alone."""
        return self.scorer.supports_decoding

    @property
    def score_depends_on_ratio(self) -> bool:
        return self.scorer.score_depends_on_ratio

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """The scorer's scores ``[B, H_kv, S]``."""
        return self.scorer.score(ctx)

    def to_dict(self) -> dict:
        """Raises ``TypeError``: a scorer given as an object has no dict form that ``press_from_dict`` could rebuild
        (it rebuilds registered presses by name)."""
        raise TypeError(
            f"ScorerPress(scorer={type(self.scorer).__name__}(...)) cannot be written as a dict: press_from_dict "
            "rebuilds registered presses only. Register the scorer as a press (a Press subclass with a name, from a "
            "plugin's register_presses) to save or reload it by description, or rebuild it in code with "
            "ScorerPress(scorer=..., ...)")


def as_press(value, role: str = "scorer") -> Press:
    """What a wrapper's ``scorer=`` argument becomes: a press as it is, a registry name created with its defaults,
    any other :class:`~kvpress_like.scorer.Scorer` wrapped in a :class:`ScorerPress` with the default policy (ratio
    0, uniform allocator, no protected tokens; pass ``ScorerPress(scorer=..., window=...)`` for another).

    Raises:
        TypeError: ``value`` is neither (the members of ``Scorer`` it lacks are named).
    """
    if isinstance(value, Press):
        return value
    if isinstance(value, str):
        return registry.create_press(value)
    check_scorer(value, role)
    return ScorerPress(scorer=value)


def select_top(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``counts[b, h]`` tokens of every head, in ascending token order.

    Args:
        scores: ``[B, H, S]`` fp32, ``-inf`` on tokens that must never be kept, ``+inf`` on protected ones.
        counts: ``[B, H]`` long, entries in ``[1, S]``.

    Returns:
        indices: ``[B, H, P]`` long with ``P = counts.max()``; the first ``counts[b, h]`` entries are the kept
            tokens in ascending order, the rest are filler.
        slot_valid: ``[B, H, P]`` bool, ``True`` on the first ``counts[b, h]`` slots.
    """
    s = scores.shape[-1]
    p = int(counts.max())
    top = scores.topk(p, dim=-1).indices  # descending score
    slot_valid = torch.arange(p, device=scores.device) < counts[..., None]
    order_key = torch.where(slot_valid, top, top + s)  # kept first, ascending; filler after
    indices = top.gather(-1, order_key.argsort(dim=-1))
    return indices, slot_valid


def store(keys, values, indices, slot_valid) -> CompressedLayer | RaggedLayer:
    """Dense layer when every head of a row keeps the same slots, ragged per-head layer otherwise."""
    if bool((slot_valid == slot_valid[:, :1]).all()):
        return store_dense(keys, values, indices, slot_valid)
    return store_ragged(keys, values, indices, slot_valid)


def store_ragged(keys, values, indices, slot_valid) -> RaggedLayer:
    """Gather kept entries into a :class:`RaggedLayer` (no padding to the longest head).

    Args: as :func:`store_dense`; ``slot_valid`` may differ between heads (valid slots come first).
    """
    d = keys.shape[-1]
    gather = indices[..., None].expand(*indices.shape, d)
    kept_keys = keys.gather(2, gather)[slot_valid]  # [N, D] in (b, h) row-major order
    kept_values = values.gather(2, gather)[slot_valid]
    return RaggedLayer(kept_keys.contiguous(), kept_values.contiguous(), slot_valid.sum(-1), keys.shape[2], keys.shape)


def store_dense(keys, values, indices, slot_valid, logical_length: int | None = None) -> CompressedLayer:
    """Gather kept entries into a dense :class:`CompressedLayer`.

    Args:
        keys, values: ``[B, H, S, D]``.
        indices: ``[B, H, P]`` from :func:`select_top`.
        slot_valid: ``[B, H, P]``; must be the same for every head of a row.
        logical_length: tokens seen by the layer (default: ``S``, the prefill's length).
    """
    if not bool((slot_valid == slot_valid[:, :1]).all()):
        raise NotImplementedError("heads of a layer keep different counts; ragged per-head storage is required")
    gather = indices[..., None].expand(*indices.shape, keys.shape[-1])
    kept_keys = keys.gather(2, gather).contiguous()
    kept_values = values.gather(2, gather).contiguous()
    logical = keys.shape[2] if logical_length is None else logical_length
    layer = CompressedLayer(kept_keys, kept_values, slot_valid[:, 0].contiguous(), logical)
    layer.selected = indices  # the positions of a sliding-window layer's entries follow from it (cache.like_source)
    return layer


_BASE_FIELDS = ("ratio", "allocator", "n_sink", "window")


def record_compression(cache, p: Press, **facts) -> None:
    """Record on ``cache`` what its prefill under ``p`` chose, as the public attribute ``cache.compression_info``:
    ``{"press": describe(p), **facts}`` (a calibrated press records ``ratio``, ``retention``, ``context_nll`` and
    ``quality``), and ``p`` itself (immutable configuration) as ``cache.compressed_by``. The choice is a fact about
    the entries the cache holds, so it lives on the cache, never on the press: one press prefilling two caches gives
    each its own record. A later recorded prefill replaces it; copies of the cache (``copy.deepcopy``) carry it.

    Args:
        cache: the cache the prefill filled (a transformers ``Cache``).
        p: the press that compressed it.
        facts: JSON-ready values (numbers, strings).
    """
    cache.compression_info = {"press": describe(p), **facts}
    cache.compressed_by = p


def compression_info(cache, p: Press | None = None) -> dict | None:
    """A copy of what :func:`record_compression` recorded on ``cache``, or ``None`` (no record; or, with ``p``, a
    record made by a press other than ``p``).

    ``compression_info(cache)["ratio"]`` is the ratio a calibrated press chose for that cache's context.
    """
    info = getattr(cache, "compression_info", None)
    if not isinstance(info, dict) or (p is not None and getattr(cache, "compressed_by", None) != p):
        return None
    return dict(info)


def applied_ratio(p: Press | None, cache=None) -> float:
    """The ratio a prefill under ``p`` removes: for a cache it compressed, the ratio recorded on the cache
    (:func:`compression_info`: what a calibrated press chose for that context); else a wrapper's scorer's ratio when
    the wrapper compresses the prefill with it (``DecodingPress``; a calibrated press without a cache: its scorer's
    ratio), else ``p.ratio``; 0 without a press."""
    if p is None:
        return 0.0
    info = compression_info(cache, p) if cache is not None else None
    if info is not None and "ratio" in info:
        return info["ratio"]
    inner = getattr(p, "scorer", None)
    if isinstance(inner, Press) and p.ratio == 0:
        return applied_ratio(inner, cache) if p.compresses_prefill() else 0.0
    return p.ratio


def describe(p: Press, cache=None, _inner: bool = False) -> str:
    """Short one-line description used by the CLI: the press's name, its ratio and the parameters that differ from
    its defaults, with a wrapped scorer described the same way in place of ``scorer=``.

    ``compactor(ratio=0.5)``, ``snapkv(ratio=0.5, window=32)``,
    ``decoding(knorm(ratio=0.5), target=512, interval=16, compress_prefill=True)``,
    ``calibrated(compactor, quality=0.95)`` (with the ``cache`` it compressed: ``calibrated(compactor,
    quality=0.95, chosen ratio=0.412)``, the ratio recorded on the cache, see :func:`compression_info`).
    """
    # a wrapper's own ratio, allocator and protected tokens are its scorer's (a ScorerPress's are its own)
    wrapper = isinstance(getattr(p, "scorer", None), Press) and not isinstance(p, ScorerPress)
    calibrated = p.chooses_ratio  # a calibrated press ignores its scorer's ratio
    parts = []
    for f in fields(p):
        if not f.init:
            continue
        value = getattr(p, f.name)
        if isinstance(value, Press):
            parts.append(describe(value, _inner=calibrated))
            continue
        if f.name == "scorer" and isinstance(p, ScorerPress):
            parts.append(type(value).__name__)  # a scorer written as a plain class: its class names it
            continue
        if wrapper and f.name in _BASE_FIELDS:
            continue  # a wrapper's own ratio (0), allocator and protected tokens are its scorer's, described there
        if f.name == "ratio":
            if not (_inner and value == 0):  # a calibrated press ignores its scorer's ratio
                parts.append(f"ratio={value:g}")
            continue
        if isinstance(value, Allocator):
            value = value.name
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        if value != default or (calibrated and f.name == "quality"):
            parts.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value!r}")
    info = compression_info(cache, p) if calibrated and cache is not None else None
    if info is not None and "ratio" in info:
        parts.append(f"chosen ratio={info['ratio']:.3f}")
    name = p.name or type(p).__name__
    return f"{name}({', '.join(parts)})" if parts else name
