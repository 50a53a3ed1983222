"""Kernels: every Triton kernel against the PyTorch path (run under TRITON_INTERPRET=1 on the CPU, in a subprocess so
the interpreter setting never leaks into other tests), the dispatch rules, and the ragged attention's PyTorch path
against dense masked attention."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvpress_like.kernels import use_triton
from kvpress_like.kernels.ragged_attention import ragged_attention

TRITON_CHECK = textwrap.dedent("""
    import os
    import torch
    from kvpress_like.compressors.leverage import leverage_scores
    from kvpress_like.compressors.non_causal_attention import non_causal_attention_scores

    def both(fn, *args):
        os.environ["KVPRESS_LIKE_TRITON"] = "0"
        reference = fn(*args)
        os.environ["KVPRESS_LIKE_TRITON"] = "1"
        return reference, fn(*args)

    g = torch.Generator().manual_seed(0)
    cases = 0
    for b, h_q, h_kv, s, d, chunk, dtype in [(1, 4, 4, 64, 16, 16, torch.float32), (2, 6, 3, 37, 16, 16, torch.float32),
                                             (2, 8, 2, 50, 32, 7, torch.float32), (1, 9, 3, 70, 64, 32, torch.bfloat16),
                                             (2, 4, 2, 33, 16, 64, torch.float16)]:
        q = torch.randn(b, h_q, s, d, generator=g).to(dtype)
        k = torch.randn(b, h_kv, s, d, generator=g).to(dtype)
        valid = torch.ones(b, s, dtype=torch.bool)
        if b > 1:
            valid[1, :5] = False  # left padding
        reference, triton_out = both(non_causal_attention_scores, q, k, valid, d ** -0.5, chunk)
        torch.testing.assert_close(triton_out, reference, rtol=1e-4, atol=1e-5)
        for sketch in (8, d + 1):  # sketched, and exact leverage (no sketch)
            reference, triton_out = both(leverage_scores, k, valid, sketch, 3)
            torch.testing.assert_close(triton_out, reference, rtol=1e-3, atol=1e-5)
        cases += 1
    print("OK", cases)
""")


def test_triton_kernels_match_the_pytorch_path_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK 5"


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("KVPRESS_LIKE_TRITON", raising=False)
    assert not use_triton(cpu)  # CPU tensors use PyTorch unless forced
    monkeypatch.setenv("KVPRESS_LIKE_TRITON", "0")
    assert not use_triton(cpu)


def test_importing_without_triton_falls_back():
    code = textwrap.dedent("""
        import os, sys
        sys.modules["triton"] = None  # as if Triton were not installed
        os.environ["KVPRESS_LIKE_TRITON"] = "1"
        import torch
        from kvpress_like.kernels import triton_available, use_triton
        from kvpress_like.compressors.leverage import leverage_scores
        assert not triton_available() and not use_triton(torch.zeros(1))
        scores = leverage_scores(torch.randn(1, 2, 20, 8), torch.ones(1, 20, dtype=torch.bool), 4)
        assert scores.shape == (1, 2, 20)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "OK"


def naive_ragged(query, keys, values, lengths, scale, causal):
    b, h_q, q, d = query.shape
    h_kv = lengths.shape[1]
    g = h_q // h_kv
    out = torch.empty_like(query)
    start = 0
    for row in range(b):
        for kv in range(h_kv):
            n = int(lengths[row, kv])
            k, v = keys[start:start + n].float(), values[start:start + n].float()
            start += n
            for head in range(kv * g, (kv + 1) * g):
                for i in range(q):
                    visible = n - q + i + 1 if causal else n
                    weights = torch.softmax(query[row, head, i].float() @ k[:visible].T * scale, -1)
                    out[row, head, i] = (weights @ v[:visible]).to(query.dtype)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h_q, h_kv, q", [(4, 4, 1), (6, 2, 3), (8, 1, 2)])
def test_ragged_attention_matches_dense_masked_attention(h_q, h_kv, q, causal):
    g = torch.Generator().manual_seed(h_q + q)
    b, d = 2, 16
    lengths = torch.randint(q, 20, (b, h_kv), generator=g)
    total = int(lengths.sum())
    query = torch.randn(b, h_q, q, d, generator=g)
    keys, values = torch.randn(total, d, generator=g), torch.randn(total, d, generator=g)
    got = ragged_attention(query, keys, values, lengths, 0.25, causal)
    torch.testing.assert_close(got, naive_ragged(query, keys, values, lengths, 0.25, causal), rtol=1e-5, atol=1e-5)


def test_ragged_attention_rejects_inconsistent_shapes():
    query = torch.randn(1, 4, 2, 8)
    lengths = torch.tensor([[3, 1, 4]])  # 3 KV heads do not divide 4 query heads
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ragged_attention(query, torch.randn(8, 8), torch.randn(8, 8), lengths, 1.0)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # a set shorter than the queries
        ragged_attention(query, torch.randn(5, 8), torch.randn(5, 8), torch.tensor([[4, 1]]), 1.0)
