"""The engine's optimiser: AdamW, fused into one multi-tensor kernel on a GPU (issue 14).

A rank-1 LoRA on SDXL is ~1,600 small fp32 tensors. The default (foreach) AdamW launches about ten
multi-tensor kernels per chunk of them from Python, ~18 ms of host time per step on an H200 while the GPU
waits; the fused one does the same update in one kernel per chunk. The CPU keeps the default
implementation, so the CPU path (and every CPU test) is unchanged.

The fused kernel writes the parameters without bumping their autograd version counters (torch 2.11 and
2.14, CPU and CUDA). FastLoRA caches its merged weights W + s·B·A by those counters (`fastlora.py`), so
`AdamW.step` bumps them itself: without it the merged passes would keep the weights of the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.autograd.graph import increment_version

IMPL_KEYS: tuple[str, ...] = ("foreach", "fused", "capturable")  # how an optimiser runs, not what it computes


class AdamW(torch.optim.AdamW):
    """torch's AdamW whose step marks the parameters it updated as modified, whatever the implementation."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One AdamW step, then the version counters of the updated parameters bumped (fused steps skip it)."""
        loss = super().step(closure)
        if any(group.get("fused") for group in self.param_groups):
            bump_versions([p for group in self.param_groups for p in group["params"] if p.grad is not None])
        return loss


def bump_versions(tensors: list[torch.Tensor]) -> None:
    """Mark `tensors` as modified in place (one call where torch takes a list; older torch, one per tensor)."""
    try:
        increment_version(tensors)
    except TypeError:  # torch < 2.6 takes a single tensor
        for t in tensors:
            increment_version(t)


def adamw(params: Iterable[Any], lr: float, betas: tuple[float, float], weight_decay: float,
          device: torch.device | str) -> AdamW:
    """AdamW over `params` (tensors or param groups); fused on CUDA."""
    fused = torch.device(device).type == "cuda"
    return AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`opt.load_state_dict(state)`, keeping `opt`'s own implementation (a GPU run's fused checkpoint resumes on
    the CPU with the CPU's default, and the reverse)."""
    impl = [{k: g.get(k) for k in IMPL_KEYS} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, own in zip(opt.param_groups, impl, strict=True):
        group.update(own)
