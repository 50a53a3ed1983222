"""Budget allocators: one module per allocator, registered by the built-in plugin."""

from .adaptive import HeadAdaptiveAllocator
from .base import Allocator, keep_count
from .dynamic import DynamicAllocator
from .kvcompose import KVComposeAllocator
from .per_layer import PerLayerAllocator
from .pyramid import PyramidAllocator
from .uniform import UniformAllocator

__all__ = [
    "Allocator",
    "DynamicAllocator",
    "HeadAdaptiveAllocator",
    "KVComposeAllocator",
    "PerLayerAllocator",
    "PyramidAllocator",
    "UniformAllocator",
    "keep_count",
]
