"""Convolutions on fp16 tensor cores with TF32's input precision, for the VAE decode (issue 14).

TF32 keeps 10 bits of mantissa of each product's inputs; so does fp16, whose tensor cores run twice TF32's rate, but
fp16 spans only 2^-24..65504 and the SDXL VAE's activations overflow it (hence diffusers' `force_upcast`). Two ways
around the range, both convolving in fp16 channels-last with fp32 accumulation and adding the bias in fp32:

- **Bounded inputs** (`bounded_half_conv2d`; `VAEDecoder.half_convolutions = "bounded"`, and part of the default).
  Most of the decoder's convolutions (the resnets' conv1 and conv2, conv_out: 6.96 of its 10.47 TFLOP an image at
  1024 px) read silu(GroupNorm(h)). A group of n elements normalises to |z| ≤ sqrt(n) (Samuelson's inequality), so
  whatever h is, the input is at most B = max|γ|·sqrt(n) + max|β| (SiLU's negative side stays above -0.28): a bound
  from the weights and the shape alone. The input goes to fp16 as it is (scaled by a power of two only where B
  passes 2^15) and each output channel's weights are scaled by the power of two that keeps ‖w_o‖₁·B at most 2^15,
  so no input, weight or output can overflow, and there is no per-image statistic: the cast fuses into the
  normalisation's kernel (which then writes 2 bytes a value instead of 4) and an image's scales are its batch's.
  With "bounded" the other convolutions (conv_in, the upsamplers', the 1×1 shortcuts: 2.9 TFLOP) stay TF32.
- **Per-image scaling** (`half_conv2d`; those other convolutions with `half_convolutions = "everywhere"`, the
  compiled TF32 decode's default from the ninth session of issue 14): each convolution scales its input per image
  and its weight per tensor by powers of two (exact) into [-1, 1] and scales the result back; an output is then at
  most the fan-in (≤ 4,608 in SDXL's decoder). An input below 2^-14 of its image's largest loses bits to fp16's
  subnormals; with a few channels 1e3-1e5 times the rest the error stays within 1.4x TF32's, whose rounding of the
  large channels dominates (tests/test_halfconv.py).

Measured on an H100 at batch 16 (results/bench/probes/probe_halfconv-bounded-h100.json, compiled, random-weight SDXL
VAE): TF32 50.6 ms an image, bounded 40.5, everywhere 35.2; against the fp32 decode (TF32 off) each within one
level, on 4.42 %, 4.94 % and 5.44 % of the values. An earlier everywhere took 81 ms when its per-image maxima ran as
one reduction row per image (profiles/profile-vae-half-b16-h100.txt); `image_amax` reduces over chunks first.
End to end on an H100, in one run each (`python -m rapm_bench.scaling ... --vae-half-convolutions`, 768 images
extrapolated to 30K `eval`): bounded 8.86 images/s, 58.3 min; everywhere 9.33 images/s, 54.9 min.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

LIMIT = 2.0**15  # the bound kept on every fp16 input and output: fp16's largest is 65504, a factor ~2 for round-off
SILU_FLOOR = 0.2785  # -min_y y·sigmoid(y) = 0.27846...


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


def _fp16_conv(scaled: torch.Tensor, weight16: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None,
               conv: nn.Conv2d, like: torch.Tensor) -> torch.Tensor:
    """conv's fp16 channels-last convolution (cuDNN's fast fp16 layout, fp32 sums) of an input already scaled into
    fp16's range, scaled back by `scale` and biased in fp32; the result in `like`'s memory format."""
    x16 = scaled.to(dtype=torch.float16, memory_format=torch.channels_last)
    y = F.conv2d(x16, weight16, None, conv.stride, conv.padding, conv.dilation, conv.groups).float() * scale
    y = y if bias is None else y + bias.view(1, -1, 1, 1)
    nchw = like.is_contiguous() or not like.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)


def half_conv2d(x: torch.Tensor, weight16: torch.Tensor, weight_scale: float, bias: torch.Tensor | None,
                conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) + bias for an fp32 x, through an fp16 channels-last convolution of x and the weight each scaled into
    [-1, 1]; the result in x's memory format."""
    scale = power_of_two_at_least(image_amax(x))  # per image (module docstring)
    return _fp16_conv(x / scale, weight16, scale * weight_scale, bias, conv, x)


def norm_constants(norm: nn.GroupNorm) -> tuple[int, float, float]:
    """(groups, max |γ|, max |β|) of a GroupNorm: what `silu_norm_bound` needs of it."""
    gamma = float(norm.weight.detach().abs().amax()) if norm.weight is not None else 1.0
    beta = float(norm.bias.detach().abs().amax()) if norm.bias is not None else 0.0
    return norm.num_groups, gamma, beta


