"""The built-in plugin: registers every built-in press, allocator and architecture through the public hooks.

It is the reference example of a plugin: a third-party package does the same from its own module.
"""

from ..allocators.uniform import UniformAllocator
from ..compressors.knorm import KnormPress
from ..compressors.random import RandomPress
from ..compressors.snapkv import SnapKVPress
from ..compressors.streaming_llm import StreamingLLMPress
from ..patches import gemma3, llama, mistral, phi3, qwen2, qwen3
from ..registry import hookimpl

PRESSES = (RandomPress, KnormPress, StreamingLLMPress, SnapKVPress)
ALLOCATORS = (UniformAllocator,)
ARCHITECTURES = (llama, mistral, qwen2, qwen3, gemma3, phi3)


@hookimpl
def register_presses(register):
    for cls in PRESSES:
        register(cls.name, cls)


@hookimpl
def register_allocators(register):
    for cls in ALLOCATORS:
        register(cls.name, cls)


@hookimpl
def register_architectures(register):
    for module in ARCHITECTURES:
        register(module.ARCHITECTURE)
