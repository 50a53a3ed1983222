"""The two linear-algebra steps of leverage scores shared by the PyTorch reference
(:mod:`kvpress_like.compressors.leverage`) and the Triton kernel (:mod:`kvpress_like.kernels.leverage_triton`), so that
both compute the same sketch and the same regularised inverse without importing each other.
"""

from __future__ import annotations

import torch


def gaussian_sketch(dim: int, sketch_size: int, seed: int, device) -> torch.Tensor:
    """Seeded ``[dim, sketch_size]`` Gaussian matrix with entries ``N(0, 1/sketch_size)`` (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(dim, sketch_size, generator=generator) / sketch_size**0.5).to(device)


def inverse_cholesky(gram: torch.Tensor) -> torch.Tensor:
    """``L^{-1}`` ``[..., k, k]`` for the regularised Gram matrix ``G + (1e-4 tr(G) / k + 1e-6) I = L L^T``."""
    k = gram.shape[-1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    eye = torch.eye(k, device=gram.device, dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram + (1e-4 * trace / k + 1e-6) * eye)
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
