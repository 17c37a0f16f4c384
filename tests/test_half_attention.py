"""The TF32 decode's attention on fp16 tensor cores (worlds/attention.py `half_gemm_attention`): TF32's accuracy at any
magnitude, no overflow, an image independent of its batch, and a decode through it within a level of fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.tolerances import tf32_rounded
from torch import nn

from rapm_bench.worlds.attention import (
    SOFTMAX_SCALE,
    gemm_attention,
    half_bmm,
    half_gemm_attention,
    has_fp32_out_bmm,
    matrix_scale,
    softmax_to_half,
    use_gemm_attention,
)


def tf32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`gemm_attention` as TF32 tensor cores compute it: each product's inputs rounded to 10 mantissa bits."""
    scores = tf32_rounded(q) @ tf32_rounded(k).transpose(-1, -2) * q.shape[-1] ** -0.5
    return tf32_rounded(torch.softmax(scores, -1)) @ tf32_rounded(v)


def qkv(b: int = 2, n: int = 96, d: int = 32, sharpness: float = 1.0, magnitude: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, 1, n, d, generator=g) for _ in range(3))
    return q * sharpness * magnitude, k * sharpness / magnitude, v * magnitude


def test_matrix_scale_is_the_power_of_two_at_least_each_matrix_max():
    t = torch.tensor([[[0.3, -5.0], [1.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]], [[1e-3, 4.0], [-4.0, 1.0]]])
    got = matrix_scale(t)
    assert got.shape == (3, 1, 1) and got.dtype == torch.float32
    assert got.flatten().tolist() == [8.0, torch.finfo(torch.float32).tiny, 4.0]


def test_half_bmm_sums_exact_products_in_fp32():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 5, 7, generator=g).half(), torch.randn(3, 7, 4, generator=g).half())
    got = half_bmm(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)


def test_this_torch_has_the_fp32_out_bmm():
    """torch >= 2.8 has aten::bmm.dtype (the CI's and the GPU machine's); older ones keep the TF32 products."""
    assert has_fp32_out_bmm() == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8))


def test_softmax_to_half_scales_probabilities_into_fp16():
    scores = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)) * 30
    scale = torch.tensor([0.5, 2.0]).view(2, 1, 1)
    got = softmax_to_half(scores, scale)
    assert got.dtype == torch.float16 and torch.isfinite(got).all() and got.max() <= SOFTMAX_SCALE
    torch.testing.assert_close(got.float() / SOFTMAX_SCALE, torch.softmax(scores * scale, -1), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("sharpness", [1.0, 3.0])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6])
def test_half_attention_is_as_accurate_as_tf32(sharpness, magnitude):
    """Against float64 SDPA, fp16 products with per-matrix power-of-two scales err at most 2.5x what TF32's input
    rounding does, from flat to peaked softmaxes and at input magnitudes from 1e-6 to 1e6 (past fp16's range both
    ways, where plain fp16 gives NaN); any chunking of the queries is as accurate (a chunk's fp32 round-off can flip
    an fp16 rounding of a probability, so not bit for bit)."""
    q, k, v = qkv(sharpness=sharpness, magnitude=magnitude)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    tf32_err = (tf32_attention(q.double(), k.double(), v.double()) - exact).abs().max()
    for max_scores in (2**26, 96 * 96, 2 * 96 * 10, 1):  # all at once, one chunk a matrix, ten rows, one row
        got = half_gemm_attention(q, k, v, max_scores)
        assert got.dtype == torch.float32 and got.shape == q.shape
        err = (got.double() - exact).abs().max()
        assert err <= 2.5 * tf32_err, (max_scores, float(err), float(tf32_err))


