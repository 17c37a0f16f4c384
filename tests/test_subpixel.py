"""The decoder's upsamplers as 2x2 convolutions of the small input (worlds/subpixel.py): the layer's result, TF32's
accuracy in fp16, images independent of their batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.tolerances import tf32_rounded
from torch import nn

from rapm_bench.worlds.subpixel import subpixel_upsample_conv, subpixel_weight, use_subpixel_upsamplers


def upsampled_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' Upsample2D: nearest 2x, then the 3x3 convolution with zero padding 1."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("shape", [(2, 8, 6, 5, 7), (1, 3, 4, 1, 1), (3, 16, 16, 8, 8)])
def test_subpixel_is_the_upsampled_convolution_exactly_in_float64(shape):
    """In float64 the 2x2 phase convolutions give the upsampled layer's result to round-off (odd and 1x1 inputs,
    several images), with and without bias, and keep a channels-last input's memory format."""
    n, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(cout, generator=gen, dtype=torch.float64)
    w4 = subpixel_weight(weight)
    assert w4.shape == (4 * cout, cin, 2, 2)
    for b in (None, bias):
        torch.testing.assert_close(subpixel_upsample_conv(x, w4, b), upsampled_conv(x, weight, b), rtol=1e-12,
                                   atol=1e-12)
    last = subpixel_upsample_conv(x.contiguous(memory_format=torch.channels_last), w4, bias)
    assert last.is_contiguous(memory_format=torch.channels_last) or min(h, w) == 1
    torch.testing.assert_close(last, upsampled_conv(x, weight, bias), rtol=1e-12, atol=1e-12)


def test_subpixel_weight_sums_the_taps_that_read_one_pixel():
    """Each phase's 2x2 kernel holds the 3x3 taps that land on each input pixel: the four phases together hold each
    tap four times over (every tap reads some pixel in every phase), and phase (0, 0)'s corner is the kernel's."""
    weight = torch.arange(9.0).view(1, 1, 3, 3)
    w4 = subpixel_weight(weight)
    assert torch.equal(w4.sum((1, 2, 3)), torch.full((4,), weight.sum().item()))
    assert w4[0, 0, 0, 0] == weight[0, 0, 0, 0] and w4[3, 0, 1, 1] == weight[0, 0, 2, 2]
    assert w4[0, 0, 1, 1] == weight[0, 0, 1:, 1:].sum()


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e30])
def test_half_subpixel_is_as_accurate_as_tf32_at_any_magnitude(magnitude):
    """In fp16 with per-image scales the error against the float64 layer is within 2.5x that of the TF32 layer (each
    tap and input rounded to 10 mantissa bits), at input magnitudes far past fp16's range."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 64, 9, 10, generator=torch.Generator().manual_seed(1)) * magnitude
    exact = upsampled_conv(x.double(), conv.weight.double(), None)  # no bias: its fp32 add would dominate at 1e-6
    tf32 = upsampled_conv(tf32_rounded(x).double(), tf32_rounded(conv.weight).double(), None)
    w4 = subpixel_weight(conv.weight)
    scale = 2.0 ** float(torch.ceil(torch.log2(w4.abs().amax())))
    got = subpixel_upsample_conv(x, w4, None, (w4 / scale).half(), scale)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err, tf32_err = (got.double() - exact).abs().max(), (tf32 - exact).abs().max()
    assert err <= 2.5 * tf32_err, (float(err), float(tf32_err))


def upsampler(channels: int = 32) -> nn.Module:
    """A diffusers Upsample2D as the SDXL decoder builds it (nearest 2x, then a 3x3 convolution)."""
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    return Upsample2D(channels, use_conv=True, out_channels=channels).eval().requires_grad_(False)


def test_half_subpixel_images_do_not_depend_on_their_batch():
    """An image's output is the same alone and beside an image a million times larger (scales are per image)."""
    layer = upsampler()
    assert use_subpixel_upsamplers(layer, half=True) == 1
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 32, 6, 6, generator=gen)
    big = torch.randn(1, 32, 6, 6, generator=gen) * 1e6
    torch.testing.assert_close(layer(torch.cat([x, big]))[:1], layer(x), rtol=0, atol=0)


