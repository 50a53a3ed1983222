"""Kernels: every Triton kernel against the PyTorch reference functions, the dispatch rules, importing without Triton,
and the ragged attention (PyTorch path and the varlen packing) against dense masked attention computed naively.

The Triton checks run under ``TRITON_INTERPRET=1`` on CPU tensors in subprocesses (one per kernel family), so the
interpreter setting (read when a kernel module is imported) never leaks into other tests of the same pytest process.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvpress_like.cache import RaggedLayer
from kvpress_like.kernels import leverage_scores, non_causal_attention_scores, triton_available, use_triton
from kvpress_like.kernels.ragged_attention import _Sets, _varlen_path, ragged_attention, ragged_layer_attention

ragged_attention_module = importlib.import_module("kvpress_like.kernels.ragged_attention")


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with extra environment variables; return its stdout (fail on error)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


# ----------------------------------------------------------------------------------------------- Triton kernels
PRELUDE = """
    import os
    import torch

    def reference(fn, *args):
        os.environ["KVPRESS_LIKE_TRITON"] = "0"  # the PyTorch path, whatever the compressor's dispatch
        try:
            return fn(*args)
        finally:
            os.environ["KVPRESS_LIKE_TRITON"] = "1"

    def padded_valid(b, s):
        valid = torch.ones(b, s, dtype=torch.bool)
        if b > 1:
            valid[1, :5] = False  # left padding
        if b > 2:
            valid[2, -4:] = False  # right padding
        return valid
"""

NON_CAUSAL_CHECK = PRELUDE + """
    from kvpress_like import kernels
    from kvpress_like.compressors.non_causal_attention import non_causal_attention_scores
    from kvpress_like.kernels.non_causal_triton import non_causal_attention_scores_triton

    g = torch.Generator().manual_seed(0)
    cases = [  # b, h_q, h_kv, s, d, chunk, dtype
        (1, 2, 2, 32, 16, 16, torch.float32),   # chunk divides the length, no GQA
        (2, 4, 2, 37, 16, 16, torch.float32),   # GQA, left padding, chunk does not divide
        (3, 6, 2, 29, 32, 7, torch.float32),    # left and right padding, small odd chunk
        (2, 2, 1, 20, 16, 64, torch.float32),   # chunk longer than the sequence
        (2, 4, 2, 26, 64, 8, torch.bfloat16),
        (2, 4, 4, 21, 16, 5, torch.float16),
        (2, 2, 1, 9, 16, 1, torch.float32),     # one token per chunk
    ]
    for b, h_q, h_kv, s, d, chunk, dtype in cases:
        q = (torch.randn(b, s, h_q, d, generator=g) * 2).to(dtype).transpose(1, 2)  # strided, as a projection's view
        k = (torch.randn(b, h_kv, s, d, generator=g) * 2).to(dtype)
        valid = padded_valid(b, s)
        scale = d ** -0.5
        expected = reference(non_causal_attention_scores, q, k, valid, scale, chunk)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
        got = non_causal_attention_scores_triton(q, k, valid, scale, chunk)
        torch.testing.assert_close(got, expected, **tol)
        assert (got[~valid[:, None].expand_as(got)] == 0).all()
        if b == 3:
            assert torch.equal(got, kernels.non_causal_attention_scores(q, k, valid, scale, chunk))  # deterministic
        torch.testing.assert_close(non_causal_attention_scores(q, k, valid, scale, chunk), expected, **tol)  # wired

    print("OK", len(cases))
"""

LEVERAGE_CHECK = PRELUDE + """
    from kvpress_like import kernels
    from kvpress_like.compressors.leverage import leverage_scores
    from kvpress_like.kernels.leverage_triton import leverage_scores_triton

    g = torch.Generator().manual_seed(1)
    cases = [  # b, h, s, d, sketch, dtype, offset
        (1, 2, 40, 16, 8, torch.float32, 0.0),     # sketched
        (2, 3, 37, 16, 48, torch.float32, 0.0),    # k >= D: exact leverage, left padding
        (3, 2, 150, 64, 48, torch.float32, 20.0),  # several row blocks and splits, large common offset, padding
        (2, 2, 45, 32, 12, torch.bfloat16, 3.0),
        (1, 1, 33, 16, 8, torch.float16, 0.0),
        (2, 2, 7, 8, 4, torch.float32, 0.0),       # fewer tokens than a block
    ]
    for b, h, s, d, sketch, dtype, offset in cases:
        keys = (torch.randn(b, s, h, d, generator=g) + offset).to(dtype).transpose(1, 2)  # strided
        valid = padded_valid(b, s)
        expected = reference(leverage_scores, keys, valid, sketch, 5)
        got = leverage_scores_triton(keys, valid, sketch, 5)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-5)
        assert (got[~valid[:, None].expand_as(got)] == 0).all()
        if b == 3:
            assert torch.equal(got, kernels.leverage_scores(keys, valid, sketch, 5))  # deterministic
        torch.testing.assert_close(leverage_scores(keys, valid, sketch, 5), expected, rtol=1e-3, atol=2e-5)  # wired

    # a row with no real token and constant keys score 0
    keys = torch.randn(2, 2, 20, 16, generator=g)
    keys[1] = 1.5
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0] = False
    assert leverage_scores_triton(keys, valid, 8).abs().max() < 1e-6

    print("OK", len(cases))
