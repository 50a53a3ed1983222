"""Positions and masks after pruning.

A press whose scores are the same for every layer and head evicts the same context tokens everywhere. Running the
FULL cache with a 2D attention mask that zeroes exactly those tokens and explicit ``position_ids`` is then the exact
reference for every later step: the compressed cache must give the same logits (fp32, 1e-5) through ``generate``,
a manual ``model(...)`` loop without ``position_ids``, a multi-token second forward, and ``generate`` continuing a
compressed cache.

Gemma3's layer 0 is sliding (window 8) and never compressed; both presses used here keep at least the last 8 context
tokens, so the reference mask never hides a token that the sliding layer could still see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import ARCHITECTURES, cached_tiny_model, full_attention_layers, left_pad, random_ids, torch_threads
from transformers import DynamicCache

from kvpress_like import CompressedLayer, KnormPress, LayerContext, Press, SnapKVPress, StreamingLLMPress, press
from kvpress_like.cache import CACHE_KWARG

N_CONTEXT = 32
N_STEPS = 6
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


@dataclass
class FixedTokenScorePress(Press):
    """Test scorer: one fixed random score per token position, identical for every layer, head and batch row."""

    name = "fixed_token_score_test"
    seed: int = 0

    def token_scores(self, s: int) -> torch.Tensor:
        return torch.rand(s, generator=torch.Generator().manual_seed(self.seed))

    def score(self, ctx: LayerContext) -> torch.Tensor:
        b, h, s, _ = ctx.keys.shape
        return self.token_scores(s).to(ctx.keys.device).expand(b, h, s)


def kept_mask_for(p: Press, n: int) -> torch.Tensor:
    """``[n]`` bool: tokens kept by ``p`` (same for every layer and head), computed naively here."""
    protected = set(range(min(p.n_sink, n))) | set(range(max(n - p.window, 0), n))
    budget = max(n - math.floor(p.ratio * n), len(protected))
    if isinstance(p, FixedTokenScorePress):
        scores = p.token_scores(n).tolist()
    elif isinstance(p, StreamingLLMPress):
        scores = list(range(n))
    else:
        raise TypeError(p)
    others = sorted((i for i in range(n) if i not in protected), key=lambda i: -scores[i])
    kept = protected | set(others[: budget - len(protected)])
    return torch.tensor([i in kept for i in range(n)])


PRESSES = {
    "fixed": lambda: FixedTokenScorePress(ratio=0.5, n_sink=2, window=8, seed=11),
    "streaming": lambda: StreamingLLMPress(ratio=0.5, n_sink=4),  # keeps 4 sinks + the 12 most recent
}


class Reference:
    """Full-cache run that hides the evicted context tokens with a 2D mask and passes explicit positions."""

    def __init__(self, model, ids: torch.Tensor, kept: torch.Tensor):
        self.model, self.kept = model, kept
        self.cache = DynamicCache(config=model.config)
        self.length = ids.shape[1]
        with torch.no_grad():
            self.prefill_logits = model(ids, **{CACHE_KWARG: self.cache}).logits  # the context sees itself unmasked

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = tokens.shape[1]
        seen_after_context = self.length - self.kept.shape[0]
        mask = torch.cat([self.kept.long(), torch.ones(seen_after_context + q, dtype=torch.long)])[None]
        positions = torch.arange(self.length, self.length + q)[None]
        with torch.no_grad():
            logits = self.model(tokens, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: self.cache}).logits
        self.length += q
        return logits

    def greedy(self, first_logits: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decoding from ``first_logits`` ``[V]``: the chosen tokens and the logits of each later step."""
        tokens, logits = [int(first_logits.argmax())], []
        for _ in range(steps):
            step = self.forward(torch.tensor([[tokens[-1]]]))[0, -1]
            logits.append(step)
            tokens.append(int(step.argmax()))
        return tokens, logits


def setup(arch, impl, press_name):
    model = cached_tiny_model(arch, impl)
    ids = random_ids(N_CONTEXT, seed=21)
    p = PRESSES[press_name]()
    kept = kept_mask_for(p, N_CONTEXT)
    assert 0 < int(kept.sum()) < N_CONTEXT
    return model, ids, p, kept


def check_cache_is_compressed(model, cache, kept):
    for idx in full_attention_layers(model.config):
        layer = cache.layers[idx]
        assert isinstance(layer, CompressedLayer)
        assert layer.compressed_length == int(kept.sum())


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str):
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max |logit difference| {diff:.2e} > {ATOL}"


