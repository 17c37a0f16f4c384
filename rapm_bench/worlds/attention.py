"""The SDXL VAE's attention as two matrix products (issue 14): the decode's one self-attention layer, for TF32.

The VAE's mid-block attends over every latent pixel with one 512-wide head: at 1024 px, 16,384 tokens.
PyTorch's SDPA has no fused kernel for a 512-wide head in fp32 (flash and cuDNN stop at 256 and want half
precision), so it runs the memory-efficient kernel's fp32 SIMT path: on an H100 it took 56 ms of a 288 ms
batch-4 TF32 decode, at 39 TFLOP/s (results/bench/profiles/profile-vae-tf32-b4-sdpa-h100.txt). As two batched
matrix products with the softmax between them, the products run on TF32 tensor cores, the precision the
protocol's `vae_precision="tf32"` declares for every other matrix product and convolution of the decode.

`half_gemm_attention` (the compiled TF32 decode's default, `VAEDecoder.half_attention`) runs both products on fp16
tensor cores at TF32's input precision, as worlds/halfconv.py does for the convolutions: q, k and v are scaled per
image and head by powers of two into [-1, 1] (exact), the probabilities (at most 1) by 2^15, both products sum in
fp32, and the scores' rescale and scale fuse into the softmax's compiled kernel, which writes fp16 probabilities.
On an H100 at batch 16 (results/bench/probes/probe_attention-h100.json): the attention 4.35 -> 2.32 ms an image with
the same error against float64 as the TF32 products (an eager softmax: 4.76), the compiled decode 33.3 -> 31.4 ms
an image, within one level of fp32 on 5.444 % of the values against 5.441 %.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_SCORES = 2**26  # attention scores held at once (256 MB in fp32): the queries go in chunks below this
SOFTMAX_SCALE = 2.0**15  # probabilities times this (exact) stay in fp16's normal range down to ~1.9e-9, below 65504


@torch.compiler.disable  # eager, so cuBLAS runs the products (inductor may match the pattern back to SDPA)
def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_scores: int = MAX_SCORES) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for (B, heads, N, d) inputs, as SDPA without mask or dropout: two batched matrix
    products per chunk of queries (at most `max_scores` scores at once), the softmax in fp32."""
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    kt = k3.transpose(1, 2)
    out = torch.empty_like(q3)
    zero = q3.new_zeros(1, 1, 1)  # baddbmm's ignored input (beta=0)
    rows = max(1, max_scores // (b * h * k3.shape[1]))
    for i in range(0, n, rows):
        # the 1/√d scale as the product's alpha, in its fp32 epilogue, instead of a pass over the scores: the same
        # fp32 numbers (probe_attention-h100.json: the same error against float64), 4.35 -> 3.76 ms an image (H100)
        scores = torch.baddbmm(zero, q3[:, i : i + rows], kt, beta=0, alpha=d**-0.5)
        out[:, i : i + rows] = torch.bmm(torch.softmax(scores, -1, dtype=torch.float32).to(v3.dtype), v3)
    return out.view(b, h, n, d)


def matrix_scale(t: torch.Tensor) -> torch.Tensor:
    """The power of two at least max|t| of each matrix of a (M, n, d) tensor, (M, 1, 1) fp32 (halfconv's per-image
    maximum, reduced over chunks of each matrix)."""
    from .halfconv import image_amax, power_of_two_at_least

    return power_of_two_at_least(image_amax(t.contiguous()).float()).view(t.shape[0], 1, 1)


def has_fp32_out_bmm() -> bool:
    """Whether this torch has `torch.bmm(..., out_dtype=torch.float32)` for fp16 inputs on CUDA (torch >= 2.8);
    without it the decode keeps its TF32 products."""
    return "dtype" in torch.ops.aten.bmm.overloads()


def half_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for fp16 (M, n, k) and (M, k, p), summed and returned in fp32: cuBLAS's fp16 tensor-core product on CUDA;
    elsewhere the same products in fp32 (two fp16 values multiply exactly in fp32)."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _softmax_to_half(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """softmax(scores·scale) over the last dimension, times SOFTMAX_SCALE, in fp16 (the softmax in fp32)."""
    return (torch.softmax(scores * scale, -1) * SOFTMAX_SCALE).to(torch.float16)


_compiled_softmax_to_half: Any = None


def softmax_to_half(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_softmax_to_half`, compiled on CUDA into one kernel that reads the fp32 scores once and writes fp16."""
    global _compiled_softmax_to_half
    if not scores.is_cuda:
        return _softmax_to_half(scores, scale)
    if _compiled_softmax_to_half is None:
        _compiled_softmax_to_half = torch.compile(_softmax_to_half, dynamic=False)
    return _compiled_softmax_to_half(scores, scale)


@torch.compiler.disable  # eager products (cuBLAS's fp16 kernels); the softmax compiles on its own
def half_gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_scores: int = MAX_SCORES) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for (B, heads, N, d) fp32 inputs with both products on fp16 tensor cores: q, k, v scaled per
    (image, head) by powers of two into [-1, 1], TF32's 10 mantissa bits each, fp32 sums; the probabilities times
    2^15 in fp16; returns fp32. An image's arithmetic is its own: no scale reads another image."""
    b, h, n, d = q.shape
    m = b * h
    q3, k3, v3 = (t.reshape(m, t.shape[2], d) for t in (q, k, v))
    sq, sk, sv = (matrix_scale(t) for t in (q3, k3, v3))
    q16, v16 = (q3 / sq).to(torch.float16), (v3 / sv).to(torch.float16)
    kt = (k3 / sk).to(torch.float16).transpose(1, 2)
    scale = sq * sk * d**-0.5  # the scores' own scale back, and 1/√d
    out = torch.empty(m, n, d, device=q.device, dtype=torch.float32)
    rows = max(1, max_scores // (m * k3.shape[1]))
    for i in range(0, n, rows):  # |q·kᵀ| ≤ d before the scale; p·2^15 ≤ 2^15 and Σp = 1, so |p·v| ≤ 2^15
        out[:, i : i + rows] = half_bmm(softmax_to_half(half_bmm(q16[:, i : i + rows], kt), scale), v16)
    return out.mul_(sv / SOFTMAX_SCALE).view(b, h, n, d)


class GemmAttnProcessor:
    """diffusers' AttnProcessor2_0 for a self-attention without mask (the VAE's), with `gemm_attention` (or, with
    `half`, `half_gemm_attention`) in place of SDPA; any other call goes to AttnProcessor2_0 unchanged."""

    def __init__(self, half: bool = False) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()
        self.attention = half_gemm_attention if half else gemm_attention

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or args or kwargs:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, hgt, wid = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hgt * wid).transpose(1, 2)
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_gemm_attention(vae: torch.nn.Module, half: bool = False) -> int:
    """Give every attention layer of `vae` a `GemmAttnProcessor` (fp16 products with `half`); returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in vae.modules() if isinstance(m, Attention)]
    for m in layers:
        m.set_processor(GemmAttnProcessor(half))
    return len(layers)
