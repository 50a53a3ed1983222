"""Phi3 (`model_type="phi3"`): separate or fused q/k/v projections, RoPE from `modeling_phi3`."""

from transformers.models.phi3 import modeling_phi3

from .base import Architecture

ARCHITECTURE = Architecture(name="phi3", model_types=("phi3",), apply_rope=modeling_phi3.apply_rotary_pos_emb)
