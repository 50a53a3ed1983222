"""The scorer protocol: the scoring part of a press, apart from its selection policy.

A press is three parts (DESIGN.md): a scorer, an allocator and protected tokens. :class:`Scorer` is the first part on
its own: an object that maps one layer's :class:`~kvpress_like.press.LayerContext` to an importance score per cached
token per KV head, and declares what it needs and what it does. Every built-in press is a scorer (``Press`` declares
every member); a contributor may also write a scorer as a plain class, without subclassing ``Press``, and turn it into
a press with any allocator and protected tokens with :class:`~kvpress_like.press.ScorerPress`. The wrappers that take
a ``scorer=`` (ChunkKV's chunk selection, ``DecodingPress``, ``CalibratedPress``) accept such a scorer as well as a
press.

This module sits below ``press.py`` and imports nothing from the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .press import LayerContext

# What a scorer may need from a layer's context beyond its keys, values and padding mask (``needs``):
NEEDS = {
    "queries": "post-RoPE queries of the context's tokens (ctx.queries()): the prefill's attention inputs",
    "pre_rope": "pre-RoPE keys or queries (ctx.pre_rope_keys / ctx.pre_rope_queries), recomputed from the layer's "
                "input hidden states",
    "rope_tables": "the layer's RoPE tables at arbitrary positions (ctx.rotary)",
    "second_forward": "another forward of the model (scores that the layer-by-layer flow cannot give: KVzip)",
}

_FLAGS = ("is_plain_scorer", "acts_while_decoding", "supports_decoding", "score_depends_on_ratio")


@runtime_checkable
class Scorer(Protocol):
    """What a scorer is: ``score(ctx)`` plus its declarations (class attributes or properties).

    Attributes:
        needs: the parts of the layer context it reads beyond keys, values and ``valid`` (names from :data:`NEEDS`).
        supports_decoding: ``score()`` works from the keys, values and the latest queries alone (``DecodingPress``
            can use it while decoding).
        score_depends_on_ratio: the scores change with the press's ratio (a plain scorer has none: ``False``).
        is_plain_scorer: the press flow may take ``score()`` and select by itself (``True`` for any scorer written
            as a plain class: selection belongs to the press that hosts it).
        acts_while_decoding: it changes the cache after forwards that are not the prefill (``False`` for a plain
            scorer).
    """

    needs: frozenset[str]
    supports_decoding: bool
    score_depends_on_ratio: bool
    is_plain_scorer: bool
    acts_while_decoding: bool

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Importance of each cached token of one layer, ``[B, H_kv, S]`` (higher = keep; any float dtype; padding
        and protected tokens are masked by the press afterwards, so their values do not matter)."""
        ...


def missing_members(obj) -> list[str]:
    """The members of :class:`Scorer` that ``obj`` lacks (``score`` when it is missing or not callable)."""
    missing = [name for name in ("needs", *_FLAGS) if not hasattr(obj, name)]
    if not callable(getattr(obj, "score", None)):
        missing.insert(0, "score(ctx)")
    return missing


def check_scorer(obj, role: str = "scorer") -> None:
    """Raise unless ``obj`` is a scorer whose declarations are well formed.

    Raises:
        TypeError: a member of :class:`Scorer` is missing (each is named), a flag is not a bool, or ``needs`` is not
            a set of strings.
        ValueError: ``needs`` names something that is not in :data:`NEEDS`.
    """
    missing = missing_members(obj)
    if missing:
        raise TypeError(f"{role} must be a Press, a press name or a scorer (kvpress_like.Scorer); "
                        f"{type(obj).__name__} lacks {', '.join(missing)} (see docs/plugins.md, 'Writing a scorer')")
    for name in _FLAGS:
        if not isinstance(getattr(obj, name), bool):
            raise TypeError(f"{type(obj).__name__}.{name} must be True or False; got {getattr(obj, name)!r}")
    needs = obj.needs
    if not isinstance(needs, (set, frozenset)) or not all(isinstance(n, str) for n in needs):
        raise TypeError(f"{type(obj).__name__}.needs must be a frozenset of names from {sorted(NEEDS)}; "
                        f"got {needs!r}")
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"{type(obj).__name__}.needs names unknown need(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(NEEDS))}")
