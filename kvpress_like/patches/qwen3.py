"""Qwen3 (`model_type="qwen3"`): separate or fused q/k/v projections, RoPE from `modeling_qwen3`."""

from transformers.models.qwen3 import modeling_qwen3

from .base import Architecture

ARCHITECTURE = Architecture(name="qwen3", model_types=("qwen3",), apply_rope=modeling_qwen3.apply_rotary_pos_emb)