"""


@pytest.mark.parametrize("check", [NON_CAUSAL_CHECK, LEVERAGE_CHECK], ids=["non_causal", "leverage"])
def test_triton_kernels_match_the_pytorch_reference_under_the_interpreter(check):
    pytest.importorskip("triton")
    out = run_python(check, TRITON_INTERPRET="1", KVPRESS_LIKE_TRITON="1")
    assert out.strip().startswith("OK")


COMPILE_CHECK = """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvpress_like.kernels import leverage_triton as lev, non_causal_triton as nc

    def compile_for_sm80(fn, types, constexprs):
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 80, 32))

    pointers = {"keys_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "valid_ptr": "*i8", "shift_ptr": "*i64",
                "qk_scale": "fp32"}
    pointers.update({name: "*fp32" for name in ("mean_ptr", "sketch_ptr", "out_ptr", "a_ptr", "m_ptr", "inv_l_ptr")})
    compile_for_sm80(lev._masked_key_sum, pointers, {"BLOCK_S": 32, "BLOCK_D": 128})
    compile_for_sm80(lev._centred_gram, pointers, {"HAS_SKETCH": True, "BLOCK_S": 32, "BLOCK_D": 128, "BLOCK_K": 64})
    compile_for_sm80(lev._leverage_rows, pointers, {"BLOCK_S": 32, "BLOCK_D": 128, "BLOCK_K": 64})
    blocks = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "PRECISION": "tf32", "UPCAST": False}
    compile_for_sm80(nc._row_stats, pointers, blocks)
    compile_for_sm80(nc._column_sums, pointers, blocks)
    print("OK")
