"""Qwen2 (`model_type="qwen2"`): separate `q_proj`/`k_proj`/`v_proj`, RoPE from `modeling_qwen2`."""

from transformers.models.qwen2 import modeling_qwen2

from .base import Architecture

ARCHITECTURE = Architecture(name="qwen2", model_types=("qwen2",), apply_rope=modeling_qwen2.apply_rotary_pos_emb)
