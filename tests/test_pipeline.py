"""The transformers pipeline task ``kv-press-text-generation``, checked against hand-written references.

The reference of every answer is built here without the pipeline: ``encode_prompt`` -> prefill the context ids into a
``DynamicCache`` inside ``with press(model, p)`` -> ``model.generate(cat(context, suffix), **{CACHE_KWARG: cache})``
(greedy). A second, fully manual greedy loop (``model(...)`` + argmax, no ``generate``) backs it up.

Models: a tiny random Llama with ``initializer_range=0.2`` (its greedy answers depend on the question and on the press,
so equalities below are not vacuous) and a tiny Gemma3 (layer 0 sliding-window, never compressed).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import pytest
import torch
import transformers
from tiny_models import attention_hooks, cached_tiny_model, torch_threads
from tiny_tokenizer import CONTEXT, QUESTIONS, make_tokenizer
from transformers import DynamicCache
from transformers.pipelines import PIPELINE_REGISTRY

import kvpress_like
from kvpress_like import CompactorPress, DecodingPress, KnormPress, SnapKVPress, cache_bytes, press
from kvpress_like.cache import CACHE_KWARG, CompressedLayer, RaggedLayer, cache_in
from kvpress_like.pipeline import TASK, KVPressTextGenerationPipeline, encode_prompt, kept_fraction, split_prompt

MAX_NEW = 6
MODELS = {
    "llama": dict(arch="llama", initializer_range=0.2),
    "gemma3": dict(arch="gemma3", initializer_range=0.05, perturb_norms=True),
}
PRESSES = {
    "none": lambda: None,
    "snapkv": lambda: SnapKVPress(ratio=0.5),
    "compactor_head_adaptive": lambda: CompactorPress(ratio=0.5, allocator="head_adaptive"),
}


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


@functools.cache
def tokenizer(chat_template: bool = True):
    return make_tokenizer(chat_template=chat_template)


def model_of(name: str):
    return cached_tiny_model(**MODELS[name])


@functools.cache
def pipe_of(model_name: str, chat_template: bool = True):
    return transformers.pipeline(TASK, model=model_of(model_name), tokenizer=tokenizer(chat_template))


def maybe_press(model, p):
    return press(model, p) if p is not None else nullcontext()


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


# -- references -------------------------------------------------------------------------------------------------------
def prompt_parts(tok, question: str, compress_questions: bool = False, answer_prefix: str = ""):
    """``(prefill_ids, suffix_ids)``: what is compressed and what is fed after it."""
    context_ids, suffix_ids = encode_prompt(tok, CONTEXT, question, answer_prefix)
    if compress_questions:
        return torch.cat([context_ids, suffix_ids[:, :-1]], dim=1), suffix_ids[:, -1:]
    return context_ids, suffix_ids


def prefill(model, p, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with maybe_press(model, p), torch.no_grad():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
    return cache


def reference_generate(model, tok, question, make_press, compress_questions=False, answer_prefix=""):
    """Greedy answer ids ``[n]`` via ``model.generate`` on a cache prefilled (and compressed) by hand."""
    prefill_ids, suffix_ids = prompt_parts(tok, question, compress_questions, answer_prefix)
    p = make_press()
    cache = prefill(model, p, prefill_ids)
    prompt = torch.cat([prefill_ids, suffix_ids], dim=1)
    with maybe_press(model, p), torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **{CACHE_KWARG: cache},
                             max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, prompt.shape[1]:]


def reference_manual(model, tok, question, make_press):
    """Greedy answer ids with a plain ``model(...)`` + argmax loop (no ``generate``, no explicit positions)."""
    prefill_ids, suffix_ids = prompt_parts(tok, question)
    p = make_press()
    cache = prefill(model, p, prefill_ids)
    generated, step_input, stop = [], suffix_ids, eos_ids(model)
    with maybe_press(model, p), torch.no_grad():
        for _ in range(MAX_NEW):
            logits = model(input_ids=step_input, **{CACHE_KWARG: cache}, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if token in stop:
                break
            step_input = torch.tensor([[token]])
    return torch.tensor(generated)


def pipeline_ids(pipe, **kwargs) -> list[torch.Tensor]:
    """The answer ids of the pipeline (before decoding to text): preprocess -> forward, as ``__call__`` does."""
    pre, fwd, _ = pipe._sanitize_parameters(**kwargs)
    return pipe.forward(pipe.preprocess(CONTEXT, **pre), **fwd)["answers"]


def text(tok, ids: torch.Tensor) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


class ForwardRecorder:
    """Records, for every forward of the whole model: input length, cache logical length and per-layer physical sizes,
    seen *before* the forward runs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_in(kwargs)
        physical = [layer.physical_length if hasattr(layer, "physical_length") else layer.keys.shape[2]
                    for layer in cache.layers] if cache is not None and cache.get_seq_length() else None
        keys = [layer.keys.clone() for layer in cache.layers] if physical is not None else None
        self.calls.append({"length": ids.shape[1], "seen": cache.get_seq_length() if cache is not None else None,
                           "physical": physical, "keys": keys})

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- registration -----------------------------------------------------------------------------------------------------
def test_task_is_registered_on_import():
    assert kvpress_like.pipeline.TASK == TASK == "kv-press-text-generation"
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    pipe = transformers.pipeline("kv-press-text-generation", model=model_of("llama"), tokenizer=tokenizer())
    assert isinstance(pipe, KVPressTextGenerationPipeline)
    assert pipe.model is model_of("llama") and pipe.tokenizer is tokenizer()


