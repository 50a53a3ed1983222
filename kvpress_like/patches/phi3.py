"""Phi3 (`model_type="phi3"`): one fused ``qkv_proj`` whose output rows are ``[q | k | v]`` (all query heads, then
all key heads, then all value heads); RoPE from `modeling_phi3`."""

import torch
from torch import nn
from transformers.models.phi3 import modeling_phi3

from .base import Architecture, check_which


class Phi3Architecture(Architecture):
    """Phi3's fused projection: queries are the first ``H_q * D`` outputs of ``qkv_proj``, keys the next
    ``H_kv * D``."""

    def projection_module(self, attn: nn.Module, which: str) -> nn.Module:
        """The fused ``qkv_proj`` (the same module for queries and keys)."""
        check_which(which)
        return attn.qkv_proj

    def split_projection(self, attn: nn.Module, output: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, S, H * D]``: the queries' or keys' columns of ``qkv_proj``'s output ``[B, S, (H_q + 2 H_kv) D]``."""
        check_which(which)
        n_q = self.num_heads(attn, "q") * self.head_dim(attn)
        n_k = self.num_heads(attn, "k") * self.head_dim(attn)
        return output[..., :n_q] if which == "q" else output[..., n_q:n_q + n_k]


ARCHITECTURE = Phi3Architecture(name="phi3", model_types=("phi3",), apply_rope=modeling_phi3.apply_rotary_pos_emb)
