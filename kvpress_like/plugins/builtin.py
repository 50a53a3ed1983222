"""The built-in plugin: registers every built-in press, allocator and architecture through the public hooks.

It is the reference example of a plugin: a third-party package does the same from its own module.
"""

from ..allocators.adaptive import HeadAdaptiveAllocator
from ..allocators.dynamic import DynamicAllocator
from ..allocators.kvcompose import KVComposeAllocator
from ..allocators.per_layer import PerLayerAllocator
from ..allocators.pyramid import PyramidAllocator
from ..allocators.uniform import UniformAllocator
from ..calibration import CalibratedPress
from ..compressors.chunkkv import ChunkKVPress
from ..compressors.compactor import CompactorPress
from ..compressors.cur import CURPress
from ..compressors.expected_attention import ExpectedAttentionPress
from ..compressors.fastkv import FastKVPress
from ..compressors.knorm import KnormPress
from ..compressors.kvzip import KVzipPress
from ..compressors.lagkv import LagKVPress
from ..compressors.leverage import LeverageScorePress
from ..compressors.non_causal_attention import NonCausalAttentionPress
from ..compressors.observed_attention import ObservedAttentionPress
from ..compressors.random import RandomPress
from ..compressors.razor_attention import RazorAttentionPress
from ..compressors.snapkv import SnapKVPress
from ..compressors.streaming_llm import StreamingLLMPress
from ..compressors.tova import TOVAPress
from ..decoding import DecodingPress
from ..patches import gemma3, llama, mistral, phi3, qwen2, qwen3
from ..registry import hookimpl

PRESSES = (
    RandomPress, KnormPress, StreamingLLMPress, SnapKVPress, CompactorPress, LeverageScorePress,
    NonCausalAttentionPress, CURPress, ChunkKVPress, ObservedAttentionPress, TOVAPress, ExpectedAttentionPress,
    DecodingPress, CalibratedPress, LagKVPress, RazorAttentionPress, KVzipPress, FastKVPress,
)
ALLOCATORS = (
    UniformAllocator, PyramidAllocator, HeadAdaptiveAllocator, KVComposeAllocator, DynamicAllocator, PerLayerAllocator,
)
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