def silu_norm_bound(norm: tuple[int, float, float], shape: torch.Size) -> float:
    """The largest |silu(GroupNorm(h))| any h of `shape` can give (module docstring), for a GroupNorm's
    `norm_constants`: max |γ|·sqrt(n) + max |β|, n a group's elements."""
    groups, gamma, beta = norm
    n = shape[1] // groups * math.prod(shape[2:])
    return max(gamma * math.sqrt(n) + beta, SILU_FLOOR)


def bounded_half_conv2d(x: torch.Tensor, bound: float, weight_l1: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) for an fp32 x with |x| ≤ `bound` everywhere, through an fp16 channels-last convolution with no
    per-image statistic: x scaled by a fixed power of two only where `bound` passes LIMIT, each output channel's
    weights (L1 norms `weight_l1`) by the power of two that keeps ‖w_o‖₁·bound ≤ LIMIT; the result in x's format."""
    bound = max(bound, 1.0)  # weights never scaled past LIMIT / bound ≤ LIMIT
    p = 2.0 ** max(0, math.ceil(math.log2(bound / LIMIT)))  # fixed by the shape: a Python float
    q = power_of_two_at_least(weight_l1 * (bound / p / LIMIT)).view(-1, 1, 1, 1)  # per output channel
    w16 = (conv.weight / q).to(dtype=torch.float16, memory_format=torch.channels_last)
    return _fp16_conv(x / p if p != 1.0 else x, w16, q.view(1, -1, 1, 1) * p, conv.bias, conv, x)


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d.forward through `half_conv2d` (an input that is not 4-D fp32: the layer itself)."""
    if x.dtype != torch.float32 or x.ndim != 4:
        return self._conv_forward(x, self.weight, self.bias)
    return half_conv2d(x, self.weight16, self.weight_scale, self.bias, self)


def _bounded_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d.forward through `bounded_half_conv2d`, the bound from the GroupNorm before it (else the layer)."""
    if x.dtype != torch.float32 or x.ndim != 4:
        return self._conv_forward(x, self.weight, self.bias)
    return bounded_half_conv2d(x, silu_norm_bound(self.input_norm, x.shape), self.weight_l1, self)


def bounded_convolutions(module: nn.Module) -> dict[nn.Conv2d, nn.GroupNorm]:
    """The convolutions of `module` that read silu(GroupNorm(h)) directly, each with its GroupNorm: diffusers'
    ResnetBlock2D conv1 and conv2 (no resampling, time embedding or dropout between) and a decoder's conv_out."""
    found: dict[nn.Conv2d, nn.GroupNorm] = {}
    for m in module.modules():
        if all(hasattr(m, a) for a in ("norm1", "conv1", "norm2", "conv2", "nonlinearity")):
            plain = (isinstance(m.nonlinearity, nn.SiLU) and getattr(m, "upsample", None) is None
                     and getattr(m, "downsample", None) is None and getattr(m, "time_emb_proj", None) is None
                     and getattr(m, "time_embedding_norm", "default") in ("default", "group")
                     and getattr(getattr(m, "dropout", None), "p", 0.0) == 0.0)
            if plain:
                found |= {m.conv1: m.norm1, m.conv2: m.norm2}
        if all(hasattr(m, a) for a in ("conv_norm_out", "conv_act", "conv_out")) and isinstance(m.conv_act, nn.SiLU):
            found[m.conv_out] = m.conv_norm_out
    return {c: n for c, n in found.items() if isinstance(n, nn.GroupNorm)}


def use_half_convolutions(module: nn.Module, everywhere: bool = False) -> int:
    """Give every zero-padded fp32 nn.Conv2d of `module` that reads silu(GroupNorm(h)) the bounded fp16 convolution,
    and with `everywhere` every other one the per-image scaled one; returns how many changed."""
    def eligible(m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and m.weight.dtype == torch.float32

    bounded = {c: n for c, n in bounded_convolutions(module).items() if eligible(c)}
    for m, norm in bounded.items():
        m.input_norm = norm_constants(norm)  # numbers, not the module (it stays out of the conv's children)
        m.register_buffer("weight_l1", m.weight.detach().abs().sum((1, 2, 3)), persistent=False)
        m.forward = types.MethodType(_bounded_forward, m)
    others = [m for m in module.modules() if eligible(m) and m not in bounded] if everywhere else []
    for m in others:
        w = m.weight.detach()
        scale = float(power_of_two_at_least(w.abs().amax()))
        w16 = (w / scale).to(dtype=torch.float16, memory_format=torch.channels_last)
        m.register_buffer("weight16", w16, persistent=False)
        m.weight_scale = scale
        m.forward = types.MethodType(_forward, m)
    return len(bounded) + len(others)
