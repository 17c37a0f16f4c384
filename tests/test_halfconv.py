"""The scaled fp16 convolutions of the TF32 decode (worlds/halfconv.py): TF32's accuracy, no overflow, images
independent of their batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rapm_bench.worlds.halfconv import half_conv2d, power_of_two_at_least, use_half_convolutions


def tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to TF32's 10 explicit mantissa bits (as TF32 tensor cores read their inputs)."""
    m, e = torch.frexp(t)
    return torch.ldexp(torch.round(m * 2048) / 2048, e)


def layer(cin: int = 64, cout: int = 32, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False)


def test_power_of_two_at_least():
    """Exact powers of two at or just around amax; zero maps to the smallest normal number (a zero input stays 0)."""
    got = power_of_two_at_least(torch.tensor([1.0, 1.5, 3.0, 2.0**-30, 2.0**100, 0.0]))
    want = torch.tensor([1.0, 2.0, 4.0, 2.0**-30, 2.0**100, torch.finfo(torch.float32).tiny])
    assert torch.equal(got, want)


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e4, 1e30])
def test_half_conv_is_as_accurate_as_tf32_at_any_magnitude(magnitude):
    """Against the float64 convolution the error is within 2.5x that of TF32-rounded inputs, at input magnitudes
    from 1e-6 to 1e30, far past fp16's 65504 (where an unscaled fp16 convolution overflows)."""
    conv = layer()
    x = torch.randn(2, 64, 12, 12, generator=torch.Generator().manual_seed(1)) * magnitude
    exact = F.conv2d(x.double(), conv.weight.double(), None, padding=1)
    tf32 = F.conv2d(tf32_rounded(x).double(), tf32_rounded(conv.weight).double(), None, padding=1)
    ws = float(power_of_two_at_least(conv.weight.abs().amax()))
    got = half_conv2d(x, (conv.weight / ws).half(), ws, None, conv)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err, tf32_err = (got.double() - exact).abs().max(), (tf32 - exact).abs().max()
    assert err <= 2.5 * tf32_err, (float(err), float(tf32_err))
    if magnitude > 65504:
        assert not torch.isfinite(F.conv2d(x.half(), conv.weight.half(), None, padding=1)).all()


def test_half_conv_adds_the_bias_in_fp32():
    """With the bias: the unbiased result plus the bias, in fp32."""
    conv = layer()
    x = torch.randn(2, 64, 12, 12, generator=torch.Generator().manual_seed(3))
    w16, ws = conv.weight.half(), 1.0
    torch.testing.assert_close(half_conv2d(x, w16, ws, conv.bias, conv),
                               half_conv2d(x, w16, ws, None, conv) + conv.bias.view(1, -1, 1, 1), rtol=0, atol=0)


def test_half_conv_images_do_not_depend_on_their_batch():
    """An image's output is the same alone and beside an image a million times larger (scales are per image)."""
    conv = layer()
    use_half_convolutions(conv)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, 12, 12, generator=gen)
    big = torch.randn(1, 64, 12, 12, generator=gen) * 1e6
    torch.testing.assert_close(conv(torch.cat([x, big]))[:1], conv(x), rtol=0, atol=0)


def test_use_half_convolutions_on_the_sdxl_decoder():
    """Every convolution of an SDXL-architecture VAE's decoder changes; its decode stays within one level of the
    fp32 decode on a few per cent of the values; an unbatched input passes through the layer's own convolution."""
    from rapm_bench.bench import build_sdxl_vae, uint8_difference

    vae = build_sdxl_vae(True, torch.device("cpu"))
    half = copy.deepcopy(vae)
    convs = [m for m in half.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert use_half_convolutions(half.decoder) == len(convs) > 0
    assert all(m.weight16.dtype == torch.float16 and "weight16" not in m.state_dict() for m in convs)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 4

    def images(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return (net.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    diff = uint8_difference(images(half), images(vae))
    assert diff["max"] <= 1 and diff["changed_share"] < 0.1, diff
    x = torch.randn(convs[0].in_channels, 8, 8)
    torch.testing.assert_close(convs[0](x), convs[0]._conv_forward(x, convs[0].weight, convs[0].bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_half_decode_is_as_close_to_fp32_as_tf32():
    """On a GPU the compiled TF32 decode with scaled fp16 convolutions stays within one level of the exact fp32
    decode, on at most a few points more of the values than the TF32 decode's."""
    from helpers.sdxl import decode_differences

    tf32, half = decode_differences("cuda", {}, {"half_convolutions": True})
    assert half["max"] <= 1 and half["changed_share"] <= tf32["changed_share"] + 0.03, (half, tf32)