# -- answers equal the hand-written references -------------------------------------------------------------------------
@pytest.mark.parametrize("chat_template", [True, False], ids=["chat_template", "no_chat_template"])
@pytest.mark.parametrize("press_name", list(PRESSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_answer_equals_manual_generate(model_name, press_name, chat_template):
    model, tok = model_of(model_name), tokenizer(chat_template)
    pipe = pipe_of(model_name, chat_template)
    make_press = PRESSES[press_name]
    question = QUESTIONS[0]
    expected = reference_generate(model, tok, question, make_press)
    assert len(expected) >= 1
    [ids] = pipeline_ids(pipe, question=question, press=make_press(), max_new_tokens=MAX_NEW)
    assert ids.tolist() == expected.tolist()
    out = pipe(CONTEXT, question=question, press=make_press(), max_new_tokens=MAX_NEW)
    assert set(out) == {"answer"}
    assert out["answer"] == text(tok, expected)
    assert attention_hooks(model) == []  # the press is removed after the call


@pytest.mark.parametrize("press_name", list(PRESSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_generate_reference_equals_manual_greedy_loop(model_name, press_name):
    """The reference itself is right: ``generate`` on the compressed cache == a manual argmax loop."""
    model, tok = model_of(model_name), tokenizer()
    for question in QUESTIONS[:2]:
        expected = reference_generate(model, tok, question, PRESSES[press_name])
        assert reference_manual(model, tok, question, PRESSES[press_name]).tolist() == expected.tolist()


def test_compression_changes_the_answers():
    """Sanity check of the test set-up: with this tiny Llama the presses change at least one answer, so the equalities
    above are not satisfied by a pipeline that ignores the press."""
    model, tok = model_of("llama"), tokenizer()
    full = [reference_generate(model, tok, q, PRESSES["none"]).tolist() for q in QUESTIONS]
    assert len({tuple(a) for a in full}) > 1  # answers depend on the question
    for name in ("snapkv", "compactor_head_adaptive"):
        compressed = [reference_generate(model, tok, q, PRESSES[name]).tolist() for q in QUESTIONS]
        assert compressed != full, name


@pytest.mark.parametrize("press_name", list(PRESSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_several_questions_equal_separate_calls(model_name, press_name):
    pipe, tok = pipe_of(model_name), tokenizer()
    make_press = PRESSES[press_name]
    together = pipe(CONTEXT, questions=QUESTIONS, press=make_press(), max_new_tokens=MAX_NEW)
    assert set(together) == {"answers"}
    separate = [pipe(CONTEXT, question=q, press=make_press(), max_new_tokens=MAX_NEW)["answer"] for q in QUESTIONS]
    assert together["answers"] == separate
    ids = pipeline_ids(pipe, questions=QUESTIONS, press=make_press(), max_new_tokens=MAX_NEW)
    expected = [reference_generate(model_of(model_name), tok, q, make_press).tolist() for q in QUESTIONS]
    assert [a.tolist() for a in ids] == expected


@pytest.mark.parametrize("press_name", ["snapkv", "compactor_head_adaptive"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_one_prefill_for_several_questions_and_cache_restored(model_name, press_name):
    model, tok, pipe = model_of(model_name), tokenizer(), pipe_of(model_name)
    context_ids, _ = encode_prompt(tok, CONTEXT, QUESTIONS[0])
    n = context_ids.shape[1]
    suffix_lengths = [encode_prompt(tok, CONTEXT, q)[1].shape[1] for q in QUESTIONS]
    assert n not in suffix_lengths
    with ForwardRecorder(model) as recorder:
        pipe(CONTEXT, questions=QUESTIONS, press=PRESSES[press_name](), max_new_tokens=MAX_NEW)
    calls = recorder.calls
    assert [c["length"] for c in calls].count(n) == 1  # a single prefill of the context
    assert calls[0]["length"] == n and calls[0]["seen"] == 0
    # Each question starts with a forward of its suffix on a cache in the compressed-context state.
    starts = [c for c in calls if c["seen"] == n]
    assert [c["length"] for c in starts] == suffix_lengths
    reference = prefill(model, PRESSES[press_name](), context_ids)
    assert any(isinstance(layer, (CompressedLayer, RaggedLayer)) for layer in reference.layers)
    for start in starts:
        assert start["physical"] == starts[0]["physical"]
        for keys, first in zip(start["keys"], starts[0]["keys"]):
            assert torch.equal(keys, first)
    # ... and that state is the compressed context (smaller than the full context on compressed layers).
    for layer, physical in zip(reference.layers, starts[0]["physical"]):
        if isinstance(layer, (CompressedLayer, RaggedLayer)):
            assert physical == layer.physical_length < n
    assert attention_hooks(model) == []


# -- compress_questions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
def test_compress_questions_compresses_the_question_too(model_name):
    model, tok, pipe = model_of(model_name), tokenizer(), pipe_of(model_name)
    make_press = PRESSES["snapkv"]
    context_ids, _ = encode_prompt(tok, CONTEXT, QUESTIONS[0])
    prefill_lengths = [prompt_parts(tok, q, compress_questions=True)[0].shape[1] for q in QUESTIONS]
    assert all(length > context_ids.shape[1] for length in prefill_lengths)
    with ForwardRecorder(model) as recorder:
        out = pipe(CONTEXT, questions=QUESTIONS, press=make_press(), max_new_tokens=MAX_NEW, compress_questions=True,
                   return_cache_stats=True)
    # One prefill per question, each holding the context and the question (all but the last prompt token) ...
    calls = recorder.calls
    prefills = [i for i, c in enumerate(calls) if c["seen"] == 0]
    assert [calls[i]["length"] for i in prefills] == prefill_lengths
    # ... and then only the last prompt token is fed on the compressed cache.
    assert [(calls[i + 1]["length"], calls[i + 1]["seen"]) for i in prefills] == [(1, n) for n in prefill_lengths]
    stats = out["cache_stats"]
    assert stats["context_tokens"] == prefill_lengths[0]
    first = prefill(model, make_press(), prompt_parts(tok, QUESTIONS[0], compress_questions=True)[0])
    assert stats["kept_fraction"] == pytest.approx(kept_fraction(first))
    assert stats["bytes_after"] == cache_bytes(first)
    expected = [reference_generate(model, tok, q, make_press, compress_questions=True) for q in QUESTIONS]
    assert out["answers"] == [text(tok, ids) for ids in expected]
    ids = pipeline_ids(pipe, questions=QUESTIONS, press=make_press(), max_new_tokens=MAX_NEW, compress_questions=True)
    assert [a.tolist() for a in ids] == [e.tolist() for e in expected]


def test_compress_questions_is_query_aware():
    """With the question compressed, SnapKV's observation window is the question: the kept entries differ from the
    query-agnostic compression of the context alone."""
    model, tok = model_of("llama"), tokenizer()
    context_ids, _ = prompt_parts(tok, QUESTIONS[0])
    with_question, _ = prompt_parts(tok, QUESTIONS[0], compress_questions=True)
    agnostic = prefill(model, SnapKVPress(ratio=0.5, window=4), context_ids)
    aware = prefill(model, SnapKVPress(ratio=0.5, window=4), with_question)
    full = prefill(model, None, with_question)
    layer = 1
    n = context_ids.shape[1]

    def kept_positions(compressed):
        keys, full_keys = compressed.layers[layer].keys[0, 0], full.layers[layer].keys[0, 0]
        return {int((full_keys - k).abs().sum(-1).argmin()) for k in keys}

    assert kept_positions(agnostic) != {p for p in kept_positions(aware) if p < n}


# -- cache statistics -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("press_name", list(PRESSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_cache_stats(model_name, press_name):
    model, tok, pipe = model_of(model_name), tokenizer(), pipe_of(model_name)
    p = PRESSES[press_name]()
    out = pipe(CONTEXT, question=QUESTIONS[0], press=p, max_new_tokens=2, return_cache_stats=True)
    stats = out["cache_stats"]
    assert set(out) == {"answer", "cache_stats"}
    assert set(stats) >= {"bytes_before", "bytes_after", "kept_fraction", "context_tokens"}
    context_ids, _ = encode_prompt(tok, CONTEXT, QUESTIONS[0])
    n = context_ids.shape[1]
    assert stats["context_tokens"] == n
    assert stats["bytes_before"] == cache_bytes(prefill(model, None, context_ids))  # measured independently
    assert stats["bytes_after"] == cache_bytes(prefill(model, PRESSES[press_name](), context_ids))
    if p is None:
        assert stats["bytes_before"] == stats["bytes_after"]
        assert stats["kept_fraction"] == 1.0
    else:
        assert stats["bytes_before"] > stats["bytes_after"] > 0
        # Uniform per-layer budget n - floor(ratio * n); the head-adaptive allocator keeps the same layer total.
        assert stats["kept_fraction"] == pytest.approx((n - int(p.ratio * n)) / n)
        assert stats["kept_fraction"] == pytest.approx(1 - p.ratio, abs=1 / n)


# -- tokenizer without chat template, answer prefix --------------------------------------------------------------------
def test_prompt_split_without_and_with_chat_template():
    prefix, suffix, templated = split_prompt(tokenizer(False), CONTEXT, QUESTIONS[0])
    assert (prefix, templated) == (CONTEXT, False)
    assert suffix == f"\n\nQuestion: {QUESTIONS[0]}\nAnswer:"
    prefix, suffix, templated = split_prompt(tokenizer(True), CONTEXT, QUESTIONS[0])
    assert templated and prefix.startswith("<|im_start|>user") and prefix.endswith(CONTEXT)
    assert suffix.endswith("<|im_start|>assistant\n")
    for chat in (True, False):
        context_ids, suffix_ids = encode_prompt(tokenizer(chat), CONTEXT, QUESTIONS[0])
        whole = "".join(split_prompt(tokenizer(chat), CONTEXT, QUESTIONS[0])[:2])
        assert torch.cat([context_ids, suffix_ids], 1)[0].tolist() == tokenizer(chat)(whole)["input_ids"]


def test_answer_prefix_is_fed_to_the_model():
    model, tok, pipe = model_of("llama"), tokenizer(), pipe_of("llama")
    expected = reference_generate(model, tok, QUESTIONS[0], PRESSES["snapkv"], answer_prefix="the lighthouse was")
    out = pipe(CONTEXT, question=QUESTIONS[0], press=PRESSES["snapkv"](), answer_prefix="the lighthouse was",
               max_new_tokens=MAX_NEW)
    assert out["answer"] == text(tok, expected)
    assert expected.tolist() != reference_generate(model, tok, QUESTIONS[0], PRESSES["snapkv"]).tolist()


# -- bad inputs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(question="a ?", questions=["b ?"]), ValueError, "not both"),
        (dict(question=""), ValueError, "non-empty"),
        (dict(questions=[]), ValueError, "non-empty"),
        (dict(questions=["a ?", ""]), ValueError, "non-empty"),
        (dict(questions="a ?"), ValueError, "list"),
        (dict(), ValueError, "needs question="),
        (dict(question="a ?", press="snapkv"), TypeError, "press must be a kvpress_like Press"),
        (dict(question="a ?", press=KnormPress), TypeError, "press must be a kvpress_like Press"),
        (dict(question="a ?", max_new_tokens=0), ValueError, "max_new_tokens must be a positive int"),
        (dict(question="a ?", max_new_tokens=-3), ValueError, "max_new_tokens must be a positive int"),
        (dict(question="a ?", max_new_tokens=2.5), ValueError, "max_new_tokens must be a positive int"),
        (dict(question="a ?", no_such_option=1), TypeError, "no_such_option"),
    ],
    ids=["question_and_questions", "empty_question", "empty_questions", "one_empty_question", "questions_str",
         "no_question", "press_name", "press_class", "max_new_tokens_0", "max_new_tokens_negative",
         "max_new_tokens_float", "unknown_option"],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    model = model_of("llama")
    with ForwardRecorder(model) as recorder, pytest.raises(error, match=match):
        pipe_of("llama")(CONTEXT, **kwargs)
    assert recorder.calls == []  # rejected before any computation
    assert attention_hooks(model) == []


def test_empty_context_is_rejected():
    with pytest.raises(ValueError, match="context must be a non-empty string"):
        pipe_of("llama")("", question="a ?")


# -- known bug ------------------------------------------------------------------------------------------------------
def test_pipeline_with_a_decoding_press_answers_one_question():
    model, tok, pipe = model_of("llama"), tokenizer(), pipe_of("llama")
    make_press = lambda: DecodingPress(scorer=KnormPress(), target=32, interval=4)  # noqa: E731
    expected = reference_generate(model, tok, QUESTIONS[0], make_press)
    out = pipe(CONTEXT, question=QUESTIONS[0], press=make_press(), max_new_tokens=MAX_NEW)
    assert out["answer"] == text(tok, expected)


def test_calibrated_press_in_the_pipeline_reports_its_chosen_ratio(tmp_path):
    import json

    from kvpress_like.calibration import FORMAT, model_fingerprint

    model, tok, pipe = model_of("llama"), tokenizer(), pipe_of("llama")
    params = tmp_path / "cal.json"
    params.write_text(json.dumps({"format": FORMAT, "model": {"weights_sha256": model_fingerprint(model)},
                                  "presses": {"compactor": {"alpha": -0.5, "beta": 0.5}}}))
    p = CompactorPress(ratio="auto", quality=0.8, params=str(params))
    out = pipe(CONTEXT, question=QUESTIONS[0], press=p, max_new_tokens=2, return_cache_stats=True)
    stats = out["cache_stats"]
    context_ids = encode_prompt(tok, CONTEXT, QUESTIONS[0])[0]
    chosen = kvpress_like.compression_info(prefill(model, p, context_ids))  # the same context prefilled directly
    assert 0 < stats["ratio"] == chosen["ratio"] < 1
    fixed = prefill(model, CompactorPress(ratio=chosen["ratio"]), context_ids)
    assert stats["kept_fraction"] == pytest.approx(kept_fraction(fixed))
    assert pipe(CONTEXT, question=QUESTIONS[0], press=KnormPress(ratio=0.25), max_new_tokens=1,
                return_cache_stats=True)["cache_stats"]["ratio"] == 0.25


def test_press_none_inside_an_installed_press_reports_the_installed_press():
    """``press=None`` while ``with press(model, p)`` is active: ``p`` compresses, and the stats say so (they used to
    report ratio 0.0 next to a kept fraction of 0.5)."""
    model, pipe = model_of("llama"), pipe_of("llama")
    p = KnormPress(ratio=0.5)
    expected = pipe(CONTEXT, question=QUESTIONS[0], press=p, max_new_tokens=2, return_cache_stats=True)
    with press(model, p):
        inside = pipe(CONTEXT, question=QUESTIONS[0], press=None, max_new_tokens=2, return_cache_stats=True)
    assert inside == expected
    assert inside["cache_stats"]["ratio"] == 0.5
    assert inside["cache_stats"]["kept_fraction"] < 1
    plain = pipe(CONTEXT, question=QUESTIONS[0], press=None, max_new_tokens=2, return_cache_stats=True)
    assert plain["cache_stats"]["ratio"] == 0.0 and plain["cache_stats"]["kept_fraction"] == 1.0
