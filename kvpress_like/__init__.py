"""kvpress-like: KV-cache compression for Hugging Face transformers causal LMs.

    from kvpress_like import press, SnapKVPress
    with press(model, SnapKVPress(ratio=0.5)):
        model.generate(...)
"""

from .allocators import (
    Allocator,
    DynamicAllocator,
    HeadAdaptiveAllocator,
    KVComposeAllocator,
    PerLayerAllocator,
    PyramidAllocator,
    UniformAllocator,
)
from .cache import CompressedLayer, RaggedLayer, cache_bytes
from .calibration import CalibratedPress
from .chunked import chunked_prefill
from .compressors.chunkkv import ChunkKVPress
from .compressors.compactor import CompactorPress
from .compressors.cur import CURPress
from .compressors.expected_attention import ExpectedAttentionPress
from .compressors.knorm import KnormPress
from .compressors.leverage import LeverageScorePress
from .compressors.non_causal_attention import NonCausalAttentionPress
from .compressors.observed_attention import ObservedAttentionPress
from .compressors.random import RandomPress
from .compressors.snapkv import SnapKVPress
from .compressors.streaming_llm import StreamingLLMPress
from .compressors.tova import TOVAPress
from .context import press
from .decoding import DecodingPress
from .patches.base import Architecture
from .press import LayerContext, Press
from .registry import (
    create_press,
    hookimpl,
    list_allocators,
    list_architectures,
    list_plugins,
    list_presses,
    press_from_dict,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

from .pipeline import register as _register_pipeline  # noqa: E402
from .saved_cache import load_cache, save_cache  # noqa: E402

_register_pipeline()

__all__ = [
    "Allocator",
    "Architecture",
    "CalibratedPress",
    "ChunkKVPress",
    "CompactorPress",
    "CURPress",
    "ExpectedAttentionPress",
    "LeverageScorePress",
    "NonCausalAttentionPress",
    "ObservedAttentionPress",
    "TOVAPress",
    "CompressedLayer",
    "DecodingPress",
    "DynamicAllocator",
    "HeadAdaptiveAllocator",
    "KVComposeAllocator",
    "PerLayerAllocator",
    "PyramidAllocator",
    "RaggedLayer",
    "KnormPress",
    "LayerContext",
    "Press",
    "RandomPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "UniformAllocator",
    "cache_bytes",
    "chunked_prefill",
    "create_press",
    "hookimpl",
    "list_allocators",
    "list_architectures",
    "list_plugins",
    "list_presses",
    "load_cache",
    "save_cache",
    "press",
    "press_from_dict",
    "register_plugin",
    "unregister_plugin",
]