@pytest.fixture(params=list(PRESSES))
def press_name(request):
    return request.param


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_manual_loop_without_position_ids(arch, impl, press_name):
    model, ids, p, kept = setup(arch, impl, press_name)
    ref = Reference(model, ids, kept)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        logits = model(ids, **{CACHE_KWARG: cache}).logits
        assert_logits_close(logits, ref.prefill_logits, "prefill")
        check_cache_is_compressed(model, cache, kept)
        expected_tokens, expected_logits = ref.greedy(ref.prefill_logits[0, -1], N_STEPS)
        token = int(logits[0, -1].argmax())
        for step in range(N_STEPS):
            assert token == expected_tokens[step]
            out = model(torch.tensor([[token]]), **{CACHE_KWARG: cache}).logits[0, -1]
            assert_logits_close(out, expected_logits[step], f"decode step {step}")
            token = int(out.argmax())
    assert cache.get_seq_length() == N_CONTEXT + N_STEPS


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_manual_loop_with_full_2d_mask(arch, impl, press_name):
    """Callers that pass the usual all-ones 2D mask over every token seen (logical length) get the same result."""
    model, ids, p, kept = setup(arch, impl, press_name)
    ref = Reference(model, ids, kept)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        logits = model(ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: cache}).logits
        expected_tokens, expected_logits = ref.greedy(ref.prefill_logits[0, -1], N_STEPS)
        token = int(logits[0, -1].argmax())
        for step in range(N_STEPS):
            mask = torch.ones(1, N_CONTEXT + step + 1, dtype=torch.long)
            out = model(torch.tensor([[token]]), attention_mask=mask, **{CACHE_KWARG: cache}).logits[0, -1]
            assert_logits_close(out, expected_logits[step], f"decode step {step}")
            token = int(out.argmax())
            assert token == expected_tokens[step + 1]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate(arch, impl, press_name):
    model, ids, p, kept = setup(arch, impl, press_name)
    ref = Reference(model, ids, kept)
    with torch.no_grad(), press(model, p):
        out = model.generate(
            ids, do_sample=False, max_new_tokens=N_STEPS + 1, output_logits=True, return_dict_in_generate=True
        )
    check_cache_is_compressed(model, out.past_key_values, kept)
    expected_tokens, expected_logits = ref.greedy(ref.prefill_logits[0, -1], N_STEPS)
    assert out.sequences[0, N_CONTEXT:].tolist() == expected_tokens
    assert_logits_close(out.logits[0][0], ref.prefill_logits[0, -1], "prefill")
    for step in range(N_STEPS):
        assert_logits_close(out.logits[step + 1][0], expected_logits[step], f"generate step {step}")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_token_question_then_decode(arch, impl, press_name):
    """Context compressed alone, then a 5-token question in one forward (never compressed), then decoding."""
    model, ids, p, kept = setup(arch, impl, press_name)
    question = random_ids(5, seed=22)
    ref = Reference(model, ids, kept)
    expected_question = ref.forward(question)
    expected_tokens, expected_logits = ref.greedy(expected_question[0, -1], N_STEPS)

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **{CACHE_KWARG: cache})
        logits = model(question, **{CACHE_KWARG: cache}).logits
        assert_logits_close(logits, expected_question, "question forward")
        for idx in full_attention_layers(model.config):
            layer = cache.layers[idx]
            assert layer.compressed_length == int(kept.sum())  # the question was appended, not compressed
            assert layer.keys.shape[2] == int(kept.sum()) + 5
        token = int(logits[0, -1].argmax())
        for step in range(N_STEPS):
            assert token == expected_tokens[step]
            out = model(torch.tensor([[token]]), **{CACHE_KWARG: cache}).logits[0, -1]
            assert_logits_close(out, expected_logits[step], f"decode step {step}")
            token = int(out.argmax())
    assert cache.get_seq_length() == N_CONTEXT + 5 + N_STEPS


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_generate_continues_a_compressed_cache(arch, impl, press_name):
    """Compress a context once, then ``generate`` a question on top of it (input_ids = context + question)."""
    model, ids, p, kept = setup(arch, impl, press_name)
    question = random_ids(5, seed=23)
    ref = Reference(model, ids, kept)
    expected_question = ref.forward(question)
    expected_tokens, expected_logits = ref.greedy(expected_question[0, -1], N_STEPS)

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model, p):
            model(ids, **{CACHE_KWARG: cache})
        out = model.generate(
            torch.cat([ids, question], dim=1),
            **{CACHE_KWARG: cache},
            do_sample=False,
            max_new_tokens=N_STEPS + 1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences[0, N_CONTEXT + 5 :].tolist() == expected_tokens
    assert_logits_close(out.logits[0][0], expected_question[0, -1], "question")
    for step in range(N_STEPS):
        assert_logits_close(out.logits[step + 1][0], expected_logits[step], f"generate step {step}")


# -- batches with left padding -----------------------------------------------------------------------------------------
BATCH_LENGTHS = (20, 13, 7)


def batch_prompts(seed: int = 31) -> list[torch.Tensor]:
    return [random_ids(n, seed=seed + i, distinct=True)[0] for i, n in enumerate(BATCH_LENGTHS)]


def padded_prefill(model, p, ids, mask) -> DynamicCache:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses for a left-padded batch
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if p is None:
            model(ids, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache})
        else:
            with press(model, p):
                model(ids, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache})
    return cache


