"""Convolutions on fp16 tensor cores with TF32's input precision, for the VAE decode (issue 14).

TF32 keeps 10 bits of mantissa of each product's inputs; so does fp16, whose tensor cores run twice TF32's rate, but
fp16 spans only 2^-24..65504 and the SDXL VAE's activations overflow it (hence diffusers' `force_upcast`). Here each
convolution scales its input per image and its weight per tensor by powers of two (exact in fp32) so that every
input is at most 1 and every weight at most 1 in magnitude, convolves in fp16 with fp32 accumulation, and scales the
result back in fp32 before the bias. An output is then at most the fan-in (C·k·k ≤ 4,608 in SDXL's decoder) in
magnitude, so nothing overflows whatever the weights or the latents; an input below 2^-14 of its image's largest
loses bits to fp16's subnormals, an absolute error under 2^-24 of that largest value, against TF32's 2^-11 relative
error on it. An image's scales do not depend on the other images of its batch (cuDNN's choice of kernels per batch
size still may, as for TF32).

Off by default (`VAEDecoder.half_convolutions`; the bench's VAE variant `tf32/half`). On an H100 at batch 16 the fp16
channels-last convolutions ran at 620-774 TFLOP/s against TF32's 191-340, but the half decode took 81-83 ms an image
against TF32's 50 (results/bench/probes/probe_halfconv-h100.json): its per-image maxima, one reduction row per image,
held 44 ms an image (profiles/profile-vae-half-b16-h100.txt). `image_amax` now reduces over chunks first; that
version is not yet timed on a GPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def power_of_two_at_least(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 amax), elementwise (the smallest normal fp32 where amax is 0): a power of two near amax."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny))))


def image_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per image, (N, 1, 1, 1), reduced over chunks first: a reduction of N rows of millions of elements
    ran at ~200 GB/s in inductor's kernels on an H100 (one row a block); chunks give it rows enough to fill the GPU."""
    from .groupnorm import chunks

    n = x.shape[0]
    flat = x if x.is_contiguous() else x.permute(0, 2, 3, 1)  # channels-last: its NHWC view is contiguous
    per = flat[0].numel()
    return flat.abs().reshape(n, chunks(per), -1).amax(-1).amax(-1).view(n, 1, 1, 1)


def half_conv2d(x: torch.Tensor, weight16: torch.Tensor, weight_scale: float, bias: torch.Tensor | None,
                conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) + bias for an fp32 x, through an fp16 channels-last convolution of x and the weight each scaled into
    [-1, 1]; the result in x's memory format."""
    scale = power_of_two_at_least(image_amax(x))  # per image (module docstring)
    x16 = (x / scale).to(dtype=torch.float16, memory_format=torch.channels_last)  # cuDNN's fast fp16 layout
    y = F.conv2d(x16, weight16, None, conv.stride, conv.padding, conv.dilation, conv.groups).float()
    y = y * (scale * weight_scale)
    y = y if bias is None else y + bias.view(1, -1, 1, 1)
    nchw = x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d.forward through `half_conv2d` (an input that is not 4-D fp32: the layer itself)."""
    if x.dtype != torch.float32 or x.ndim != 4:
        return self._conv_forward(x, self.weight, self.bias)
    return half_conv2d(x, self.weight16, self.weight_scale, self.bias, self)


def use_half_convolutions(module: nn.Module) -> int:
    """Give every zero-padded fp32 nn.Conv2d of `module` the scaled fp16 convolution; returns how many."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and m.weight.dtype == torch.float32]
    for m in layers:
        w = m.weight.detach()
        scale = float(power_of_two_at_least(w.abs().amax()))
        w16 = (w / scale).to(dtype=torch.float16, memory_format=torch.channels_last)
        m.register_buffer("weight16", w16, persistent=False)
        m.weight_scale = scale
        m.forward = types.MethodType(_forward, m)
    return len(layers)
