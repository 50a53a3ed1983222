"""Optional GPU kernels for the hot scoring paths, with the PyTorch code as the reference and the fallback.

* :mod:`.leverage_triton` mirrors :func:`kvpress_like.compressors.leverage.leverage_scores`: the masked key mean, the
  sketched projection fused with the Gram accumulation, and the sketched projection fused with the per-token
  quadratic form ``k_hat_i^T G^{-1} k_hat_i`` run in Triton; the small ``k x k`` Cholesky factorisation stays in torch.
* :mod:`.non_causal_triton` mirrors :func:`kvpress_like.compressors.non_causal_attention.non_causal_attention_scores`:
  the within-chunk softmax column sums, flash-style (row max / row sum, then ``exp(s - m) / l`` summed into the
  columns), so no ``chunk x chunk`` matrix is materialised; the chunk grid starting at each row's first real token,
  padding and the mean over a KV group's query heads are handled in the kernels' indexing.
* :mod:`.ragged_attention`: attention of new queries over a per-head ragged cache (:class:`kvpress_like.cache.
  RaggedLayer`), with flash-attention's variable-length kernel when it is installed and the tensors are on CUDA, and a
  PyTorch path otherwise.

The dispatchers :func:`leverage_scores` and :func:`non_causal_attention_scores` take the same arguments as the PyTorch
functions and return ``None`` when the Triton path does not apply (so the caller falls back to torch). The Triton path
applies to CUDA tensors when Triton is importable. The environment variable ``KVPRESS_LIKE_TRITON`` overrides this:
``0`` turns the kernels off, ``1`` also runs them on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter;
that is how the tests run them, it is slow). Importing this package never imports Triton and never fails.
"""

from __future__ import annotations

import os

import torch

from .ragged_attention import flash_attn_available, ragged_attention, ragged_layer_attention

__all__ = [
    "flash_attn_available",
    "leverage_scores",
    "non_causal_attention_scores",
    "ragged_attention",
    "ragged_layer_attention",
    "triton_available",
    "triton_importable",
    "use_triton",
]

_TRITON_IMPORTABLE: bool | None = None


def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (tried once, on the first call; never at import of this package)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:  # ImportError, or a broken install (missing compiler/driver pieces)
            _TRITON_IMPORTABLE = False
        else:
            _TRITON_IMPORTABLE = True
    return _TRITON_IMPORTABLE


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether Triton kernels can run here: Triton importable and (CUDA available or ``TRITON_INTERPRET=1``)."""
    return triton_importable() and (torch.cuda.is_available() or _interpret())


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton path should run for ``tensor``.

    True for CUDA tensors when Triton is importable, and for CPU tensors when ``KVPRESS_LIKE_TRITON=1`` and
    ``TRITON_INTERPRET=1``; always False when ``KVPRESS_LIKE_TRITON=0``.
    """
    setting = os.environ.get("KVPRESS_LIKE_TRITON", "")
    if setting == "0" or not (tensor.is_cuda or (setting == "1" and _interpret())):
        return False
    return triton_importable()  # only now: CPU-only runs never pay for importing Triton


def leverage_scores(
    keys: torch.Tensor, valid: torch.Tensor, sketch_size: int = 48, seed: int = 0
) -> torch.Tensor | None:
    """Triton path of :func:`kvpress_like.compressors.leverage.leverage_scores`, or ``None`` when it does not apply.

    Args:
        keys: ``[B, H, S, D]`` pre-RoPE keys (fp32, fp16 or bf16; computed in fp32).
        valid: ``[B, S]`` bool, real tokens (others get score 0 and do not enter the statistics).
        sketch_size: ``k``, the width of the Gaussian sketch; ``k >= D`` means exact leverage.
        seed: seed of the Gaussian sketch.

    Returns:
        ``[B, H, S]`` fp32 scores, as the PyTorch function; ``None`` when the Triton path does not apply (see
        :func:`use_triton`).
    """
    if not use_triton(keys):
        return None
    from .leverage_triton import leverage_scores_triton

    return leverage_scores_triton(keys, valid, sketch_size, seed)


def non_causal_attention_scores(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float, chunk_size: int
) -> torch.Tensor | None:
    """Triton path of :func:`kvpress_like.compressors.non_causal_attention.non_causal_attention_scores`, or ``None``.

    Args:
        queries: ``[B, H_q, S, D]`` post-RoPE queries.
        keys: ``[B, H_kv, S, D]`` post-RoPE keys (``H_q`` a multiple of ``H_kv``).
        valid: ``[B, S]`` bool, real tokens.
        scale: logit scale.
        chunk_size: tokens per chunk.

    Returns:
        ``[B, H_kv, S]`` fp32 column sums averaged over each KV group's query heads, 0 on padding, as the PyTorch
        function; ``None`` when the Triton path does not apply (see :func:`use_triton`).
    """
    if not use_triton(keys):
        return None
    from .non_causal_triton import non_causal_attention_scores_triton

    return non_causal_attention_scores_triton(queries, keys, valid, scale, chunk_size)
