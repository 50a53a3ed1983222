"""Mistral (`model_type="mistral"`): separate `q_proj`/`k_proj`/`v_proj`, RoPE from `modeling_mistral`."""

from transformers.models.mistral import modeling_mistral

from .base import Architecture

ARCHITECTURE = Architecture(name="mistral", model_types=("mistral",), apply_rope=modeling_mistral.apply_rotary_pos_emb)
