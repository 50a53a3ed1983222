"""Compress once, ask many times, across processes: save a compressed context's cache and load it later.

The file (``torch.save`` format, loaded with ``weights_only=True``: no code runs on load) holds every cache layer
(dense compressed, ragged per-head, plain and sliding-window layers), the context's token ids, the press that
produced it and the identity of the model. Loading refuses a file made for another model, and a corrupt or
truncated file is rejected before anything is returned (a SHA-256 over the payload is checked).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .cache import CompressedLayer, RaggedLayer
from .press import Press

FORMAT = "kvpress-like-cache/1"
_IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                    "vocab_size", "head_dim")


_IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "_attn_implementation", "attn_implementation",
                        "_attn_implementation_autoset", "dtype", "torch_dtype", "transformers_version", "use_cache",
                        "output_attentions", "output_hidden_states", "return_dict", "architectures", "_commit_hash"}


def model_identity(model) -> dict:
    """Architecture fields of the config, a hash of the whole config (run-time options aside) and a fingerprint of
    the weights: the name, shape and first 256 values of every parameter (cheap even for large models)."""
    config = model.config.get_text_config(decoder=True)
    identity = {name: getattr(config, name, None) for name in _IDENTITY_FIELDS}
    settings = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    identity["config"] = json.loads(json.dumps(settings, sort_keys=True, default=str))
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        sample = parameter.detach().flatten()[:256].float().cpu()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    identity["weights_sha256"] = digest.hexdigest()
    return identity


def _layer_record(layer) -> dict:
    if isinstance(layer, RaggedLayer):
        return {"kind": "ragged", "flat_keys": layer.flat_keys, "flat_values": layer.flat_values,
                "lengths": layer.lengths, "tail_keys": layer.tail_keys, "tail_values": layer.tail_values,
                "tail_valid": layer.tail_valid, "logical_length": layer.logical_length}
    if isinstance(layer, CompressedLayer):
        return {"kind": "compressed", "keys": layer.keys, "values": layer.values, "valid": layer.valid,
                "logical_length": layer.logical_length, "compressed_length": layer.compressed_length}
    if isinstance(layer, DynamicSlidingWindowLayer):
        return {"kind": "sliding", "keys": layer.keys, "values": layer.values, "sliding_window": layer.sliding_window,
                "cumulative_length": layer.cumulative_length}
    if type(layer) is DynamicLayer:
        return {"kind": "dynamic", "keys": layer.keys, "values": layer.values}
    raise TypeError(f"cannot save a cache layer of type {type(layer).__name__}")


def _restore_layer(record: dict):
    kind = record["kind"]
    if kind == "ragged":
        b, h = record["lengths"].shape
        shape = (b, h, 0, record["flat_keys"].shape[-1])
        layer = RaggedLayer(record["flat_keys"], record["flat_values"], record["lengths"], 0, shape)
        layer.tail_keys, layer.tail_values = record["tail_keys"], record["tail_values"]
        layer.tail_valid, layer.logical_length = record["tail_valid"], record["logical_length"]
        return layer
    if kind == "compressed":
        layer = CompressedLayer(record["keys"], record["values"], record["valid"], record["logical_length"])
        layer.compressed_length = record["compressed_length"]
        return layer
    layer = DynamicSlidingWindowLayer(record["sliding_window"]) if kind == "sliding" else DynamicLayer()
    if record["keys"] is not None:
        layer.update(record["keys"], record["values"])
    if kind == "sliding":
        layer.cumulative_length = record["cumulative_length"]
    return layer


def _digest(payload: dict) -> str:
    """SHA-256 over the metadata (as JSON) and every tensor's bytes, in a fixed order."""
    digest = hashlib.sha256(json.dumps(payload["meta"], sort_keys=True).encode())
    for record in payload["layers"]:
        for key in sorted(record):
            value = record[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(str((value.dtype, tuple(value.shape))).encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    digest.update(payload["input_ids"].numpy().tobytes())
    return digest.hexdigest()


def save_cache(path: str | Path, cache, model, input_ids: torch.Tensor, press: Press | None = None) -> None:
    """Save a (compressed) cache with what is needed to use it later.

    Args:
        path: file to write.
        cache: the ``DynamicCache`` after prefilling the context.
        model: the model that produced it (its identity is recorded).
        input_ids: ``[B, S]`` the context's token ids (positions and generation need them).
        press: the press used, recorded with :meth:`Press.to_dict`.
    """
    if input_ids.shape[-1] != cache.get_seq_length():
        raise ValueError(f"input_ids has {input_ids.shape[-1]} tokens but the cache has seen {cache.get_seq_length()}")
    meta = {"format": FORMAT, "model": model_identity(model), "press": press.to_dict() if press else None,
            "logical_length": cache.get_seq_length()}
    # clone: a view (e.g. a sliding-window slice of the prefill) would otherwise save its whole storage
    records = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _layer_record(layer).items()}
               for layer in cache.layers]
    payload = {"meta": meta, "layers": records,
               "input_ids": input_ids.detach().cpu()}
    payload["sha256"] = _digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    Path(path).write_bytes(buffer.getvalue())


def load_cache(path: str | Path, model) -> tuple[DynamicCache, torch.Tensor, dict]:
    """Load a cache saved by :func:`save_cache` for ``model``.

    Returns:
        ``(cache, input_ids, meta)``; ``meta["press"]`` is the press description (``press_from_dict`` rebuilds it).
        Use the cache inside ``with press(model, p)`` (any press): ragged and padded layers need its masks.

    Raises:
        ValueError: the file is corrupt, truncated, not a saved cache, or was made for another model.
    """
    try:
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True, map_location="cpu")
        ok = isinstance(payload, dict) and payload.get("meta", {}).get("format") == FORMAT
        ok = ok and payload.get("sha256") == _digest(payload)
    except Exception as error:  # any failure to read or parse the file (torch/zip/pickle errors of many kinds)
        raise ValueError(f"{path}: not a readable kvpress-like cache file (corrupt or truncated): {error}") from error
    if not ok:
        raise ValueError(f"{path}: corrupt kvpress-like cache file (format or checksum mismatch)")
    saved, current = dict(payload["meta"]["model"]), model_identity(model)
    saved_config, current_config = saved.pop("config", {}), current.pop("config")
    differences = [k for k in saved if saved[k] != current.get(k)]
    differences += [f"config.{k}" for k in sorted(set(saved_config) | set(current_config))
                    if saved_config.get(k) != current_config.get(k) and k not in saved]
    saved.update({f"config.{k}": v for k, v in saved_config.items()})
    current.update({f"config.{k}": v for k, v in current_config.items()})
    if differences:
        theirs, ours = [saved.get(k) for k in differences], [current.get(k) for k in differences]
        raise ValueError(f"{path} was saved for another model: {', '.join(differences)} differ "
                         f"(saved {theirs}, this model {ours})")
    cache = DynamicCache(config=model.config)
    device = model.get_input_embeddings().weight.device
    layers = [_restore_layer(record) for record in payload["layers"]]
    cache.layers[: len(layers)] = layers
    for layer in layers:
        for name in ("keys", "values", "valid", "flat_keys", "flat_values", "lengths", "tail_keys", "tail_values",
                     "tail_valid"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                setattr(layer, name, value.to(device))
        if isinstance(layer, RaggedLayer):
            layer.keys, layer.values = layer.flat_keys, layer.flat_values
    return cache, payload["input_ids"].to(device), payload["meta"]
