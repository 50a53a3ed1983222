"""Qwen3 (`model_type="qwen3"`): separate `q_proj`/`k_proj`/`v_proj`, a per-head `q_norm`/`k_norm` before RoPE,
RoPE from `modeling_qwen3`."""

from transformers.models.qwen3 import modeling_qwen3

from .base import Architecture

ARCHITECTURE = Architecture(name="qwen3", model_types=("qwen3",), apply_rope=modeling_qwen3.apply_rotary_pos_emb)
