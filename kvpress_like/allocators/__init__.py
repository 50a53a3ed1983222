"""Budget allocators: one module per allocator, registered by the built-in plugin."""

from .base import Allocator, keep_count
from .uniform import UniformAllocator

__all__ = ["Allocator", "UniformAllocator", "keep_count"]
