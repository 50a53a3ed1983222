"""kvpress-like: KV-cache compression for Hugging Face transformers causal LMs.

    from kvpress_like import press, SnapKVPress, encode_prompt
    context_ids, question_ids = encode_prompt(tokenizer, context, question)   # chat-templated, split after the context
    with press(model, SnapKVPress(ratio=0.5)):
        model.generate(torch.cat([context_ids, question_ids], dim=-1), ...)
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.1.0"

# The public API is imported on first use (PEP 562), so that `import kvpress_like` and the `kvpress-like` command line
# start without importing torch and transformers; `from kvpress_like import X` works as before.
_PUBLIC = {
    ".allocators": ("Allocator", "DynamicAllocator", "HeadAdaptiveAllocator", "KVComposeAllocator",
                    "PerLayerAllocator", "PyramidAllocator", "UniformAllocator"),
    ".cache": ("CompressedLayer", "RaggedLayer", "cache_bytes"),
    ".calibration": ("CalibratedPress",),
    ".chunked": ("chunked_prefill",),
    ".compressors.chunkkv": ("ChunkKVPress",),
    ".compressors.compactor": ("CompactorPress",),
    ".compressors.cur": ("CURPress",),
    ".compressors.expected_attention": ("ExpectedAttentionPress",),
    ".compressors.knorm": ("KnormPress",),
    ".compressors.lagkv": ("LagKVPress",),
    ".compressors.leverage": ("LeverageScorePress",),
    ".compressors.non_causal_attention": ("NonCausalAttentionPress",),
    ".compressors.observed_attention": ("ObservedAttentionPress",),
    ".compressors.random": ("RandomPress",),
    ".compressors.razor_attention": ("RazorAttentionPress",),
    ".compressors.snapkv": ("SnapKVPress",),
    ".compressors.streaming_llm": ("StreamingLLMPress",),
    ".compressors.tova": ("TOVAPress",),
    ".context": ("press",),
    ".decoding": ("DecodingPress",),
    ".patches.base": ("Architecture",),
    ".pipeline": ("answer_on_cache", "encode_prompt", "encode_question"),
    ".press": ("LayerContext", "Press", "ScorerPress", "compression_info"),
    ".scorer": ("Scorer",),
    ".registry": ("allocator_from_dict", "create_press", "hookimpl", "list_allocators", "list_architectures",
                  "list_plugins", "list_presses", "press_from_dict", "register_plugin", "unregister_plugin"),
    ".saved_cache": ("load_cache", "save_cache"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}


def _load_public_api() -> None:
    """Import every public name (the first time one is used) and register the pipeline task."""
    for module, names in _PUBLIC.items():
        loaded = importlib.import_module(module, __name__)
        for name in names:
            globals()[name] = getattr(loaded, name)
    _register_pipeline()


def __getattr__(name: str):
    if name in _WHERE:
        _load_public_api()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


def _register_pipeline() -> None:
    """Register the ``kv-press-text-generation`` task (``kvpress_like.pipeline`` also does it when imported)."""
    module = sys.modules.get(__name__ + ".pipeline")
    if module is not None and not hasattr(module, "register"):
        return  # being imported right now (it imports transformers.pipelines first): it registers at its end
    importlib.import_module(".pipeline", __name__).register()


class _Package(types.ModuleType):
    """``kvpress_like.press`` is the ``press()`` function, not the ``kvpress_like.press`` submodule that the import
    system would otherwise bind to the same name when it is first imported (``sys.modules`` still holds it)."""

    def __setattr__(self, name, value):
        if name == "press" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterPipelineOnImport(importlib.abc.MetaPathFinder):
    """Registers the ``kv-press-text-generation`` pipeline task as soon as ``transformers.pipelines`` is imported, so
    that ``import kvpress_like`` then ``transformers.pipeline("kv-press-text-generation", ...)`` works without
    ``import kvpress_like`` importing transformers itself."""

    TARGET = "transformers.pipelines"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _uninstall_pipeline_hook()
            _register_pipeline()

        spec.loader.exec_module = exec_module
        return spec


def _uninstall_pipeline_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterPipelineOnImport)]


if _RegisterPipelineOnImport.TARGET in sys.modules:
    _register_pipeline()
elif not any(isinstance(f, _RegisterPipelineOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterPipelineOnImport())

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
    "LagKVPress",
    "LayerContext",
    "Press",
    "RandomPress",
    "RazorAttentionPress",
    "Scorer",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "UniformAllocator",
    "allocator_from_dict",
    "answer_on_cache",
    "cache_bytes",
    "chunked_prefill",
    "compression_info",
    "create_press",
    "encode_prompt",
    "encode_question",
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
