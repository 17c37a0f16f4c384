"""The SDXL VAE's attention as two matrix products (issue 14): the decode's one self-attention layer, for TF32.

The VAE's mid-block attends over every latent pixel with one 512-wide head: at 1024 px, 16,384 tokens.
PyTorch's SDPA has no fused kernel for a 512-wide head in fp32 (flash and cuDNN stop at 256 and want half
precision), so it runs the memory-efficient kernel's fp32 SIMT path: on an H100 it took 56 ms of a 288 ms
batch-4 TF32 decode, at 39 TFLOP/s (results/bench/profiles/profile-vae-tf32-b4-sdpa-h100.txt). As two batched
matrix products with the softmax between them, the products run on TF32 tensor cores, the precision the
protocol's `vae_precision="tf32"` declares for every other matrix product and convolution of the decode.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_SCORES = 2**26  # attention scores held at once (256 MB in fp32): the queries go in chunks below this


@torch.compiler.disable  # eager, so cuBLAS runs the products (inductor may match the pattern back to SDPA)
def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_scores: int = MAX_SCORES) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for (B, heads, N, d) inputs, as SDPA without mask or dropout: two batched matrix
    products per chunk of queries (at most `max_scores` scores at once), the softmax in fp32."""
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    kt = k3.transpose(1, 2)
    out = torch.empty_like(q3)
    rows = max(1, max_scores // (b * h * k3.shape[1]))
    for i in range(0, n, rows):
        scores = torch.bmm(q3[:, i : i + rows], kt).mul_(d**-0.5)
        out[:, i : i + rows] = torch.bmm(torch.softmax(scores, -1, dtype=torch.float32).to(v3.dtype), v3)
    return out.view(b, h, n, d)


class GemmAttnProcessor:
    """diffusers' AttnProcessor2_0 for a self-attention without mask (the VAE's), with `gemm_attention` in place
    of SDPA; any other call goes to AttnProcessor2_0 unchanged."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

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
        out = gemm_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_gemm_attention(vae: torch.nn.Module) -> int:
    """Give every attention layer of `vae` a `GemmAttnProcessor`; returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in vae.modules() if isinstance(m, Attention)]
    for m in layers:
        m.set_processor(GemmAttnProcessor())
    return len(layers)
