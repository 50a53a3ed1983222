"""Compress once, ask many times, across processes: save a compressed context's cache and load it later.

The file (``torch.save`` format, loaded with ``weights_only=True``: no code runs on load) holds every cache layer
(dense compressed, sliding-window compressed, ragged per-head, plain and sliding-window layers), the context's
token ids, the press that produced it, what the prefill chose (:func:`~kvpress_like.press.compression_info`: the
ratio a calibrated press chose for this context) and the identity of the model. Loading refuses a file made for
another model, and a corrupt or truncated file is rejected before anything is returned (a SHA-256 over the payload
is checked), and so is a file whose tensors do not have the dtypes and shapes its metadata records, or that do not
fit the model and the context.
Saving writes a temporary file in the same directory and renames it over the target only once it is complete and
synced, so an interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .cache import RECORD_CLASSES
from .press import Press, compression_info

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


# transformers' own layers, saved as plain records (a compressed layer writes its own: ``to_record``)
_PLAIN_TENSORS = ("keys", "values")


def _layer_record(layer) -> dict:
    """The layer as a record: its own :meth:`~kvpress_like.cache.CompressedLayer.to_record`, or a plain record for
    transformers' ``DynamicLayer`` and ``DynamicSlidingWindowLayer``."""
    if hasattr(layer, "to_record"):
        return layer.to_record()
    if isinstance(layer, DynamicSlidingWindowLayer):
        return {"kind": "sliding", "keys": layer.keys, "values": layer.values, "sliding_window": layer.sliding_window,
                "cumulative_length": layer.cumulative_length}
    if type(layer) is DynamicLayer:
        return {"kind": "dynamic", "keys": layer.keys, "values": layer.values}
    raise TypeError(f"cannot save a cache layer of type {type(layer).__name__}")


def _restore_layer(record: dict, device):
    """The layer a record describes, its tensors on ``device``."""
    record = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in record.items()}
    kind = record["kind"]
    if kind in RECORD_CLASSES:
        return RECORD_CLASSES[kind].from_record(record)
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

    What :func:`~kvpress_like.press.compression_info` gives for ``cache`` (a dict of JSON values, or ``None``) is saved
    in the metadata and restored on the loaded cache; the press object recorded with it (``cache.compressed_by``) is
    not (the file holds the press's description, ``meta["press"]``, when ``press`` is given).

    Raises:
        ValueError: ``input_ids`` does not have the length the cache has seen.
        TypeError: the cache's compression record is not JSON-ready (string keys; strings, numbers, booleans,
            ``None``, lists and dicts only).
    """
    if input_ids.shape[-1] != cache.get_seq_length():
        raise ValueError(f"input_ids has {input_ids.shape[-1]} tokens but the cache has seen {cache.get_seq_length()}")
    info = compression_info(cache)
    if info is not None and not _json_ready(info):
        raise TypeError(f"cannot save the cache's compression_info {info!r}: it must hold JSON values only (string "
                        "keys; strings, numbers, booleans, None, lists and dicts)")
    # clone: a view (e.g. a sliding-window slice of the prefill) would otherwise save its whole storage
    records = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _layer_record(layer).items()}
               for layer in cache.layers]
    meta = {"format": FORMAT, "model": model_identity(model), "press": press.to_dict() if press else None,
            "compression_info": info, "logical_length": cache.get_seq_length(),
            "tensors": [_specs(record) for record in records]}
    payload = {"meta": meta, "layers": records,
               "input_ids": input_ids.detach().cpu()}
    payload["sha256"] = _digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _write_atomically(Path(path), buffer.getvalue())


def _json_ready(value) -> bool:
    """Whether ``value`` is made of JSON values only: ``None``, booleans, numbers, strings, and lists and dicts (string
    keys) of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_json_ready(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_ready(v) for k, v in value.items())
    return False


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then rename it over ``path`` (an interrupted
    write leaves ``path`` as it was)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _specs(record: dict) -> dict:
    """``{name: [dtype, shape]}`` of every tensor of a layer record."""
    return {k: [str(v.dtype), list(v.shape)] for k, v in record.items() if isinstance(v, torch.Tensor)}


