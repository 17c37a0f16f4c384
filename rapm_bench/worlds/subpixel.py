"""The decoder's nearest 2x upsample and 3x3 convolution as one 2x2 convolution of the small input (issue 14).

diffusers' Upsample2D repeats each pixel 2x2 (nearest) and convolves the result 3x3 with zero padding 1. An output
pixel (2i+a, 2j+b) then reads the input only at rows {i-1, i} (a = 0) or {i, i+1} (a = 1), and likewise for columns:
the 3x3 taps that land on the same input pixel add up. Per output phase (a, b), the layer is a 2x2 convolution of the
input with those summed taps (`subpixel_weight`); all four run as one convolution with 4x the output channels and
padding 1, whose (H+1) x (W+1) outputs, offset by the phase, interleave into the 2H x 2W image (`interleave`).

That is 4 of the 9 products per output value (the SDXL decoder at 1024 px: its three upsamplers are 2.78 of its
10.47 TFLOP an image, 1.24 this way), and the 4x larger repeated input is never written or read. The result is the
layer's in exact arithmetic; in floating point a summed tap rounds once where TF32 rounds each tap (the same 10
mantissa bits). In fp16 with per-image scales the error against float64 is 1.2-1.9x the TF32 layer's, as for
worlds/halfconv.py's convolutions (tests/test_subpixel.py). The compiled TF32 decode's path
(`worlds.sdxl.VAEDecoder.subpixel_upsample`) convolves in fp16 like worlds/halfconv.py's per-image scaled
convolutions when the decoder's other convolutions do ("everywhere"), else in TF32. It is off by default: on an H100
the interleave and the reads of its strided result cost more than the products saved (the decode 16 % slower).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .halfconv import image_amax, power_of_two_at_least

# for output parity a (rows; columns alike): the 3x3 kernel's rows that sum into the 2x2 kernel's rows 0 and 1
PHASE_TAPS: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (((0,), (1, 2)), ((0, 1), (2,)))


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel (O, I, 3, 3) -> the 2x2 kernels of the output phases (a, b) = (0, 0), (0, 1), (1, 0), (1, 1)
    stacked along the output channels, (4·O, I, 2, 2), summed in float64 and returned in the weight's dtype."""
    w = weight.double()
    phases = []
    for rows in PHASE_TAPS:
        r = torch.stack([w[:, :, list(t)].sum(2) for t in rows], 2)  # (O, I, 2, 3)
        for cols in PHASE_TAPS:
            phases.append(torch.stack([r[:, :, :, list(t)].sum(3) for t in cols], 3))  # (O, I, 2, 2)
    return torch.cat(phases, 0).to(weight.dtype)


def interleave(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The phase outputs (N, 4·O, H+1, W+1) of a padding-1 2x2 convolution -> the upsampled layer's (N, O, 2H, 2W):
    phase (a, b) gives the pixels (2i+a, 2j+b) from its outputs offset by (a, b)."""
    p = y.unflatten(1, (2, 2, -1))  # (N, a, b, O, H+1, W+1)
    rows = [torch.stack([p[:, a, b, :, a:a + height, b:b + width] for b in (0, 1)], -1) for a in (0, 1)]
    n, o = y.shape[0], p.shape[3]
    return torch.stack(rows, -3).reshape(n, o, 2 * height, 2 * width)  # (N, O, H, 2, W, 2) -> (N, O, 2H, 2W)


def subpixel_upsample_conv(x: torch.Tensor, weight4: torch.Tensor, bias: torch.Tensor | None,
                           weight4_16: torch.Tensor | None = None, weight_scale: float = 1.0) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) + bias through `subpixel_weight`'s kernels `weight4`; with `weight4_16`
    (those kernels / `weight_scale`, fp16 channels-last) on fp16 tensor cores, x scaled per image into [-1, 1] by a
    power of two and the sums in fp32 (worlds/halfconv.py's `half_conv2d`). The result in x's memory format."""
    h, w = x.shape[-2:]
    if weight4_16 is None:
        y = F.conv2d(x, weight4, None, 1, 1)
    else:
        scale = power_of_two_at_least(image_amax(x))  # per image: x's maximum is the repeated input's
        x16 = (x / scale).to(dtype=torch.float16, memory_format=torch.channels_last)
        y = F.conv2d(x16, weight4_16, None, 1, 1).float() * (scale * weight_scale)
    out = interleave(y, h, w)
    out = out if bias is None else out + bias.view(1, -1, 1, 1)
    nchw = x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)


def _layer_conv(m: nn.Module) -> nn.Module | None:
    """An Upsample2D's 3x3 convolution when the layer is nearest 2x then that convolution (else None)."""
    conv = getattr(m, "conv", None) if getattr(m, "name", "conv") == "conv" else getattr(m, "Conv2d_0", None)
    plain = (getattr(m, "use_conv", False) and not getattr(m, "use_conv_transpose", False)
             and getattr(m, "interpolate", True) and getattr(m, "norm", None) is None)
    if not plain or not isinstance(conv, nn.Conv2d):
        return None
    ok = (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
          and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")
    return conv if ok else None


def _forward(self: nn.Module, hidden_states: torch.Tensor, output_size: int | None = None, *args: object,
             **kwargs: object) -> torch.Tensor:
    """Upsample2D.forward through `subpixel_upsample_conv` for a 4-D fp32 input at 2x (else the layer's own)."""
    if output_size is not None or args or kwargs or hidden_states.ndim != 4 or hidden_states.dtype != torch.float32:
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    conv = _layer_conv(self)
    half = getattr(self, "subpixel_weight16", None)
    return subpixel_upsample_conv(hidden_states, self.subpixel_weight, conv.bias, half, self.subpixel_scale)


def use_subpixel_upsamplers(module: nn.Module, half: bool = False) -> int:
    """Run every nearest-2x-then-3x3 Upsample2D of `module` (fp32 weights) through `subpixel_upsample_conv`, in fp16
    with per-image scales where `half`; returns how many changed."""
    changed = 0
    for m in module.modules():
        conv = _layer_conv(m) if type(m).__name__ == "Upsample2D" else None
        if conv is None or conv.weight.dtype != torch.float32:
            continue
        w4 = subpixel_weight(conv.weight.detach())
        m.register_buffer("subpixel_weight", w4, persistent=False)
        m.subpixel_scale = 1.0
        if half:
            m.subpixel_scale = float(power_of_two_at_least(w4.abs().amax()))
            w16 = (w4 / m.subpixel_scale).to(dtype=torch.float16, memory_format=torch.channels_last)
            m.register_buffer("subpixel_weight16", w16, persistent=False)
        m.forward = types.MethodType(_forward, m)
        changed += 1
    return changed