"""


def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter skips Triton's type and shape checks of compiled code: compile every kernel to PTX for sm_80
    (no GPU needed; bf16 inputs, the blocks of a 128-dim head and a 64-dim head)."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget compile API")
    if "nvidia" not in __import__("triton.backends", fromlist=["backends"]).backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    assert run_python(COMPILE_CHECK, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path)).strip() == "OK"


def test_importing_without_triton_works_and_the_dispatchers_return_none():
    out = run_python("""
        import sys
        sys.modules["triton"] = None  # as if Triton were not installed
        import torch
        from kvpress_like import kernels
        from kvpress_like.compressors.leverage import leverage_scores
        from kvpress_like.compressors.non_causal_attention import non_causal_attention_scores

        keys, valid = torch.randn(1, 2, 20, 8), torch.ones(1, 20, dtype=torch.bool)
        assert not kernels.triton_available() and not kernels.use_triton(keys)
        assert kernels.leverage_scores(keys, valid, 4) is None
        assert kernels.non_causal_attention_scores(keys, keys, valid, 0.3, 8) is None
        assert leverage_scores(keys, valid, 4).shape == (1, 2, 20)  # the PyTorch path
        assert non_causal_attention_scores(keys, keys, valid, 0.3, 8).shape == (1, 2, 20)
        print("OK")
    """, TRITON_INTERPRET="1", KVPRESS_LIKE_TRITON="1")
    assert out.strip() == "OK"


def test_dispatch_rules(monkeypatch):
    keys, valid = torch.randn(1, 2, 8, 4), torch.ones(1, 8, dtype=torch.bool)
    monkeypatch.delenv("KVPRESS_LIKE_TRITON", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(keys)  # CPU tensors use PyTorch unless forced under the interpreter
    assert leverage_scores(keys, valid) is None
    assert non_causal_attention_scores(keys, keys, valid, 0.5, 4) is None
    if not torch.cuda.is_available():
        assert not triton_available()  # neither CUDA nor TRITON_INTERPRET=1
    monkeypatch.setenv("KVPRESS_LIKE_TRITON", "1")
    assert not use_triton(keys)  # forcing needs TRITON_INTERPRET=1 on the CPU
    monkeypatch.setenv("KVPRESS_LIKE_TRITON", "0")
    assert not use_triton(keys)


# ------------------------------------------------------------------------------------------------ ragged attention
def naive_ragged(query, flat_keys, flat_values, lengths, scale, causal, tail_keys=None, tail_values=None,
                 tail_valid=None):
    """Per (row, query head, new token): the visible real entries of the head's key set, then softmax, in fp64."""
    b, h_q, q, _ = query.shape
    h_kv = lengths.shape[1]
    t = 0 if tail_keys is None else tail_keys.shape[2]
    out = torch.zeros(b, h_q, q, flat_values.shape[1], dtype=torch.float64)
    start = 0
    for row in range(b):
        for kv in range(h_kv):
            n = int(lengths[row, kv])
            keys, values = [flat_keys[start + j] for j in range(n)], [flat_values[start + j] for j in range(n)]
            real = [True] * n
            start += n
            for j in range(t):
                keys.append(tail_keys[row, kv, j])
                values.append(tail_values[row, kv, j])
                real.append(True if tail_valid is None else bool(tail_valid[row, j]))
            for i in range(q):
                own = len(keys) - q + i
                if causal and not real[own]:
                    continue  # a padding token: 0
                visible = [j for j in range(len(keys)) if real[j] and (not causal or j <= own)]
                if not visible:
                    continue
                k = torch.stack([keys[j] for j in visible]).double()
                v = torch.stack([values[j] for j in visible]).double()
                for head in range(kv * (h_q // h_kv), (kv + 1) * (h_q // h_kv)):
                    weights = torch.softmax(query[row, head, i].double() @ k.T * scale, -1)
                    out[row, head, i] = weights @ v
    return out


def ragged_case(seed, b, h_q, h_kv, q, t, d=16, d_v=16, dtype=torch.float32, tail_padding=True, empty_heads=True):
    g = torch.Generator().manual_seed(seed)
    low = max(q - t, 0)
    lengths = torch.randint(low, low + 12, (b, h_kv), generator=g)
    if empty_heads and low == 0:
        lengths[0, 0] = 0
    total = int(lengths.sum())
    args = dict(query=torch.randn(b, h_q, q, d, generator=g).to(dtype),
                flat_keys=torch.randn(total, d, generator=g).to(dtype),
                flat_values=torch.randn(total, d_v, generator=g).to(dtype), lengths=lengths)
    if t:
        tail_valid = torch.ones(b, t, dtype=torch.bool)
        if tail_padding and b > 1:
            tail_valid[1, : min(2, t)] = False  # padding among the appended tokens, including a new token when t <= 2
        args.update(tail_keys=torch.randn(b, h_kv, t, d, generator=g).to(dtype),
                    tail_values=torch.randn(b, h_kv, t, d_v, generator=g).to(dtype), tail_valid=tail_valid)
    return args


RAGGED_SHAPES = [  # b, h_q, h_kv, q, t
    (2, 4, 4, 1, 0),  # decode step, no tail: the new token is the last flat entry
    (2, 6, 2, 3, 0),  # GQA, several new tokens, no tail
    (2, 8, 1, 2, 5),  # MQA, tail with padding
    (3, 6, 3, 1, 1),  # decode after compression: the tail is the new token (padding in row 1)
    (2, 4, 2, 4, 2),  # more new tokens than the tail: the first ones are flat entries
    (1, 4, 2, 3, 7),
]


@pytest.mark.parametrize("path", ["padded", "segments"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("b, h_q, h_kv, q, t", RAGGED_SHAPES)
def test_ragged_attention_torch_paths_match_naive_dense_attention(b, h_q, h_kv, q, t, causal, path, monkeypatch):
    """Both PyTorch paths: the padded gather, and per key set over views of the flat segments (where it applies)."""
    applies = ragged_attention_module._segments_apply
    monkeypatch.setattr(ragged_attention_module, "_segments_apply",
                        lambda query, sets: path == "segments" and applies(query, sets))
    if path == "segments" and causal and q > t:
        pytest.skip("new tokens among the flat entries: the segment path does not apply")
    args = ragged_case(b * 100 + h_q * 10 + q + t, b, h_q, h_kv, q, t, d_v=8)
    got = ragged_attention(**args, scale=0.3, causal=causal, use_flash=False)
    assert got.shape == (b, h_q, q, 8) and got.dtype == torch.float32
    expected = naive_ragged(args["query"], args["flat_keys"], args["flat_values"], args["lengths"], 0.3, causal,
                            args.get("tail_keys"), args.get("tail_values"), args.get("tail_valid"))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_attention_half_precision(dtype):
    """(The segment path, which applies here.)"""
    args = ragged_case(7, 2, 6, 2, 2, 4, dtype=dtype)
    got = ragged_attention(**args, use_flash=False)
    assert got.dtype == dtype
    expected = naive_ragged(args["query"], args["flat_keys"], args["flat_values"], args["lengths"], 16**-0.5, True,
                            args["tail_keys"], args["tail_values"], args["tail_valid"])
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


def naive_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """``flash_attn_varlen_func``'s contract on the CPU: per sequence, heads of ``q`` grouped over those of ``k``,
    causal masks aligned to the bottom right."""
    assert q.is_contiguous() and cu_q.dtype == cu_k.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    group = q.shape[1] // k.shape[1]
    for s in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        n_q, n_k = qs.stop - qs.start, ks.stop - ks.start
        for head in range(q.shape[1]):
            logits = q[qs, head].double() @ k[ks, head // group].double().T * softmax_scale
            if causal:
                allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + n_k - n_q
                logits = logits.masked_fill(~allowed, float("-inf"))
            out[qs, head] = (torch.softmax(logits, -1) @ v[ks, head // group].double()).to(q.dtype)
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("b, h_q, h_kv, q, t", RAGGED_SHAPES)
def test_ragged_attention_varlen_packing_matches_the_torch_path(b, h_q, h_kv, q, t, causal):
    """The flash-attention path's packing (one varlen sequence per (row, KV head), tail padding and padding queries
    left out), with a naive CPU stand-in for ``flash_attn_varlen_func``."""
    args = ragged_case(b * 7 + q + t, b, h_q, h_kv, q, t, empty_heads=not causal)
    sets = _Sets(args["query"], args["flat_keys"], args["flat_values"], args["lengths"], args.get("tail_keys"),
                 args.get("tail_values"), args.get("tail_valid"), causal)
    got = _varlen_path(naive_varlen, args["query"], args["flat_keys"], args["flat_values"], args.get("tail_keys"),
                       args.get("tail_values"), sets, 0.25)
    expected = ragged_attention(**args, scale=0.25, causal=causal, use_flash=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ragged_layer_attention_matches_attention_over_the_layers_padded_view():
    g = torch.Generator().manual_seed(3)
    b, h_kv, groups, d, s = 2, 2, 3, 16, 12
    lengths = torch.tensor([[5, 9], [0, 3]])
    total = int(lengths.sum())
    layer = RaggedLayer(torch.randn(total, d, generator=g), torch.randn(total, d, generator=g), lengths, s,
                        (b, h_kv, s, d))
    for q, step_valid in [(3, torch.tensor([[True] * 3, [False, True, True]])), (1, None), (2, None)]:
        new = torch.ones(q, q, dtype=torch.bool).tril()[None, None]  # transformers' mask over the new tokens
        if step_valid is not None:
            new = new & step_valid[:, None, None, :]
        mask = layer.attention_mask(new, q, None, groups=groups)  # [B, H_q, q, P + q], asked before the update
        layer.pending_valid = step_valid
        keys, values = layer.update(torch.randn(b, h_kv, q, d, generator=g), torch.randn(b, h_kv, q, d, generator=g))
        query = torch.randn(b, h_kv * groups, q, d, generator=g)
        got = ragged_layer_attention(query, layer)
        rows = mask.any(-1, keepdim=True)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1), attn_mask=mask | ~rows)
        real = layer.tail_valid[:, -q:][:, None, :, None]  # padding tokens: 0 here, unspecified in the masked path
        torch.testing.assert_close(got, expected * real, rtol=1e-5, atol=1e-5)


def test_ragged_attention_rejects_inconsistent_shapes():
    query = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # 3 KV heads do not divide 4 query heads
        ragged_attention(query, torch.randn(8, 8), torch.randn(8, 8), torch.tensor([[3, 1, 4]]), 1.0)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # a set shorter than the new tokens
        ragged_attention(query, torch.randn(5, 8), torch.randn(5, 8), torch.tensor([[4, 1]]), 1.0)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # flat rows != lengths.sum()
        ragged_attention(query, torch.randn(6, 8), torch.randn(6, 8), torch.tensor([[4, 1]]), 1.0, causal=False)
    with pytest.raises(ValueError, match="tail_valid"):
        ragged_attention(query, torch.randn(5, 8), torch.randn(5, 8), torch.tensor([[4, 1]]), tail_keys=torch.randn(
            1, 2, 2, 8), tail_values=torch.randn(1, 2, 2, 8), tail_valid=torch.ones(1, 3, dtype=torch.bool))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="use_flash=True"):
            ragged_attention(query, torch.randn(5, 8), torch.randn(5, 8), torch.tensor([[4, 1]]), causal=False,
                             use_flash=True)
