"""The scaled fp16 convolutions of the TF32 decode (worlds/halfconv.py): TF32's accuracy, no overflow, images
independent of their batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.tolerances import tf32_rounded
from torch import nn

from rapm_bench.worlds.halfconv import (
    LIMIT,
    bounded_convolutions,
    bounded_half_conv2d,
    half_conv2d,
    norm_constants,
    power_of_two_at_least,
    silu_norm_bound,
    use_half_convolutions,
)


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


@pytest.mark.parametrize("outlier", [1e3, 1e5])
def test_half_conv_with_outlier_channels_is_nearly_as_accurate_as_tf32(outlier):
    """Two channels `outlier` times the rest (as in the SDXL VAE's residual stream, which overflows fp16): the per-image
    scale pushes the rest into fp16's subnormals, yet the error stays within 2x TF32's, which the outliers' own
    rounding dominates (measured 1.3-1.4x)."""
    conv = layer()
    x = torch.randn(2, 64, 12, 12, generator=torch.Generator().manual_seed(6))
    x[:, :2] *= outlier
    exact = F.conv2d(x.double(), conv.weight.double(), None, padding=1)
    tf32 = F.conv2d(tf32_rounded(x).double(), tf32_rounded(conv.weight).double(), None, padding=1)
    ws = float(power_of_two_at_least(conv.weight.abs().amax()))
    got = half_conv2d(x, (conv.weight / ws).half(), ws, None, conv)
    err, tf32_err = (got.double() - exact).abs().max(), (tf32 - exact).abs().max()
    assert err <= 2.0 * tf32_err, (float(err), float(tf32_err))


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
    assert use_half_convolutions(conv, everywhere=True) == 1
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, 12, 12, generator=gen)
    big = torch.randn(1, 64, 12, 12, generator=gen) * 1e6
    torch.testing.assert_close(conv(torch.cat([x, big]))[:1], conv(x), rtol=0, atol=0)


def norm_and_conv(seed: int = 0, gamma: float = 3.0) -> tuple[nn.GroupNorm, nn.Conv2d]:
    """A GroupNorm (8 groups, affine weights up to `gamma`) and the 3×3 convolution that reads silu of it."""
    torch.manual_seed(seed)
    norm = nn.GroupNorm(8, 64).requires_grad_(False)
    norm.weight.uniform_(-gamma, gamma)
    norm.bias.uniform_(-1, 1)
    return norm, layer(seed=seed)


def test_silu_norm_bound_holds_and_is_nearly_reached():
    """No input gets silu(GroupNorm(h)) past the bound, and one outlier a group reaches most of it (sqrt(n-1))."""
    norm, _ = norm_and_conv()
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(3, 64, 12, 12, generator=gen) * torch.logspace(-6, 15, 3).view(3, 1, 1, 1)
    h[:, :, 5, 7] += 1e8  # an outlier in every channel
    c = int(norm.weight.abs().argmax())
    spike = torch.zeros(1, 64, 12, 12)
    spike[0, c, 0, 0] = float(norm.weight[c].sign())  # one outlier in the group, on the largest |γ|'s side
    bound = silu_norm_bound(norm_constants(norm), h.shape)
    for x in (h, spike, -spike):
        assert F.silu(norm(x)).abs().max() <= bound
    assert F.silu(norm(spike)).abs().max() >= 0.95 * bound  # |γ|·sqrt(n-1) + β of |γ|·sqrt(n) + |β|


def test_bounded_half_conv_never_overflows_and_is_as_accurate_as_tf32():
    """At the bound, with every input's sign the weight's (each output's largest possible magnitude), the result is
    finite; on silu(GroupNorm(h)) inputs its error against float64 is within 2.5x that of TF32-rounded inputs, and an
    image's result is the same alone as in its batch (no per-image statistic)."""
    norm, conv = norm_and_conv(gamma=2000.0)  # a bound past LIMIT: the input is scaled too
    shape = torch.Size((2, 64, 12, 12))
    bound = silu_norm_bound(norm_constants(norm), shape)
    assert bound > LIMIT
    l1 = conv.weight.abs().sum((1, 2, 3))
    worst = (conv.weight[:2, :, 1, 1].sign() * bound).view(2, 64, 1, 1).expand(shape).contiguous()
    y = bounded_half_conv2d(worst, bound, l1, conv)
    assert torch.isfinite(y).all()
    assert not torch.isfinite(F.conv2d(worst.half(), conv.weight.half(), None, padding=1)).all()
    norm, conv = norm_and_conv(gamma=3.0)
    h = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 50 + 7
    x = F.silu(norm(h))
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    tf32 = F.conv2d(tf32_rounded(x).double(), tf32_rounded(conv.weight).double(), conv.bias.double(), padding=1)
    got = bounded_half_conv2d(x, silu_norm_bound(norm_constants(norm), shape), conv.weight.abs().sum((1, 2, 3)), conv)
    err, tf32_err = (got.double() - exact).abs().max(), (tf32 - exact).abs().max()
    assert got.dtype == torch.float32 and err <= 2.5 * tf32_err, (float(err), float(tf32_err))
    alone = bounded_half_conv2d(x[1:], silu_norm_bound(norm_constants(norm), shape), conv.weight.abs().sum((1, 2, 3)),
                                conv)
    assert torch.equal(alone, got[1:])


def test_use_half_convolutions_on_the_sdxl_decoder():
    """By default the decoder's resnet convolutions and conv_out (the ones reading silu(GroupNorm)) change, with
    `everywhere` every convolution; either decode stays within one level of the fp32 decode on a few per cent of the
    values; an unbatched input passes through the layer itself."""
    from rapm_bench.bench import build_sdxl_vae, uint8_difference

    vae = build_sdxl_vae(True, torch.device("cpu"))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 4

    def images(net: nn.Module, latents: torch.Tensor = z) -> torch.Tensor:
        with torch.no_grad():
            return (net.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    reference = images(vae)
    convs = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    resnets = [m for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D"]
    expected = {id(c) for r in resnets for c in (r.conv1, r.conv2)} | {id(vae.decoder.conv_out)}
    assert {id(c) for c in bounded_convolutions(vae.decoder)} == expected
    for everywhere in (False, True):
        half = copy.deepcopy(vae)
        changed = use_half_convolutions(half.decoder, everywhere=everywhere)
        assert changed == (len(convs) if everywhere else len(expected)) and len(expected) < len(convs)
        mine = [m for m in half.decoder.modules() if isinstance(m, nn.Conv2d)]
        assert all("weight16" not in m.state_dict() and "weight_l1" not in m.state_dict() for m in mine)
        diff = uint8_difference(images(half), reference)
        assert diff["max"] <= 1 and diff["changed_share"] < 0.1, diff
    x = torch.randn(mine[0].in_channels, 8, 8)
    torch.testing.assert_close(mine[0](x), mine[0]._conv_forward(x, mine[0].weight, mine[0].bias))


def test_bench_vae_variants_name_the_fp16_convolutions(monkeypatch):
    """The bench's VAE variant flags set the decoder's fp16 convolutions: none (/tf32conv), the normalised ones
    (/bounded), all (/halfall), or the decoder's default; perf.scaling's default is that default too."""
    from rapm_bench.perf.scaling_build import Settings
    from rapm_bench.perf.worlds import set_vae_variant
    from rapm_bench.worlds.sdxl import HALF_CONVOLUTIONS, VAEDecoder

    class World:  # the one method set_vae_variant calls besides the decoder's fields
        decoder = VAEDecoder(nn.Conv2d(4, 3, 1))

        def set_vae_precision(self, precision: str, channels_last: bool = False) -> None:
            self.decoder.precision, self.decoder.channels_last = precision, channels_last

    world = World()
    for variant, half in (("tf32", HALF_CONVOLUTIONS), ("tf32/tf32conv", ""), ("tf32/sdpa/tf32conv", ""),
                          ("tf32/bounded", "bounded"), ("tf32/halfall", "everywhere"), ("bf16", HALF_CONVOLUTIONS)):
        assert set_vae_variant(world, variant) == variant.split("/")[0]
        assert world.decoder.half_convolutions == half, variant
    assert VAEDecoder(nn.Conv2d(4, 3, 1)).half_convolutions == HALF_CONVOLUTIONS == "everywhere"
    assert Settings.__dataclass_fields__["half_convolutions"].default == HALF_CONVOLUTIONS
    monkeypatch.setattr("rapm_bench.worlds.sdxl.HALF_CONVOLUTIONS", "bounded")  # as perf.scaling's worker sets it
    set_vae_variant(world, "tf32")
    assert world.decoder.half_convolutions == VAEDecoder(nn.Conv2d(4, 3, 1)).half_convolutions == "bounded"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_half_decode_is_as_close_to_fp32_as_tf32():
    """On a GPU the compiled TF32 decode with fp16 convolutions (bounded ones, and everywhere) stays within one level
    of the exact fp32 decode, on at most a few points more of the values than the TF32 decode's."""
    from helpers.sdxl import decode_differences

    tf32, *halves = decode_differences("cuda", {"half_convolutions": ""}, {"half_convolutions": "bounded"},
                                       {"half_convolutions": "everywhere"})
    for half in halves:
        assert half["max"] <= 1 and half["changed_share"] <= tf32["changed_share"] + 0.03, (half, tf32)