def _check_tensors(path, payload: dict, model) -> None:
    """Every tensor has the dtype and shape the metadata records, and fits the model and the context.

    Raises:
        ValueError: naming the layer, the tensor, what it is and what is allowed.
    """
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids, meta, layers = payload["input_ids"], payload["meta"], payload["layers"]

    def require(ok, where: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{path}: invalid kvpress-like cache file: {where}: {what}")

    require(isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.ndim == 2
            and ids.shape[1] == meta.get("logical_length"), "input_ids",
            f"must be int64 [B, {meta.get('logical_length')}] (the context)")
    batch, length = ids.shape
    specs = meta.get("tensors")
    require(specs is not None, "metadata", "records no tensor dtypes and shapes (written by an older kvpress-like); "
            "save the cache again")
    require(isinstance(specs, list) and isinstance(layers, list) and len(specs) == len(layers) ==
            config.num_hidden_layers, "layers", f"{config.num_hidden_layers} layers with their tensor specs expected")
    kinds = {"dynamic": set(_PLAIN_TENSORS), "sliding": set(_PLAIN_TENSORS),
             **{kind: set(cls.RECORD_TENSORS) for kind, cls in RECORD_CLASSES.items()}}
    dtype = None
    for i, (record, spec) in enumerate(zip(layers, specs)):
        kind = record.get("kind") if isinstance(record, dict) else None
        where = f"layer {i} ({kind})"
        require(kind in kinds, f"layer {i}", f"kind {kind!r} is not one of {sorted(kinds)}")
        tensors = {k: v for k, v in record.items() if isinstance(v, torch.Tensor)}
        require(isinstance(spec, dict) and set(tensors) == set(spec), where,
                f"tensors {sorted(tensors)} do not match the metadata's {sorted(spec or [])}")
        require(set(tensors) == kinds[kind] or (kind in ("dynamic", "sliding") and not tensors), where,
                f"tensors {sorted(tensors)} expected {sorted(kinds[kind])}")
        for name, value in tensors.items():
            require([str(value.dtype), list(value.shape)] == spec[name], f"{where} {name}",
                    f"is {value.dtype} {list(value.shape)} but the metadata records {spec[name][0]} {spec[name][1]}")
        logical = record.get("cumulative_length" if kind == "sliding" else "logical_length", length)
        require(logical == length, where, f"has seen {logical!r} tokens, the context has {length}")
        if kind in RECORD_CLASSES:
            try:
                RECORD_CLASSES[kind].check_record(record, batch, heads, head_dim, length)
            except ValueError as error:
                require(False, where, str(error))
            keys = record[RECORD_CLASSES[kind].RECORD_TENSORS[0]]
        elif record["keys"] is not None:
            keys, values = record["keys"], record["values"]
            stored = keys.shape[2] if keys.ndim == 4 else -1
            require(keys.shape == values.shape and keys.dtype == values.dtype and keys.ndim == 4
                    and keys.shape[:2] == (batch, heads) and keys.shape[3] == head_dim and stored <= length,
                    f"{where} keys/values", f"must both be [{batch}, {heads}, P, {head_dim}] with P <= {length}")
            require(kind != "dynamic" or stored == length, f"{where} keys", f"must hold all {length} tokens")
        else:
            continue
        require(keys.is_floating_point() and dtype in (None, keys.dtype), f"{where} keys",
                f"is {keys.dtype}; every layer must hold the same floating-point dtype ({dtype or 'float'})")
        dtype = keys.dtype


def load_cache(path: str | Path, model) -> tuple[DynamicCache, torch.Tensor, dict]:
    """Load a cache saved by :func:`save_cache` for ``model``.

    Returns:
        ``(cache, input_ids, meta)``; ``meta["press"]`` is the press description (``press_from_dict`` rebuilds it).
        The loaded cache carries the compression record it had when saved: ``kvpress_like.compression_info(cache)``
        gives the same dict (``None`` when it had none; also ``meta["compression_info"]``). The press object recorded
        with it (``cache.compressed_by``) is not restored, so ``compression_info(cache, p)`` with a press gives
        ``None`` for a loaded cache.

    Raises:
        ValueError: the file is corrupt, truncated, not a saved cache, was made for another model, or holds tensors
            whose dtypes or shapes differ from its metadata or do not fit the model and the context.
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
    try:
        _check_tensors(path, payload, model)
    except (KeyError, TypeError, AttributeError, IndexError) as error:  # a field of the wrong type or missing
        raise ValueError(f"{path}: invalid kvpress-like cache file: malformed layer record ({error!r})") from error
    info = payload["meta"].get("compression_info")  # absent in files written before it was saved
    if info is not None and not (isinstance(info, dict) and _json_ready(info)):
        raise ValueError(f"{path}: invalid kvpress-like cache file: metadata compression_info must be a JSON object "
                         f"(a dict of JSON values) or null; got {type(info).__name__} {info!r}")
    cache = DynamicCache(config=model.config)
    device = model.get_input_embeddings().weight.device
    layers = [_restore_layer(record, device) for record in payload["layers"]]
    cache.layers[: len(layers)] = layers
    if info is not None:
        cache.compression_info = dict(info)  # what kvpress_like.compression_info(cache) reads
    return cache, payload["input_ids"].to(device), payload["meta"]
