"""Llama (`model_type="llama"`): separate `q_proj`/`k_proj`/`v_proj`, RoPE from `modeling_llama`."""

from transformers.models.llama import modeling_llama

from .base import Architecture

ARCHITECTURE = Architecture(name="llama", model_types=("llama",), apply_rope=modeling_llama.apply_rotary_pos_emb)
