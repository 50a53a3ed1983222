"""GPT-NeoX (`model_type="gpt_neox"`: Pythia, GPT-NeoX-20B), added through the public plugin hook only.

This module is a plugin like a third party's: the core never imports it; it is loaded through its entry point
(``gpt_neox = "kvpress_like.plugins.gpt_neox"`` in the group ``kvpress_like`` of ``pyproject.toml``) and registers
its architecture with the ``register_architectures`` hook. What differs from the default layout
(transformers 5.x ``modeling_gpt_neox``):

* the attention module is ``layers[i].attention``, called with ``hidden_states`` as its first positional argument
  and the cache as ``layer_past``;
* one fused ``query_key_value`` projection whose output is interleaved per head: ``view(B, S, H, 3 * D)`` and each
  head's ``3 * D`` outputs are ``[q_h | k_h | v_h]`` (Phi3's fused projection is ``[all q | all k | all v]``);
* multi-head attention (no ``num_key_value_heads``), head size ``head_size``;
* partial rotary (``rotary_pct``, stored as ``rope_parameters["partial_rotary_factor"]``): only the first
  ``rotary_ndims`` dimensions of each head are rotated, which the family's own ``apply_rotary_pos_emb`` does
  (its ``cos``/``sin`` are ``rotary_ndims`` wide).
"""

import torch
from torch import nn
from transformers.models.gpt_neox import modeling_gpt_neox

from kvpress_like import Architecture, hookimpl

_PARTS = {"q": 0, "k": 1}  # position of the queries and keys among each head's [q | k | v] outputs


def _check(which: str) -> None:
    if which not in _PARTS:
        raise ValueError(f"which must be 'q' (queries) or 'k' (keys); got {which!r}")


class GPTNeoXArchitecture(Architecture):
    """GPT-NeoX: ``attention`` modules, one per-head interleaved ``query_key_value`` projection, partial rotary."""

    def attention(self, decoder_layer: nn.Module) -> nn.Module:
        return decoder_layer.attention

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """``final_layer_norm`` of the base model (``gpt_neox``)."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        return getattr(base, "final_layer_norm", None)

    def attention_inputs(self, args: tuple, kwargs: dict) -> dict:
        """The decoder layer passes the hidden states positionally and the cache as ``layer_past``: renamed
        ``cache``."""
        if "layer_past" in kwargs:
            kwargs = {**kwargs, "cache": kwargs["layer_past"]}
            del kwargs["layer_past"]
        return super().attention_inputs(args, kwargs)

    def head_dim(self, attn: nn.Module) -> int:
        """``hidden_size // num_attention_heads`` (``head_size``)."""
        return attn.head_size

    def projection_module(self, attn: nn.Module, which: str) -> nn.Module:
        """The fused ``query_key_value`` (the same module for queries and keys)."""
        _check(which)
        return attn.query_key_value

    def split_projection(self, attn: nn.Module, output: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, S, H * D]``: the queries' or keys' ``D`` outputs of every head out of ``query_key_value``'s output
        ``[B, S, H * 3D]``, whose head ``h`` holds ``[q_h | k_h | v_h]``."""
        _check(which)
        d = self.head_dim(attn)
        per_head = output.unflatten(-1, (self.num_heads(attn, "q"), 3 * d))  # [B, S, H, 3D]
        part = _PARTS[which]
        return per_head[..., part * d:(part + 1) * d].flatten(-2)  # [B, S, H * D]


ARCHITECTURE = GPTNeoXArchitecture(name="gpt_neox", model_types=("gpt_neox",),
                                   apply_rope=modeling_gpt_neox.apply_rotary_pos_emb)


@hookimpl
def register_architectures(register):
    register(ARCHITECTURE)
