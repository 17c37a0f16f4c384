"""The SDXL VAE's GroupNorm with its statistics over chunks of each group (issue 14), for the compiled decode.

The decoder normalises tensors of up to 256 channels at 1024 px in 32 groups: at batch 4 in fp32, 128 rows of
8.4 M elements each for the statistics' reduction. Inside the compiled batch-4 TF32 decode inductor's GroupNorm
kernels, fused with the upsampling and the convolutions' bias, held ~11 ms an image
(results/bench/profiles/profile-vae-tf32-b4-h100.txt). Here each group's statistics come from chunks of at most
`CHUNK` elements, N·32·S rows for the reduction, combined exactly as Chan et al.'s parallel variance: with S equal
chunks, mean = mean of the chunk means, var = mean of the chunk variances + variance of the chunk means (population
variances, as GroupNorm's). Inductor fuses the normalisation, the affine and the SiLU after it as before. On an
H100 the batch-4 decode took 59.3 ms an image against 61.8 (three runs); at batch 16, whose 512 rows fill the GPU,
and for a GroupNorm alone (at its bandwidth bound either way) nothing changed measurably
(results/bench/probes/probe_groupnorm-h100.json).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 65536  # elements of a group per partial statistic (a row of the reduction)


def chunks(per_group: int, chunk: int = CHUNK) -> int:
    """How many equal chunks of at most ~`chunk` elements a group of `per_group` elements splits into."""
    s = max(1, per_group // chunk)
    while per_group % s:
        s -= 1
    return s


def chunked_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, chunk: int = CHUNK) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) for a contiguous (N, C, *) x, its statistics over chunks."""
    n, c = x.shape[:2]
    per = x[0, : c // groups].numel()  # a group's elements: C/G channels × the spatial size
    s = chunks(per, chunk)
    var_c, mean_c = torch.var_mean(x.reshape(n, groups, s, per // s), -1, correction=0)  # (N, G, S)
    mean = mean_c.mean(-1, keepdim=True)
    var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
    y = ((x.reshape(n, groups, per) - mean) * torch.rsqrt(var + eps)).view_as(x)
    affine = (c,) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.view(affine)
    if bias is not None:
        y = y + bias.view(affine)
    return y


def _forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm.forward through `chunked_group_norm` (a tensor that is not contiguous: F.group_norm)."""
    if not x.is_contiguous() or x.ndim < 3:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    return chunked_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_chunked_group_norm(module: nn.Module) -> int:
    """Give every nn.GroupNorm of `module` the chunked statistics; returns how many."""
    layers = [m for m in module.modules() if type(m) is nn.GroupNorm]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    return len(layers)
