"""Probe (issue 14): cudnn.benchmark, SDPA backends and channels_last for the SDXL UNet (random weights, bf16,
batch 16, no grad; eager and with compiled blocks) and the VAE decode (TF32, batch 4; eager and compiled).

    OUT=results/bench/probes python results/bench/probes/probe_layouts.py unet,vae   # a CUDA GPU; ~3 min on an H100

Writes $OUT/probe1.json (committed as probe_layouts-<gpu>.json): seconds per call, and the difference to a first
call with torch's default SDPA choice (UNet: relative RMS; VAE: uint8 levels against the fp32 decode). `sdp()`
leaves cuDNN's attention off unless a case names it, so the other rows ran flash attention.
"""

import json
import os
import sys
import time

import torch
from probe_common import cuda_ms

from rapm_bench import regions
from rapm_bench.perf.sdxl import build_unet, build_vae

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
res = {}


def log(*a):
    print(*a, flush=True)


def sdp(flash=True, eff=True, cudnn=False, math=True):
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.backends.cuda.enable_mem_efficient_sdp(eff)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.backends.cuda.enable_math_sdp(math)


which = sys.argv[1] if len(sys.argv) > 1 else "unet,vae"
if "unet" in which:
    B = int(os.environ.get("B", 16))
    unet = build_unet("full", dev, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, 4, 128, 128, device=dev, generator=g, dtype=torch.bfloat16)
    t = torch.full((B,), 500, device=dev)
    ehs = torch.randn(B, 77, 2048, device=dev, generator=g, dtype=torch.bfloat16)
    add = {
        "text_embeds": torch.randn(B, 1280, device=dev, dtype=torch.bfloat16),
        "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * B, device=dev, dtype=torch.bfloat16),
    }

    @torch.no_grad()
    def fwd(xx=None):
        return unet(x if xx is None else xx, t, ehs, added_cond_kwargs=add, return_dict=False)[0]

    ref = fwd().float()

    def rel(y):
        return float((y.float() - ref).norm() / ref.norm())

    def case(name, **kw):
        t0 = time.time()
        s = cuda_ms(fwd) / 1000
        y = fwd()
        res[f"unet/{name}"] = {"s": s, "per_img": s / B, "rel": rel(y), "wall": time.time() - t0}
        log(
            f"unet b{B} {name}: {s * 1000:.1f} ms ({s / B * 1000:.2f} ms/img) rel {rel(y):.2e} [{time.time() - t0:.0f}s]"
        )

    torch.backends.cudnn.benchmark = False
    sdp()
    case("eager")
    torch.backends.cudnn.benchmark = True
    case("eager+bench")
    sdp(flash=False, eff=False, cudnn=True, math=False)
    try:
        case("eager+bench+cudnnattn")
    except Exception as e:
        log("cudnn attn failed", repr(e)[:300])
    sdp(flash=False, eff=True, cudnn=False, math=False)
    case("eager+bench+effattn")
    sdp()
    unet.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    xs = x
    x = xcl
    case("eager+bench+cl")
    x = xs
    unet.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False
    regions.compile_blocks(unet)
    case("blocks")
    torch.backends.cudnn.benchmark = True
    case("blocks+bench")
    torch._dynamo.reset()
    regions.uncompile_blocks(unet)
    sdp(flash=False, eff=False, cudnn=True, math=False)
    regions.compile_blocks(unet)
    try:
        case("blocks+bench+cudnnattn")
    except Exception as e:
        log("compiled cudnn attn failed", repr(e)[:300])
    sdp()
    torch._dynamo.reset()
    regions.uncompile_blocks(unet)
    unet.to(memory_format=torch.channels_last)
    x = xcl
    regions.compile_blocks(unet)
    case("blocks+bench+cl")
    x = xs
    regions.uncompile_blocks(unet)
    torch._dynamo.reset()
    del unet
    torch.cuda.empty_cache()

if "vae" in which:
    from rapm_bench.precision import tf32

    B = 4
    vae = build_vae("full", dev)
    lat = (
        torch.randn(B, 4, 128, 128, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
        / 0.13025
    )
    import copy

    def mk(cl=False, comp=False):
        net = copy.deepcopy(vae)
        if cl:
            net = net.to(memory_format=torch.channels_last)
        if comp:
            net.post_quant_conv.compile(dynamic=False)
            net.decoder.compile(dynamic=False)
        return net

    def dec(net, cl):
        z = lat.contiguous(memory_format=torch.channels_last) if cl else lat
        with torch.no_grad(), tf32(True):
            im = net.decode(z, return_dict=False)[0].float()
        return (im / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        im = vae.decode(lat, return_dict=False)[0].float()
    ref = (im / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)

    def case(name, net, cl, bench):
        torch.backends.cudnn.benchmark = bench
        t0 = time.time()
        s = cuda_ms(lambda: dec(net, cl), warm=2, n=5) / 1000
        y = dec(net, cl)
        d = (y.int() - ref.int()).abs()
        res[f"vae/{name}"] = {
            "s_per_img": s / B,
            "max": int(d.max()),
            "changed": float((d > 0).float().mean()),
            "wall": time.time() - t0,
        }
        log(
            f"vae tf32 b{B} {name}: {s / B * 1000:.1f} ms/img max {int(d.max())} changed {float((d > 0).float().mean()):.4f} "
            f"[{time.time() - t0:.0f}s]"
        )

    case("eager", vae, False, False)
    case("eager+bench", vae, False, True)
    n = mk(cl=True)
    case("eager+bench+cl", n, True, True)
    case("eager+cl", n, True, False)
    del n
    n = mk(comp=True)
    case("compiled", n, False, False)
    case("compiled+bench", n, False, True)
    del n
    n = mk(cl=True, comp=True)
    case("compiled+bench+cl", n, True, True)
    del n

json.dump(res, open(f"{out}/probe1.json", "w"), indent=1)
log("done")