def check_batch_matches_solo(model, make_press):
    prompts = batch_prompts()
    ids, mask = left_pad(prompts)
    length = ids.shape[1]
    with torch.no_grad():
        with press(model, make_press()):
            batch_out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
        solo_out = []
        for prompt in prompts:
            with press(model, make_press()):
                solo_out.append(model.generate(prompt[None], do_sample=False, max_new_tokens=8, pad_token_id=0))

    full = padded_prefill(model, None, ids, mask)
    cache = padded_prefill(model, make_press(), ids, mask)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        keep = n - math.floor(0.5 * n)
        solo_cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model, make_press()):
            model(prompt[None], **{CACHE_KWARG: solo_cache})
        for idx in full_attention_layers(model.config):
            layer = cache.layers[idx]
            assert isinstance(layer, CompressedLayer)
            valid = layer.valid[row]
            # padding is never kept: the row holds exactly its own budget of real entries ...
            assert int(valid.sum()) == keep
            kept_keys = layer.keys[row][:, valid]  # [H, keep, D]
            pad_keys = full.layers[idx].keys[row][:, : length - n]  # [H, n_pad, D]
            # ... and none of them is a padding token's key
            if pad_keys.shape[1]:
                distance = (kept_keys[:, :, None] - pad_keys[:, None]).abs().amax(-1)
                assert bool((distance > 1e-4).all()), "a padding key was kept"
            # the row keeps the same entries as the prompt compressed alone
            torch.testing.assert_close(kept_keys, solo_cache.layers[idx].keys[0], atol=1e-4, rtol=0)
        assert cache.layers[full_attention_layers(model.config)[0]].get_seq_length() == length

    for row, prompt in enumerate(prompts):
        assert batch_out[row, length:].tolist() == solo_out[row][0, len(prompt) :].tolist(), f"row {row} differs"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padded_batch_matches_solo_knorm(arch, impl):
    model = cached_tiny_model(arch, impl, perturb_norms=True)
    check_batch_matches_solo(model, lambda: KnormPress(ratio=0.5))


SNAPKV_MODEL = dict(initializer_range=0.2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_snapkv_solo_scores_are_well_separated(arch):
    """Precondition of the SnapKV batch test: the top-k boundary is far from float noise in every solo run."""
    model = cached_tiny_model(arch, "eager", **SNAPKV_MODEL)
    for prompt in batch_prompts():
        n = len(prompt)
        p = RecordingSnapKV(ratio=0.5, window=4)
        with torch.no_grad(), press(model, p):
            model(prompt[None], **{CACHE_KWARG: DynamicCache(config=model.config)})
        budget = n - math.floor(0.5 * n) - 4  # chosen among the n - 4 tokens outside the observation window
        for scores in p.records.values():
            candidates = scores[0, :, : n - 4].sort(dim=-1, descending=True).values
            if 0 < budget < n - 4:
                gap = (candidates[:, budget - 1] - candidates[:, budget]).min().item()
                assert gap > 1e-5, f"SnapKV scores nearly tie at the top-k boundary ({gap:.1e})"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padded_batch_matches_solo_snapkv(arch, impl):
    model = cached_tiny_model(arch, impl, **SNAPKV_MODEL)
    check_batch_matches_solo(model, lambda: SnapKVPress(ratio=0.5, window=4))


def test_snapkv_scores_of_padded_row_equal_solo_scores():
    model = cached_tiny_model("llama", "eager", **SNAPKV_MODEL)
    prompts = batch_prompts()
    ids, mask = left_pad(prompts)
    batch = RecordingSnapKV(ratio=0.5, window=4)
    padded_prefill(model, batch, ids, mask)
    solo = RecordingSnapKV(ratio=0.5, window=4)
    with torch.no_grad(), press(model, solo):
        model(prompts[1][None], **{CACHE_KWARG: DynamicCache(config=model.config)})
    n = len(prompts[1])
    for idx, scores in solo.records.items():
        torch.testing.assert_close(batch.records[idx][1, :, -n:], scores[0], atol=1e-5, rtol=0)


@dataclass
class RecordingSnapKV(SnapKVPress):
    """SnapKVPress that records its scores per layer."""

    records: dict = field(default_factory=dict, repr=False, compare=False)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = super().score(ctx)
        self.records[ctx.layer_idx] = scores.detach().clone()
        return scores
