"""Tolerances shared by tests/test_bench.py and tests/test_fastlora.py, and TF32 rounding for the fp16 paths' tests."""

from __future__ import annotations

import torch

GRAD_RTOL = 1e-4
GRAD_ATOL = 1e-5
"""LoRA gradients of two implementations agree to GRAD_RTOL of each layer's largest entry plus an
absolute floor of GRAD_ATOL times the largest gradient of any layer. The floor is float32 round-off:
a LoRA gradient is a reduction over ~10^3-10^4 products (batch x positions x channels) whose partial
sums are as large as the largest gradient, and the two implementations reduce in different orders
(other kernels, other thread splits), so they differ by up to ~sqrt(n) x 6e-8 (float32's unit
round-off) x that scale, whatever the layer's own gradient size. Measured on the CPU: up to 2.3e-6 x
scale at 2 threads; a layer whose own gradient is 2.7e-5 differed by 3.6e-9, far above 1e-4 of it."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS difference."""
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12))


def tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to TF32's 10 explicit mantissa bits (as TF32 tensor cores read their inputs)."""
    m, e = torch.frexp(t)
    return torch.ldexp(torch.round(m * 2048) / 2048, e)