def test_half_attention_never_overflows_where_plain_fp16_does():
    """Inputs far past fp16's range (1e6) and a softmax concentrated on one key stay finite and accurate."""
    q, k, v = qkv(n=64, sharpness=4.0, magnitude=1.0)
    q, v = q * 1e6, v * 1e6
    k = k * 1e-6
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert not torch.isfinite(F.scaled_dot_product_attention(q.half(), k.half(), v.half()).float()).all()
    got = half_gemm_attention(q, k, v)
    assert torch.isfinite(got).all()
    assert (got.double() - exact).abs().max() <= 2.5 * (tf32_attention(q.double(), k.double(), v.double()) - exact)\
        .abs().max()


def test_half_attention_of_an_image_does_not_depend_on_its_batch():
    q, k, v = qkv(b=3)
    q[2], v[2] = q[2] * 1e4, v[2] * 1e-4  # a batch-mate of very different magnitude changes nothing
    got = half_gemm_attention(q, k, v)
    assert torch.equal(half_gemm_attention(q[:1], k[:1], v[:1]), got[:1])


def test_gemm_attention_processor_with_half_products_decodes_within_a_level_of_fp32():
    """`use_gemm_attention(half=True)` on an SDXL-architecture VAE: its attention layers take the fp16 products and
    the decode stays within one level of the SDPA fp32 decode on a few per cent of the values."""
    from diffusers.models.attention_processor import Attention

    from rapm_bench.bench import build_sdxl_vae, uint8_difference
    from rapm_bench.worlds.attention import GemmAttnProcessor

    vae = build_sdxl_vae(True, torch.device("cpu"))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 4

    def images(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return (net.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    half = copy.deepcopy(vae)
    assert use_gemm_attention(half, half=True) == 2
    procs = [m.processor for m in half.modules() if isinstance(m, Attention)]
    assert all(isinstance(p, GemmAttnProcessor) and p.attention is half_gemm_attention for p in procs)
    diff = uint8_difference(images(half), images(vae))
    assert diff["max"] <= 1 and diff["changed_share"] < 0.1, diff
    plain = copy.deepcopy(vae)
    use_gemm_attention(plain)
    assert all(m.processor.attention is gemm_attention for m in plain.modules() if isinstance(m, Attention))


def test_the_decoder_takes_half_attention_only_compiled_on_a_gpu():
    """On the CPU the TF32 decode is the VAE itself (fp32 = tf32 exactly), whatever `half_attention` says; the bench's
    `/tf32attn` VAE variant and perf.scaling's --no-vae-half-attention switch it off."""
    from rapm_bench.perf.scaling_build import Settings
    from rapm_bench.perf.worlds import set_vae_variant
    from rapm_bench.worlds.sdxl import HALF_ATTENTION, VAEDecoder

    class World:
        decoder = VAEDecoder(nn.Conv2d(4, 3, 1))

        def set_vae_precision(self, precision: str, channels_last: bool = False) -> None:
            self.decoder.precision, self.decoder.channels_last = precision, channels_last

    world = World()
    assert HALF_ATTENTION is True and world.decoder.half_attention is True
    assert world.decoder.network() is world.decoder.vae
    for variant, half in (("tf32", True), ("tf32/tf32attn", False), ("tf32/sdpa", True), ("bf16", True)):
        set_vae_variant(world, variant)
        assert world.decoder.half_attention is half, variant
    assert Settings.__dataclass_fields__["half_attention"].default is HALF_ATTENTION


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_with_half_attention_is_as_close_to_fp32_as_tf32():
    """On a GPU the compiled TF32 decode with its attention on fp16 tensor cores stays within one level of the exact
    fp32 decode, on at most a few points more of the values than with TF32 products; the products equal cuBLAS's fp16
    kernel summed in fp32."""
    from helpers.sdxl import decode_differences

    tf32, half = decode_differences("cuda", {"half_attention": False}, {"half_attention": True})
    assert half["max"] <= 1 and half["changed_share"] <= tf32["changed_share"] + 0.03, (half, tf32)
    q, k, v = (t.cuda() for t in qkv(n=256, d=64))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = (half_gemm_attention(q, k, v).double() - exact).abs().max()
    assert err <= 2.5 * (tf32_attention(q.double(), k.double(), v.double()) - exact).abs().max()