def test_patched_upsampler_keeps_the_layers_other_calls():
    """A patched Upsample2D gives the layer's own result for an explicit output size and for an input that is not
    fp32, and adds no weights to its state dict."""
    layer = upsampler()
    plain = copy.deepcopy(layer)
    use_subpixel_upsamplers(layer)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 32, 5, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x, output_size=(9, 11)), plain(x, output_size=(9, 11)), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    as64 = copy.deepcopy(layer).double()  # not fp32: the layer's own forward
    torch.testing.assert_close(as64(x.double()), copy.deepcopy(plain).double()(x.double()), rtol=0, atol=0)


def test_patched_upsampler_compiles_as_one_graph():
    """The compiled decode traces a patched upsampler (fp16, per-image scales) whole: one graph, no break, and
    dynamo's aot_eager backend gives the eager output exactly."""
    from rapm_bench.worlds.halfconv import use_half_convolutions

    layer = upsampler()
    use_half_convolutions(layer, everywhere=True)
    use_subpixel_upsamplers(layer, half=True)
    x = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_subpixel_upsamplers_on_the_sdxl_decoder():
    """Every upsampler of an SDXL-architecture decoder changes (three); in fp32 the decode stays the decoder's to
    round-off, and with fp16 convolutions everywhere within one level of the fp32 decode on a few per cent of the
    values, like worlds/halfconv.py's alone."""
    from rapm_bench.bench import build_sdxl_vae, uint8_difference
    from rapm_bench.worlds.halfconv import use_half_convolutions

    vae = build_sdxl_vae(True, torch.device("cpu"))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 4

    def decode(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return net.decode(z, return_dict=False)[0]

    def images(net: nn.Module) -> torch.Tensor:
        return (decode(net) / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    reference = decode(vae)
    sub = copy.deepcopy(vae)
    upsamplers = [m for m in sub.decoder.modules() if type(m).__name__ == "Upsample2D"]
    assert use_subpixel_upsamplers(sub.decoder) == len(upsamplers) == 3
    torch.testing.assert_close(decode(sub), reference, rtol=1e-4, atol=1e-4)
    half = copy.deepcopy(vae)
    use_half_convolutions(half.decoder, everywhere=True)
    assert use_subpixel_upsamplers(half.decoder, half=True) == 3
    diff = uint8_difference(images(half), images(vae))
    assert diff["max"] <= 1 and diff["changed_share"] < 0.1, diff


def test_vae_decoder_patches_its_upsamplers_only_when_asked(monkeypatch):
    """The compiled TF32 decode's network has subpixel upsamplers with `subpixel_upsample` on: fp16 ones beside the
    fp16 convolutions everywhere, TF32 ones beside the bounded; none when it is off (the default) or for bf16."""
    from rapm_bench.bench import build_sdxl_vae
    from rapm_bench.worlds.sdxl import SUBPIXEL_UPSAMPLE, VAEDecoder

    monkeypatch.setattr(VAEDecoder, "compiled", lambda self: True)  # as on a GPU (the graphs compile lazily)
    dec = VAEDecoder(build_sdxl_vae(True, torch.device("cpu")))
    assert dec.subpixel_upsample is SUBPIXEL_UPSAMPLE is False

    def patched(**fields: object) -> list[bool | None]:
        for name, value in fields.items():
            setattr(dec, name, value)
        ups = [m for m in dec.network().decoder.modules() if type(m).__name__ == "Upsample2D"]
        return [None if "subpixel_weight" not in m._buffers else "subpixel_weight16" in m._buffers for m in ups]

    assert patched() == [None] * 3
    assert patched(subpixel_upsample=True, half_convolutions="everywhere") == [True] * 3
    assert patched(half_convolutions="bounded") == [False] * 3
    assert patched(precision="bf16") == [None] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_subpixel_decode_is_as_close_to_fp32_as_without():
    """On a GPU the compiled TF32 decode with the subpixel upsamplers (fp16 convolutions everywhere, and none) stays
    within one level of the exact fp32 decode, on at most a few points more of the values than without them."""
    from helpers.sdxl import decode_differences

    without, *withs = decode_differences("cuda", {"subpixel_upsample": False},
                                         {"subpixel_upsample": True},
                                         {"subpixel_upsample": True, "half_convolutions": ""})
    for diff in withs:
        assert diff["max"] <= 1 and diff["changed_share"] <= without["changed_share"] + 0.03, (diff, without)
