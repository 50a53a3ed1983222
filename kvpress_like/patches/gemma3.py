"""Gemma3 text models (`model_type="gemma3_text"`, e.g. ``Gemma3ForCausalLM``).

q_norm/k_norm precede RoPE; sliding-window layers (``config.layer_types``) are never compressed, only the
global-attention layers are.
"""

from transformers.models.gemma3 import modeling_gemma3

from .base import Architecture

ARCHITECTURE = Architecture(
    name="gemma3", model_types=("gemma3_text",), apply_rope=modeling_gemma3.apply_rotary_pos_emb
)
