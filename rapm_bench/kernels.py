"""Hand-written GPU kernels (Triton) for the few places where the library's kernels leave bandwidth unused.

`merge_rank1_triton`: FastLoRA's per-step rebuild of a packed group at rank 1 (fastlora._Group),
W' = W + s·(b ⊗ a), summed in fp32 and rounded once, plus s·a and s·b. One pass over W (read W, write W'),
tiled 2-D so that each program loads its slice of a and b once: the rebuild must move 2 bytes in and 2
bytes out per bf16 weight, and nothing else. Where Triton or a GPU is missing, `available` is False and the
callers keep their other kernels (compiled or aten). FastLoRA uses it only with `fastlora.TRITON_REBUILD` on
(off: on an H100 it ran at 3.5 ms an iteration, near the copy floor, but the iteration was no faster than with
inductor's compiled merge; results/bench/README.md).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

BLOCK_OUT, BLOCK_K = 32, 128  # one program's tile of W: 32 rows × 128 columns (8 KB of bf16 in, 8 KB out)


@functools.cache
def _kernel() -> Any:
    """The Triton kernel (compiled on first use per dtype); None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def merge_rank1_kernel(w_ptr, a_ptr, b_ptr, out_ptr, out_a_ptr, out_b_ptr, n_out, n_k, s,
                           BO: tl.constexpr, BK: tl.constexpr):
        po, pk, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = po * BO + tl.arange(0, BO)
        cols = pk * BK + tl.arange(0, BK)
        row_ok, col_ok = rows < n_out, cols < n_k
        g64 = g.to(tl.int64)
        b = tl.load(b_ptr + g64 * n_out + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BO,)
        a = tl.load(a_ptr + g64 * n_k + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BK,)
        offs = g64 * n_out * n_k + rows[:, None].to(tl.int64) * n_k + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        merged = w + s * (b[:, None] * a[None, :])  # fp32, rounded once by the store
        tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=ok)
        if pk == 0:  # s·b once per row block, s·a once per column block
            tl.store(out_b_ptr + g64 * n_out + rows, (b * s).to(out_b_ptr.dtype.element_ty), mask=row_ok)
        if po == 0:
            tl.store(out_a_ptr + g64 * n_k + cols, (a * s).to(out_a_ptr.dtype.element_ty), mask=col_ok)

    return merge_rank1_kernel


_failed: set[str] = set()  # kernels that failed to build or run here: their callers use their other kernels


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `t`'s device (a CUDA GPU with Triton installed)."""
    return t.is_cuda and _kernel() is not None


def run_or_warn(fn: Callable[..., None], *args: Any) -> bool:
    """`fn(*args)`; False (a warning, once) when it failed to compile or launch here: the caller then runs its other
    kernels. A first call must come outside a CUDA graph's capture (FastLoRA's refresh warms up before capturing)."""
    if fn.__name__ in _failed:
        return False
    try:
        fn(*args)
        return True
    except Exception as e:  # Triton's compile and launch errors have no common base class
        _failed.add(fn.__name__)
        warnings.warn(f"Triton kernel {fn.__name__} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "using the other kernels", stacklevel=2)
        return False


def merge_rank1_triton(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, out_w: torch.Tensor,
                       out_a: torch.Tensor, out_b: torch.Tensor) -> None:
    """`fastlora.merge_rank1` in one Triton launch: W (G, out, K), a (G, 1, K), b (G, out, 1), all contiguous."""
    g, n_out, n_k = w.shape
    for t, shape in ((a, (g, 1, n_k)), (b, (g, n_out, 1)), (out_w, w.shape), (out_a, (g, 1, n_k)),
                     (out_b, (g, n_out, 1))):
        if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
            raise ValueError(f"merge_rank1_triton: a tensor of shape {tuple(t.shape)} where {tuple(shape)} "
                             "contiguous was expected")
    grid = (-(-n_out // BLOCK_OUT), -(-n_k // BLOCK_K), g)
    _kernel()[grid](w, a, b, out_w, out_a, out_b, n_out, n_k, float(s), BO=BLOCK_OUT, BK=BLOCK_K)
