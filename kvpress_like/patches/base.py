"""Everything a press needs to know about one architecture family: an :class:`Architecture`.

A press hooks a model through its family's :class:`Architecture` only: which decoder layers and attention modules
there are and which are compressed, how an attention module is called, where its query and key projections are and
how their output splits into heads (separate ``q_proj``/``k_proj``, a fused ``qkv_proj``, GPT-NeoX's per-head
interleaved ``query_key_value``), the ``q_norm``/``k_norm`` applied before RoPE (per head, or over the whole
projection), RoPE itself, and the attention scale. Queries and keys are recomputed from a layer's input hidden states
with the layer's own modules, never by undoing RoPE.

The defaults describe the transformers 5.x layout of Llama, Mistral, Qwen2/3 and Gemma3:
``model.get_decoder().layers[i].self_attn`` with ``q_proj``/``k_proj``, optional per-head ``q_norm``/``k_norm``,
``head_dim`` and ``scaling`` attributes, called with keyword arguments (``hidden_states``, ``attention_mask``,
``position_embeddings``, ``cache``). A family laid out differently subclasses :class:`Architecture` and overrides the
methods that differ; a plugin registers it with the ``register_architectures`` hook (see ``docs/plugins.md``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

WHICH = ("q", "k")


def check_which(which: str) -> None:
    """Raise a ``ValueError`` unless ``which`` is ``"q"`` or ``"k"``."""
    if which not in WHICH:
        raise ValueError(f"which must be 'q' (queries) or 'k' (keys); got {which!r}")


@dataclass(frozen=True)
class Architecture:
    """An architecture family a press can hook.

    Attributes:
        name: registry name, e.g. ``"llama"``.
        model_types: the ``config.model_type`` values this family covers.
        apply_rope: the family's ``apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)``: ``q`` ``[B, H_q, S, D]``, ``k``
            ``[B, H_kv, S, D]``, ``cos``/``sin`` ``[B or 1, S, rotary_dim]`` (``rotary_dim < D`` for partial rotary).
    """

    name: str
    model_types: tuple[str, ...]
    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    # -- layer discovery --------------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM or of its base model."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        layers = getattr(base, "layers", None)
        if layers is None:
            raise TypeError(f"{type(model).__name__} has no decoder `layers`; cannot hook architecture {self.name!r}")
        return layers

    def attention(self, decoder_layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer (``self_attn``)."""
        return decoder_layer.self_attn

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        """The module computing the RoPE tables ``(cos, sin)`` of positions (``rotary_emb`` of the base model), or
        ``None`` when the model has none."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        return getattr(base, "rotary_emb", None)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm applied to the last decoder layer's output before the LM head (``norm`` of the base model), or
        ``None`` when there is none. Calibrated compression reads the context's final hidden states ``[B, S, hidden]``
        from its output."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        return getattr(base, "norm", None)

    def rope_tables(self, rotary: nn.Module, attn: nn.Module, like: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of attention module ``attn``'s RoPE at ``positions`` ``[n]``, each ``[1, n, rotary_dim]``,
        from ``rotary`` (:meth:`rotary_embedding`); ``like`` gives the dtype and device. A rotary module that takes a
        ``layer_type`` (Gemma3: local and global layers rotate differently) gets the module's."""
        args = (like[:1, :1], positions[None].to(like.device))
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            return rotary(*args, layer_type=getattr(attn, "layer_type", None))
        return rotary(*args)

    def compressible_layers(self, config) -> list[int]:
        """Indices of the layers a press compresses: those with full attention; in a model whose every layer is
        sliding-window (Mistral-7B-v0.1, Qwen2 with a sliding window on all layers), the sliding-window layers
        (compressed when a prefill fits in the window). Models mixing both (Gemma3) keep their sliding layers."""
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = layer_types(config)
        full = [i for i, kind in enumerate(types) if kind == "full_attention"]
        return full or [i for i, kind in enumerate(types) if kind == "sliding_attention"]

    def sliding_window(self, config, layer_idx: int) -> int | None:
        """The sliding window of layer ``layer_idx`` (``None`` for a full-attention layer)."""
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if layer_types(config)[layer_idx] != "sliding_attention":
            return None
        return getattr(config, "sliding_window", None)

    # -- how the attention module is called ---------------------------------------------------------------------------
    def attention_inputs(self, args: tuple, kwargs: dict) -> dict:
        """The arguments of one call of the attention module, by the names the hooks read: ``hidden_states``
        ``[B, S, hidden]`` (the module's input), ``attention_mask``, ``position_embeddings`` ``(cos, sin)`` and the
        cache as ``cache`` (or ``past_key_values``).

        The default accepts ``hidden_states`` as the only positional argument and every other one by keyword.

        Raises:
            TypeError: more positional arguments, or a cache passed under another name (the layer would silently
                not be compressed): the family needs an Architecture that overrides this method.
        """
        if len(args) > 1:
            raise TypeError(f"{self.name}: the attention module was called with {len(args)} positional arguments; "
                            "this architecture expects hidden_states then keyword arguments only (override "
                            "Architecture.attention_inputs for this family)")
        inputs = {"hidden_states": args[0], **kwargs} if args else kwargs
        if "cache" not in inputs and "past_key_values" not in inputs:
            stray = [name for name, value in inputs.items() if isinstance(value, Cache)]
            if stray:
                raise TypeError(f"{self.name}: the attention module receives its cache as {stray[0]!r}, not as "
                                "`cache`; override Architecture.attention_inputs to return it as `cache` (see the "
                                "GPT-NeoX plugin)")
        return inputs

    # -- shapes and scale ---------------------------------------------------------------------------------------------
    def num_heads(self, attn: nn.Module, which: str) -> int:
        """Number of query heads (``which="q"``) or key/value heads (``"k"``) of attention module ``attn``."""
        check_which(which)
        config = attn.config
        if which == "q":
            return config.num_attention_heads
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, attn: nn.Module) -> int:
        """Size ``D`` of one query or key head."""
        return attn.head_dim

    def scaling(self, attn: nn.Module) -> float:
        """The factor the attention logits ``q . k`` are multiplied by before the softmax."""
        return attn.scaling

    # -- projections ------------------------------------------------------------------------------------------------
    def projection_module(self, attn: nn.Module, which: str) -> nn.Module:
        """The module whose output holds the queries (``which="q"``) or the keys (``"k"``): ``q_proj``/``k_proj``.
        A fused projection is the same module for both."""
        check_which(which)
        return getattr(attn, f"{which}_proj")

    def split_projection(self, attn: nn.Module, output: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, S, H * D]``: the queries' or keys' part of ``output`` ``[B, S, out]``, the output of
        ``projection_module(attn, which)``, heads in order (``[h0 | h1 | ...]``). Separate projections: ``output``."""
        check_which(which)
        return output

    def to_heads(self, attn: nn.Module, flat: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, H, S, D]`` pre-RoPE queries or keys from their projection ``flat`` ``[B, S, H * D]``, after the
        ``q_norm``/``k_norm`` the module applies to each head (Qwen3, Gemma3), if any.

        Raises:
            ValueError: the module's norm does not have one weight per head dimension (a norm over the whole
                projection, like OLMo2's, needs an architecture that overrides this method).
        """
        check_which(which)
        head_dim = self.head_dim(attn)
        states = flat.view(*flat.shape[:-1], -1, head_dim)  # [B, S, H, D]
        norm = getattr(attn, f"{which}_norm", None)
        if norm is not None:
            weight = getattr(norm, "weight", None)
            if weight is not None and weight.numel() != head_dim:
                raise ValueError(
                    f"{self.name}: {type(attn).__name__}.{which}_norm has {weight.numel()} weights, not one per head "
                    f"dimension ({head_dim}); a norm over the whole projection needs an Architecture that overrides "
                    "to_heads (see the OLMo2 plugin)"
                )
            states = norm(states)
        return states.transpose(1, 2)

    def from_projection(self, attn: nn.Module, output: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, H, S, D]`` pre-RoPE queries or keys from the output ``[B, S, out]`` of
        ``projection_module(attn, which)`` (e.g. captured by a forward hook during the model's own forward)."""
        return self.to_heads(attn, self.split_projection(attn, output, which), which)

    def pre_rope(self, attn: nn.Module, hidden_states: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, H, S, D]`` pre-RoPE queries or keys of the attention input ``hidden_states`` ``[B, S, hidden]``,
        computed with the module's own projection (the whole fused one, so the result is bit-identical to the
        model's) and norm."""
        return self.from_projection(attn, self.projection_module(attn, which)(hidden_states), which)

    def pre_rope_queries(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, H_q, S, D]`` queries before RoPE (after ``q_norm`` if any) of ``hidden_states`` ``[B, S, hidden]``."""
        return self.pre_rope(attn, hidden_states, "q")

    def pre_rope_keys(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, S, D]`` keys before RoPE (after ``k_norm`` if any) of ``hidden_states`` ``[B, S, hidden]``."""
        return self.pre_rope(attn, hidden_states, "k")


def layer_types(config) -> list[str]:
    """Attention type of each layer: ``config.layer_types``, else sliding if ``config.sliding_window`` is set."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers
