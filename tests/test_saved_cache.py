"""save_cache / load_cache: compress once, answer later, in this process or in a fresh one.

Answers are greedy ids from ``answer_on_cache``; a loaded cache is used inside ``with press(model, p)`` where ``p`` is
rebuilt from the file (``press_from_dict(meta["press"])``), as the docstring of ``load_cache`` prescribes.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from tiny_models import cached_tiny_model, random_ids, tiny_model, torch_threads
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvpress_like import (
    CompactorPress,
    CompressedLayer,
    RaggedLayer,
    SnapKVPress,
    cache_bytes,
    compression_info,
    load_cache,
    press,
    press_from_dict,
    save_cache,
)
from kvpress_like.cache import CACHE_KWARG, tensor_bytes
from kvpress_like.pipeline import answer_on_cache

TESTS_DIR = Path(__file__).resolve().parent
MAX_NEW = 8
CONTEXT_IDS = random_ids(48, seed=1)
SUFFIX_IDS = random_ids(5, seed=2)
LLAMA = dict(arch="llama", initializer_range=0.2)
GEMMA3 = dict(arch="gemma3", initializer_range=0.05, perturb_norms=True)
CASES = {
    "dense": (LLAMA, lambda: SnapKVPress(ratio=0.5, window=4)),
    "ragged": (LLAMA, lambda: CompactorPress(ratio=0.5, allocator="head_adaptive")),
    "gemma3": (GEMMA3, lambda: SnapKVPress(ratio=0.5, window=4)),
    "uncompressed": (LLAMA, lambda: None),
}
EXPECTED_KINDS = {
    "dense": {CompressedLayer},
    "ragged": {RaggedLayer},  # at least one ragged layer (heads keep different numbers)
    "gemma3": {DynamicSlidingWindowLayer, CompressedLayer},
    "uncompressed": {DynamicLayer},
}
LAYER_FIELDS = ("keys", "values", "valid", "flat_keys", "flat_values", "lengths", "tail_keys", "tail_values",
                "tail_valid", "logical_length", "compressed_length", "cumulative_length", "sliding_window")


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


def maybe_press(model, p):
    return press(model, p) if p is not None else nullcontext()


def prefill(model, p, ids=CONTEXT_IDS) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with maybe_press(model, p), torch.no_grad():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
    return cache


def answer(model, p, cache, ids=CONTEXT_IDS) -> list[int]:
    with maybe_press(model, p):
        return answer_on_cache(model, cache, ids, SUFFIX_IDS, MAX_NEW).tolist()


def assert_same_cache(a: DynamicCache, b: DynamicCache) -> None:
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert type(la) is type(lb)
        assert la.get_seq_length() == lb.get_seq_length()
        for name in LAYER_FIELDS:
            va, vb = getattr(la, name, None), getattr(lb, name, None)
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb), name
            else:
                assert va == vb, name


def make_case(name: str):
    """``(model, press, cache after prefill)`` of one case."""
    spec, make_press = CASES[name]
    model = cached_tiny_model(**spec)
    p = make_press()
    return model, p, prefill(model, p)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case saved once: ``name -> (path, answer ids on the original cache)``."""
    directory = tmp_path_factory.mktemp("saved_caches")
    result = {}
    for name in CASES:
        model, p, cache = make_case(name)
        assert {type(layer) for layer in cache.layers} >= EXPECTED_KINDS[name]
        path = directory / f"{name}.kvc"
        save_cache(path, cache, model, CONTEXT_IDS, p)
        result[name] = (path, answer(model, p, cache))
    return result


# -- same process ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_save_load_answer_equals_original(name, saved, tmp_path):
    model, p, cache = make_case(name)
    path = tmp_path / "cache.kvc"
    save_cache(path, cache, model, CONTEXT_IDS, p)
    loaded, ids, meta = load_cache(path, model)
    assert_same_cache(loaded, cache)
    assert torch.equal(ids, CONTEXT_IDS)
    assert meta["logical_length"] == CONTEXT_IDS.shape[1]
    assert meta["press"] == (p.to_dict() if p is not None else None)
    restored = press_from_dict(meta["press"]) if meta["press"] is not None else None
    assert restored == p
    original = answer(model, p, cache)
    assert original == saved[name][1]
    assert answer(model, restored, loaded, ids) == original
    # answer_on_cache crops the loaded cache back to the context: a second answer is the same.
    assert_same_cache(loaded, load_cache(path, model)[0])
    assert answer(model, restored, loaded, ids) == original


def test_compressed_answers_differ_from_uncompressed(saved):
    """Sanity check: the compressed caches lead to other answers than the full one, so equal answers above are
    evidence that the compressed entries were restored (not, say, a re-prefill)."""
    full = saved["uncompressed"][1]
    assert saved["dense"][1] != full and saved["ragged"][1] != full


def test_save_after_answering_still_round_trips(tmp_path):
    """A cache that has already answered (cropped back; sliding layers in past-recording mode) saves and loads."""
    model, p, cache = make_case("gemma3")
    first = answer(model, p, cache)
    save_cache(tmp_path / "c.kvc", cache, model, CONTEXT_IDS, p)
    loaded, ids, meta = load_cache(tmp_path / "c.kvc", model)
    assert answer(model, press_from_dict(meta["press"]), loaded, ids) == first


# -- across processes -------------------------------------------------------------------------------------------------
SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from tiny_models import cached_tiny_model
    from kvpress_like import load_cache, press, press_from_dict
    from kvpress_like.pipeline import answer_on_cache

    jobs = json.loads(sys.argv[1])
    results = {}
    for job in jobs:
        if job["model_dir"]:
            model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
        else:
            model = cached_tiny_model(**job["spec"])
        cache, ids, meta = load_cache(job["cache"], model)
        suffix = torch.tensor(job["suffix"])
        p = press_from_dict(meta["press"]) if meta["press"] is not None else None
        if p is not None:
            with press(model, p):
                out = answer_on_cache(model, cache, ids, suffix, job["max_new"])
        else:
            out = answer_on_cache(model, cache, ids, suffix, job["max_new"])
        results[job["key"]] = out.tolist()
    print("RESULT " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def subprocess_answers(saved, tmp_path_factory):
    """Load every saved cache in one fresh Python process, with the model rebuilt from its seed and config and, again,
    loaded from a ``save_pretrained`` directory; returns ``key -> answer ids``."""
    directory = tmp_path_factory.mktemp("models")
    jobs = []
    for name, (path, _) in saved.items():
        spec, _ = CASES[name]
        model_dir = directory / name
        cached_tiny_model(**spec).save_pretrained(model_dir)
        for how, model_dir_arg in (("seed", None), ("pretrained", str(model_dir))):
            jobs.append({"key": f"{name}/{how}", "spec": spec, "model_dir": model_dir_arg, "cache": str(path),
                         "suffix": SUFFIX_IDS.tolist(), "max_new": MAX_NEW})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("how", ["seed", "pretrained"])
@pytest.mark.parametrize("name", list(CASES))
def test_answer_in_a_fresh_process_equals_original(name, how, saved, subprocess_answers):
    assert subprocess_answers[f"{name}/{how}"] == saved[name][1]


# -- another model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, differing",
    [
        (dict(LLAMA, seed=1), ["weights_sha256"]),
        (dict(LLAMA, initializer_range=0.02), ["weights_sha256"]),
        (dict(LLAMA, num_hidden_layers=4), ["num_hidden_layers"]),
        (dict(LLAMA, num_key_value_heads=4), ["num_key_value_heads"]),
        (dict(LLAMA, hidden_size=32, intermediate_size=64), ["hidden_size"]),
        (dict(LLAMA, vocab_size=256), ["vocab_size"]),
        (dict(LLAMA, arch="qwen2"), ["model_type"]),
        (GEMMA3, ["model_type"]),
    ],
    ids=["other_seed", "other_init", "more_layers", "more_kv_heads", "narrower", "bigger_vocab", "qwen2", "gemma3"],
)
def test_file_for_another_model_is_refused(spec, differing, saved):
    path, _ = saved["dense"]
    other = tiny_model(**spec)
    with pytest.raises(ValueError, match="saved for another model") as info:
        load_cache(path, other)
    message = str(info.value)
    for field in differing:
        assert field in message
    assert str(path) in message


def test_gemma3_file_is_refused_by_llama(saved):
    with pytest.raises(ValueError, match="model_type"):
        load_cache(saved["gemma3"][0], cached_tiny_model(**LLAMA))


def test_file_for_a_model_with_another_rope_base_is_refused(saved):
    other = tiny_model(**dict(LLAMA, rope_theta=500.0))
    assert other.config.rope_parameters["rope_theta"] == 500.0
    with pytest.raises(ValueError, match="rope"):
        load_cache(saved["dense"][0], other)


def test_file_for_a_model_with_other_attention_weights_is_refused(saved):
    other = tiny_model(**LLAMA)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="saved for another model"):
        load_cache(saved["dense"][0], other)


# -- corrupt files -----------------------------------------------------------------------------------------------------
def zip_members(data: bytes) -> dict[str, tuple[int, int]]:
    """``member name -> (start, end)`` byte range of each stored (uncompressed) member's data in a torch.save zip."""
    members = {}
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
        start = info.header_offset + 30 + name_length + extra_length
        members[info.filename.split("/", 1)[1]] = (start, start + info.compress_size)
    return members


def flipped(data: bytes, position: int) -> bytes:
    corrupt = bytearray(data)
    corrupt[position] ^= 0xFF
    return bytes(corrupt)


@pytest.mark.parametrize("name", ["dense", "ragged", "gemma3"])
def test_truncated_file_is_rejected(name, saved, tmp_path):
    path, _ = saved[name]
    data = path.read_bytes()
    model = cached_tiny_model(**CASES[name][0])
    # Cuts to 1-3 bytes are in test_any_malformed_file_raises_value_error (known bug).
    for cut in sorted({0, 4, 30, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22,
                       len(data) - 1}):
        bad = tmp_path / f"cut{cut}.kvc"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupt|truncated"):
            load_cache(bad, model)


def tensor_positions(data: bytes) -> dict[str, list[int]]:
    """For every saved tensor: file offsets of the first byte of its first and of its last element.

    ``torch.save`` writes whole storages, and a tensor may use only part of its storage (a sliding-window layer keeps a
    view of the prefill's keys; a mask may be a view of a wider one); bytes outside a view carry no data.
    """
    payload = torch.load(io.BytesIO(data), weights_only=True)
    members = [span for member, span in zip_members(data).items() if member.startswith("data/")]
    tensors = {f"layer{i}.{key}": value for i, record in enumerate(payload["layers"]) for key, value in record.items()
               if isinstance(value, torch.Tensor)}
    tensors["input_ids"] = payload["input_ids"]
    positions = {}
    for label, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        raw = bytes(tensor.untyped_storage())
        start = next(s for s, e in members if data[s:e] == raw)
        last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        positions[label] = [start + (tensor.storage_offset() + offset) * tensor.element_size() for offset in (0, last)]
    return positions


@pytest.mark.parametrize("name", ["dense", "ragged", "gemma3"])
def test_flipped_byte_in_any_tensor_is_rejected(name, saved, tmp_path):
    """One flipped byte in each saved tensor (keys, values, masks, ragged lengths, flat entries, input ids)."""
    path, _ = saved[name]
    data = path.read_bytes()
    model = cached_tiny_model(**CASES[name][0])
    positions = tensor_positions(data)
    assert len(positions) >= 7
    if name == "ragged":
        assert any(label.endswith(".lengths") for label in positions)
    for offsets in positions.values():
        for position in offsets:
            bad = tmp_path / "flipped.kvc"
            bad.write_bytes(flipped(data, position))
            with pytest.raises(ValueError, match="corrupt"):
                load_cache(bad, model)


@pytest.mark.parametrize("target", ["sha256 digest", "press name", "logical length"])
def test_flipped_byte_in_metadata_is_rejected(target, saved, tmp_path):
    path, _ = saved["ragged"]
    data = path.read_bytes()
    model = cached_tiny_model(**LLAMA)
    payload = torch.load(io.BytesIO(data), weights_only=True)
    start, end = zip_members(data)["data.pkl"]
    pickle_bytes = data[start:end]
    if target == "sha256 digest":
        position = start + pickle_bytes.index(payload["sha256"].encode()) + 10
    elif target == "press name":
        position = start + pickle_bytes.index(b"compactor")
    else:  # the int 48 pickled right after the key "logical_length"
        after_key = pickle_bytes.index(b"logical_length") + len("logical_length")
        position = start + pickle_bytes.index(bytes([CONTEXT_IDS.shape[1]]), after_key)
    bad = tmp_path / "flipped.kvc"
    bad.write_bytes(flipped(data, position))
    with pytest.raises(ValueError, match="corrupt"):
        load_cache(bad, model)


def test_any_malformed_file_raises_value_error(saved, tmp_path):
    """Every single-byte flip and every truncation either raises ValueError or, for a flip in bytes that carry no
    data (zip padding, unused storage bytes), loads exactly the saved cache."""
    path, _ = saved["dense"]
    data = path.read_bytes()
    model = cached_tiny_model(**LLAMA)
    original = load_cache(path, model)[0]
    wrong = {}
    variants = {f"cut {n}": data[:n] for n in (1, 2, 3)}
    variants.update({f"flip {i}": flipped(data, i) for i in sorted({0, 26, 28, *range(0, len(data), 97)})})
    for label, content in variants.items():
        bad = tmp_path / "bad.kvc"
        bad.write_bytes(content)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load_cache(bad, model)[0]
        except ValueError:
            continue
        except Exception as error:  # noqa: BLE001 - any other error type is the finding
            wrong[label] = type(error).__name__
            continue
        assert_same_cache(loaded, original)
    assert wrong == {}


@pytest.mark.parametrize(
    "name",
    ["dense", "ragged", "gemma3"],
)
def test_file_size_is_the_cache_size(name, tmp_path):
    """The file holds what the cache holds (plus the context ids and a few KiB of zip/pickle overhead)."""
    spec, make_press = CASES[name]
    model, p = cached_tiny_model(**spec), make_press()
    ids = random_ids(1000, seed=3)
    cache = prefill(model, p, ids)
    save_cache(tmp_path / "c.kvc", cache, model, ids, p)
    assert (tmp_path / "c.kvc").stat().st_size <= cache_bytes(cache) + ids.numel() * 8 + 16 * 1024


def test_file_holds_only_the_entries_after_decoding(tmp_path):
    """After decoding, a compressed layer's keys/values are views of storage with room reserved for more tokens; the
    file holds the entries, not the reserved room."""
    spec, make_press = CASES["dense"]
    model, p = cached_tiny_model(**spec), make_press()
    ids = random_ids(1000, seed=3)
    cache = prefill(model, p, ids)
    with torch.no_grad(), press(model, p):
        model(torch.tensor([[7]]), **{CACHE_KWARG: cache})
    layers = [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]
    reserved = sum(layer.nbytes() - sum(tensor_bytes(t) for t in (layer.keys, layer.values, layer.valid))
                   for layer in layers)
    assert reserved > 16 * 1024  # room for 64 more tokens per layer: more than the file's overhead allowed below
    save_cache(tmp_path / "c.kvc", cache, model, torch.cat([ids, torch.tensor([[7]])], dim=1), p)
    assert (tmp_path / "c.kvc").stat().st_size <= cache_bytes(cache) - reserved + (ids.numel() + 1) * 8 + 16 * 1024


def test_not_a_cache_file_is_rejected(tmp_path):
    model = cached_tiny_model(**LLAMA)
    torch.save({"meta": {"format": "something-else"}, "layers": []}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format or checksum"):
        load_cache(tmp_path / "other.pt", model)
    (tmp_path / "text.kvc").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt"):
        load_cache(tmp_path / "text.kvc", model)
    with pytest.raises(ValueError, match="not a readable"):
        load_cache(tmp_path / "missing.kvc", model)


# -- save refuses inconsistent input ids -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dense", "ragged", "gemma3"])
@pytest.mark.parametrize("delta", [-1, 1, -CONTEXT_IDS.shape[1] + 1])
def test_save_refuses_input_ids_of_another_length(name, delta, tmp_path):
    model, p, cache = make_case(name)
    n = CONTEXT_IDS.shape[1]
    wrong = random_ids(n + delta, seed=5)
    path = tmp_path / "c.kvc"
    with pytest.raises(ValueError, match=f"input_ids has {n + delta} tokens but the cache has seen {n}"):
        save_cache(path, cache, model, wrong, p)
    assert not path.exists()


# -- tensors altered with a recomputed checksum ------------------------------------------------------------------------
def _rewrite(payload: dict, path: Path) -> None:
    """Save ``payload`` with its checksum recomputed (a consistent but altered file)."""
    from kvpress_like.saved_cache import _digest

    payload["sha256"] = _digest(payload)
    torch.save(payload, path)


def _drop_head(t: torch.Tensor) -> torch.Tensor:
    return t[:, :1].clone()


ALTERATIONS = {
    # name -> (case, alteration of the payload, whether the metadata's tensor specs are updated too, expected message)
    "keys_dtype": ("dense", lambda r: r.update(keys=r["keys"].half()), False,
                   "float16 .*metadata records torch.float32"),
    "keys_shape": ("dense", lambda r: r.update(keys=_drop_head(r["keys"])), False, "metadata records"),
    "keys_values_heads": ("dense", lambda r: r.update(keys=_drop_head(r["keys"]), values=_drop_head(r["values"])),
                          True, r"keys/values: must both be \[1, 2, P, 16\]"),
    "valid_dtype": ("dense", lambda r: r.update(valid=r["valid"].long()), True, r"valid: must be bool \[1, "),
    "ragged_lengths": ("ragged", lambda r: r.update(lengths=r["lengths"] + 1), True, "flat_keys/flat_values"),
    "dynamic_tokens": ("uncompressed", lambda r: r.update(keys=r["keys"][:, :, 1:].clone(),
                                                          values=r["values"][:, :, 1:].clone()), True,
                       "must hold all 48 tokens"),
}


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_altered_tensors_with_a_recomputed_checksum_are_rejected(alteration, saved, tmp_path):
    """A file whose tensors were changed and whose checksum was recomputed fails at load with an error naming the
    layer and the tensor, never later in a forward."""
    from kvpress_like.saved_cache import _specs

    name, alter, update_specs, message = ALTERATIONS[alteration]
    path, _ = saved[name]
    model = cached_tiny_model(**CASES[name][0])
    payload = torch.load(path, weights_only=True)
    layer = next(i for i, record in enumerate(payload["layers"]) if record["kind"] in ("compressed", "ragged",
                                                                                         "dynamic"))
    alter(payload["layers"][layer])
    if update_specs:
        payload["meta"]["tensors"][layer] = _specs(payload["layers"][layer])
    bad = tmp_path / "altered.kvc"
    _rewrite(payload, bad)
    with pytest.raises(ValueError, match=f"invalid kvpress-like cache file: layer {layer} .*{message}"):
        load_cache(bad, model)


# -- an interrupted save leaves the previous file intact ---------------------------------------------------------------
def test_interrupted_saves_always_leave_the_previous_good_file(tmp_path):
    """200 save cycles (``KVPRESS_LIKE_SAVE_CYCLES`` sets another count); about half are cut at a random byte by the OS
    (RLIMIT_FSIZE: the write fails with EFBIG once the file reaches the limit). After every cycle the file loads and
    holds the last completely saved cache."""
    import os
    import random
    import resource
    import signal

    model = cached_tiny_model(**LLAMA)
    contexts = [random_ids(12 + 4 * i, seed=40 + i) for i in range(3)]
    caches = [prefill(model, SnapKVPress(ratio=0.5, window=2), ids) for ids in contexts]
    path = tmp_path / "c.kvc"
    save_cache(path, caches[0], model, contexts[0])
    good = 0
    rng = random.Random(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of killing the process
    interrupted = 0
    try:
        cycles = int(os.environ.get("KVPRESS_LIKE_SAVE_CYCLES", "200"))
        for _ in range(cycles):
            which = rng.randrange(len(caches))
            limit = rng.randrange(1, path.stat().st_size) if rng.random() < 0.5 else None
            try:
                if limit is not None:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
                try:
                    save_cache(path, caches[which], model, contexts[which])
                finally:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                good = which
            except OSError:
                interrupted += 1
            cache, ids, _ = load_cache(path, model)
            assert torch.equal(ids, contexts[good])
            assert_same_cache(cache, caches[good])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert 0.3 * cycles < interrupted < 0.7 * cycles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.kvc"]  # no temporary file left behind


# -- what the prefill chose (compression_info) survives save and load -------------------------------------------------
def _calibrated_press(model, tmp_path):
    """A calibrated Compactor whose parameters (written here for ``model``) choose a ratio that depends on the
    context."""
    from kvpress_like.calibration import FORMAT, model_fingerprint

    params = tmp_path / "params.json"
    params.write_text(json.dumps({"format": FORMAT, "model": {"weights_sha256": model_fingerprint(model)},
                                  "presses": {"compactor": {"alpha": -3.0, "beta": 12.0}}}), encoding="utf-8")
    return CompactorPress(ratio="auto", quality=0.8, params=str(params))


def test_compression_info_of_a_calibrated_press_survives_save_and_load(tmp_path):
    model = cached_tiny_model(**LLAMA)
    p = _calibrated_press(model, tmp_path)
    cache = prefill(model, p)
    info = compression_info(cache)
    assert set(info) == {"press", "ratio", "retention", "context_nll", "quality"}
    assert info["ratio"] > 0 and info["quality"] == 0.8  # a real choice was recorded
    path = tmp_path / "calibrated.kvc"
    save_cache(path, cache, model, CONTEXT_IDS, p)
    loaded, _, meta = load_cache(path, model)
    assert compression_info(loaded) == info
    assert meta["compression_info"] == info
    assert_same_cache(loaded, cache)
    assert compression_info(loaded, p) is None  # the press object (cache.compressed_by) is not restored: documented
    # the loaded record is the cache's own: changing the returned copy or the meta dict does not change it
    meta["compression_info"]["ratio"] = -1.0
    assert compression_info(loaded) == info


def test_a_cache_without_compression_info_loads_with_none(saved, tmp_path):
    path, _ = saved["dense"]  # a fixed-ratio press records nothing
    model = cached_tiny_model(**LLAMA)
    loaded, _, meta = load_cache(path, model)
    assert compression_info(loaded) is None and meta["compression_info"] is None
    payload = torch.load(path, weights_only=True)  # a file written before the record was saved: no key at all
    del payload["meta"]["compression_info"]
    _rewrite(payload, tmp_path / "older.kvc")
    assert compression_info(load_cache(tmp_path / "older.kvc", model)[0]) is None


@pytest.mark.parametrize("value", [["ratio", 0.5], "ratio=0.5", 0.5, {"ratio": (0.5,)}, {1: 0.5}])
def test_compression_info_of_the_wrong_type_is_a_clear_error(value, saved, tmp_path):
    path, _ = saved["dense"]
    model = cached_tiny_model(**LLAMA)
    payload = torch.load(path, weights_only=True)
    payload["meta"]["compression_info"] = value
    bad = tmp_path / "tampered.kvc"
    _rewrite(payload, bad)
    with pytest.raises(ValueError, match="invalid kvpress-like cache file: metadata compression_info must be a JSON "
                                         "object"):
        load_cache(bad, model)


def test_save_refuses_a_compression_record_that_is_not_json(tmp_path):
    model, p, cache = make_case("dense")
    cache.compression_info = {"ratio": torch.tensor(0.5)}
    path = tmp_path / "c.kvc"
    with pytest.raises(TypeError, match="compression_info .* must hold JSON values only"):
        save_cache(path, cache, model, CONTEXT_IDS, p)
    assert not path.exists()
