"""Optional GPU kernels for the hot scoring paths, with the PyTorch code as the reference and the fallback.

* :mod:`.non_causal_triton`: the within-chunk softmax column sums of Compactor's non-causal attention
  (mirrors the loop in :func:`kvpress_like.compressors.non_causal_attention.non_causal_attention_scores`);
* :mod:`.leverage_triton`: the per-token quadratic form ``k_i^T G^{-1} k_i`` of the sketched leverage scores
  (mirrors the last step of :func:`kvpress_like.compressors.leverage.leverage_scores`);
* :mod:`.ragged_attention`: attention of new queries over a per-head ragged cache, with flash-attention's
  variable-length kernel when it is installed and the tensors are on CUDA, and a PyTorch path otherwise.

Triton kernels are used automatically for CUDA tensors when Triton is importable. ``KVPRESS_LIKE_TRITON=1`` forces
them on (CPU tensors need ``TRITON_INTERPRET=1``: that is how the tests run them); ``KVPRESS_LIKE_TRITON=0`` turns
them off. Importing this package never fails: without Triton the dispatchers report the kernels unavailable.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether Triton can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["triton"] = None
        return False


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton path should run for ``tensor``: CUDA tensors with Triton installed, unless
    ``KVPRESS_LIKE_TRITON`` says otherwise."""
    setting = os.environ.get("KVPRESS_LIKE_TRITON", "")
    if setting == "0" or not triton_available():
        return False
    return setting == "1" or tensor.is_cuda
