"""The vLLM integration (kvpress_like.integrations.vllm).

The first tests need no vLLM (configuration, kept counts, import hygiene). The others run only where vLLM is
installed (its own venv: benchmarks/vllm/setup_venv.sh, then
``/work/vllm-venv/bin/python -m pytest tests/test_vllm.py``) and are skipped elsewhere. They serve a tiny random
Llama (head dim 64, the CPU attention kernel's smallest common size) from a temporary directory with one in-process
engine, and compare vLLM's log-probabilities of its own greedy tokens with a naive reference written here: a
transformers forward whose cache keeps, per layer and KV head, the tokens the press would keep, decoded with the
positions of the uncompressed prompt.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kvpress_like.integrations import vllm as integration

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (see benchmarks/vllm/setup_venv.sh)")


# -- without vLLM ---------------------------------------------------------------------------------------------------
def test_importing_does_not_import_vllm():
    code = "import sys, kvpress_like, kvpress_like.integrations.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("n", [1, 2, 11, 12, 13, 100, 2048, 2049])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_kept_tokens_is_what_the_press_keeps(n, ratio):
    """The count both vLLM processes plan with equals the count ``Press.select`` returns on a whole prompt."""
    from kvpress_like import press_from_dict
    from kvpress_like.press import LayerContext

    p = press_from_dict({"press": "knorm", "ratio": ratio, "n_sink": 4, "window": 4})
    keys = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(n))
    ctx = LayerContext(module=None, layer_idx=0, num_layers=1, layers=(0,), arch=None, hidden_states=keys[:, 0],
                       position_embeddings=(None, None), keys=keys, values=keys,
                       valid=torch.ones(1, n, dtype=torch.bool))
    indices, slot_valid = p.select(ctx)
    assert integration.kept_tokens(p, n) == indices.shape[-1] == int(slot_valid.sum(-1).max())
    expected = max(n - math.floor(ratio * n + 1e-9), min(n, 8), 1)
    assert integration.kept_tokens(p, n) == expected


def test_press_from_env(monkeypatch):
    monkeypatch.delenv(integration.ENV, raising=False)
    assert integration.press_from_env() is None
    monkeypatch.setenv(integration.ENV, json.dumps({"press": "compactor", "ratio": 0.5}))
    p = integration.press_from_env()
    assert p.name == "compactor" and p.ratio == 0.5
    monkeypatch.setenv(integration.ENV, "compactor")
    with pytest.raises(ValueError, match="JSON"):
        integration.press_from_env()
    monkeypatch.setenv(integration.ENV, json.dumps({"ratio": 0.5}))
    with pytest.raises(ValueError, match="'press' key"):
        integration.press_from_env()


def test_unsupported_presses_are_refused():
    from kvpress_like import DecodingPress, press_from_dict

    with pytest.raises(ValueError, match="uniform allocator"):
        integration.check_press(press_from_dict({"press": "snapkv", "ratio": 0.5, "allocator": "head_adaptive"}))
    with pytest.raises(ValueError, match="prefill presses only"):
        integration.check_press(DecodingPress(scorer="knorm", target=64, interval=16))
    with pytest.raises(ValueError, match="Press"):
        integration.check_press("knorm")


def test_whole_prompt_rule():
    assert integration.whole_prompt(0, 100, 100)
    assert not integration.whole_prompt(0, 64, 100)  # chunked prefill: left uncompressed
    assert not integration.whole_prompt(32, 68, 100)  # prefix-cache hit
    assert not integration.whole_prompt(0, 105, 100)  # resumed request replaying its outputs


# -- with vLLM ------------------------------------------------------------------------------------------------------
BLOCK = 32
PROMPT = 200
NEW = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_NO_USAGE_STATS": "1"})
    from vllm import LLM

    integration.install(None)
    llm = LLM(model=str(directory), skip_tokenizer_init=True, dtype="float32", max_model_len=512,
              enable_prefix_caching=False, enforce_eager=True, seed=0, distributed_executor_backend="uni",
              async_scheduling=False, block_size=BLOCK, max_num_seqs=4, num_gpu_blocks_override=64)
    yield llm, model
    integration.install(None)


def _prompt(seed: int) -> list[int]:
    return torch.randint(0, 128, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(llm, spec, ids):
    """vLLM's greedy tokens, their log-probabilities, and the blocks held after the prefill / first decode step."""
    from vllm import SamplingParams

    from kvpress_like import press_from_dict

    integration.install(press_from_dict(spec) if spec else None)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=0, detokenize=False)
    llm.llm_engine.add_request(f"r{_generate.count}", {"prompt_token_ids": ids}, params)
    _generate.count += 1
    used, output = [], None
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            output = out if out.finished else output
        used.append(total - pool.get_num_free_blocks())
    integration.install(None)
    assert pool.get_num_free_blocks() == total  # everything returned at the end
    completion = output.outputs[0]
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
    return list(completion.token_ids), logprobs, used


_generate.count = 0


def _reference_logprobs(model, ids, tokens, ratio, score=None):
    """Naive reference: transformers prefill, keep per layer and KV head the ``n - floor(ratio * n)`` tokens with the
    highest ``score(keys [1, H, n, D]) -> [1, H, n]`` (all tokens without ``score``), then teacher-force ``tokens``
    with the positions of the uncompressed prompt. Returns the log-probability of each token of ``tokens``."""
    n = len(ids)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        cache = out.past_key_values
        if score is not None:
            kept = n - math.floor(ratio * n + 1e-9)
            for layer in cache.layers:
                keep = score(layer.keys).topk(kept, dim=-1).indices.sort(dim=-1).values  # [1, H, kept]
                gather = keep[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
                assert layer.keys.shape[2] == kept
        logits = out.logits[0, -1]
        result = []
        for t, token in enumerate(tokens):
            result.append(torch.log_softmax(logits.double(), -1)[token].item())
            out = model(torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[n + t]]),
                        use_cache=True)
            logits = out.logits[0, -1]
    return result


@needs_vllm
def test_no_press_matches_transformers(engine):
    llm, model = engine
    ids = _prompt(1)
    tokens, logprobs, used = _generate(llm, None, ids)
    assert used[0] == used[1] == math.ceil((PROMPT + 1) / BLOCK)
    assert logprobs == pytest.approx(_reference_logprobs(model, ids, tokens, 0.0), abs=1e-3)


@needs_vllm
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_knorm_in_vllm_matches_naive_reference(engine, ratio):
    """Knorm (keep the smallest key norms) at prefill: vLLM's answers and log-probabilities are those of a cache
    holding only the kept keys at their original positions; the evicted blocks are back in the pool after the first
    decode step."""
    llm, model = engine
    ids = _prompt(2)
    tokens, logprobs, used = _generate(llm, {"press": "knorm", "ratio": ratio}, ids)
    kept = PROMPT - math.floor(ratio * PROMPT)
    assert used[0] == math.ceil(PROMPT / BLOCK)  # the prefill holds the whole prompt
    assert used[1] == math.ceil((kept + 1) / BLOCK)  # then only the kept entries and the first new token
    reference = _reference_logprobs(model, ids, tokens, ratio, score=lambda k: -k.norm(dim=-1))
    assert logprobs == pytest.approx(reference, abs=1e-3)
    full = _reference_logprobs(model, ids, tokens, 0.0)
    assert max(abs(a - b) for a, b in zip(full, logprobs)) > 1e-2  # the press really changed the attention


@needs_vllm
def test_compactor_in_vllm_matches_the_library_scorer(engine):
    """Compactor (needs pre-RoPE keys and post-RoPE queries): the kept tokens are those ``CompactorPress.select``
    picks from tensors captured in a transformers forward of the same prompt."""
    from kvpress_like import press_from_dict
    from kvpress_like.press import LayerContext

    llm, model = engine
    ids = _prompt(3)
    spec = {"press": "compactor", "ratio": 0.5, "chunk_size": 64}
    tokens, logprobs, used = _generate(llm, spec, ids)
    p = press_from_dict(spec)
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda m, a, o, i=i: captured.setdefault(("k", i), o)) for i, layer in enumerate(model.model.layers)]
    hooks += [layer.self_attn.q_proj.register_forward_hook(
        lambda m, a, o, i=i: captured.setdefault(("q", i), o)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for h in hooks:
        h.remove()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = model.model.rotary_emb
    cos, sin = rotary(cache.layers[0].keys, torch.arange(PROMPT)[None])
    kept_by_layer = []
    for i, layer in enumerate(cache.layers):
        attn = model.model.layers[i].self_attn
        q = captured[("q", i)].view(1, PROMPT, -1, 64).transpose(1, 2)
        q_rope, _ = apply_rotary_pos_emb(q, q, cos, sin)
        ctx = LayerContext(module=attn, layer_idx=i, num_layers=2, layers=(0, 1), arch=integration._VllmArchitecture(),
                           hidden_states=q.new_empty(1, PROMPT, 0), position_embeddings=(cos, sin), keys=layer.keys,
                           values=layer.values, valid=torch.ones(1, PROMPT, dtype=torch.bool),
                           projections={"q_rope": q_rope, "k": captured[("k", i)]})
        attn.num_heads, attn.num_kv_heads = 2, 1  # what _VllmArchitecture reads (vLLM's attribute names)
        kept_by_layer.append(p.select(ctx)[0])
    layers = iter(kept_by_layer)
    reference = _reference_logprobs(model, ids, tokens, 0.5,
                                    score=lambda k: torch.zeros(k.shape[:3]).scatter(-1, next(layers), 1.0))
    assert used[1] == math.ceil((PROMPT // 2 + 1) / BLOCK)
    assert logprobs == pytest.approx(reference, abs=1e-3)


@needs_vllm
def test_two_prompts_prefilled_in_one_step(engine):
    """Two prompts of different lengths scheduled in the same step are each compacted in their own blocks, and a
    third request without compression decodes next to them."""
    from vllm import SamplingParams

    from kvpress_like import press_from_dict

    llm, model = engine
    prompts = {"a": _prompt(4), "b": _prompt(5)[:150]}
    integration.install(press_from_dict({"press": "knorm", "ratio": 0.5}))
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=0, detokenize=False)
    for name, ids in prompts.items():
        llm.llm_engine.add_request(f"batch-{name}", {"prompt_token_ids": ids}, params)
    llm.llm_engine.step()  # both prompts prefilled together
    integration.install(None)
    llm.llm_engine.add_request("batch-c", {"prompt_token_ids": _prompt(6)[:120]}, params)
    outputs = {}
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
    prompts["c"] = _prompt(6)[:120]
    for name, ids in prompts.items():
        completion = outputs[f"batch-{name}"]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        score = None if name == "c" else (lambda k: -k.norm(dim=-1))
        reference = _reference_logprobs(model, ids, tokens, 0.5 if score else 0.0, score=score)
        assert logprobs == pytest.approx(reference, abs=1e-3), name
