"""Probe (issue 14): does generation gain from decoding batch i on a second CUDA stream while the UNet samples batch i+1?

    OUT=results/bench/probes python results/bench/probes/probe_overlap.py   # a CUDA GPU; ~3 min on a cold cache

`generate` runs each batch's four UNet passes (bf16, blocks compiled, CUDA graphs) and then its TF32 VAE decode, one
after the other, and waits for the images on the host in between. The UNet spends ~20 % of its time in memory-bound
kernels (norms, GEGLU) and the decode is TF32 convolutions, so the two might share the GPU. On the random-weight SDXL
architecture at 1024 px this times N batches of BATCH (env, default 16) images:
- "sequential": `generate_batch`'s order (sample, decode, images to the host);
- "overlapped": the decode of batch i and its copy to pinned host memory on a side stream, the UNet of batch i+1 on the
  main one;
- each part alone, and checks that both orders give the same uint8 images, bit for bit.
Writes $OUT/probe_overlap.json.
"""

import json
import os
import time

import torch

from rapm_bench.cudagraphs import graphed_predict
from rapm_bench.generate import sample_latents
from rapm_bench.perf.worlds import RandomSDXLWorld
from rapm_bench.precision import tf32
from rapm_bench.regions import compile_blocks
from rapm_bench.sampling import DDIM_TRAILING

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
BATCH, N = int(os.environ.get("BATCH", "16")), int(os.environ.get("N", "4"))
world = RandomSDXLWorld(False, dev, torch.bfloat16)
compile_blocks(world.unet)
decoder = world.decoder
decoder.precision = "tf32"


def latents(i: int) -> torch.Tensor:
    """Batch i's clean latents (the main stream)."""
    seeds = list(range(i * BATCH, (i + 1) * BATCH))
    return sample_latents(world, [f"probe prompt {s}" for s in seeds], seeds, DDIM_TRAILING, 4, 1.0)


def decode_on_device(lat: torch.Tensor) -> torch.Tensor:
    """VAEDecoder.__call__ without the copy to the host."""
    cfg = decoder.vae.config
    net = decoder.network()
    with tf32(True):
        image = net.decode((lat / cfg.scaling_factor).to(net.dtype), return_dict=False)[0].float()
    return (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)


def sequential() -> list[torch.Tensor]:
    return [decode_on_device(latents(i)).cpu() for i in range(N)]


SIDE = torch.cuda.Stream()
HOST = [torch.empty((BATCH, 3, 1024, 1024), dtype=torch.uint8, pin_memory=True) for _ in range(N)]  # pinned once


def overlapped() -> list[torch.Tensor]:
    side, host = SIDE, HOST
    done = []
    for i in range(N):
        lat = latents(i)  # main stream; its host syncs wait for the main stream only
        ready = torch.cuda.Event()
        ready.record()
        side.wait_event(ready)
        with torch.cuda.stream(side):
            lat.record_stream(side)
            img = decode_on_device(lat)
            host[i].copy_(img, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            done.append(ev)
    for ev in done:
        ev.synchronize()
    return host


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (N * BATCH), r


res = {"gpu": torch.cuda.get_device_name(), "batch": BATCH, "batches": N}
with torch.no_grad(), graphed_predict(world):
    for _ in range(2):  # compiles, captures
        decode_on_device(latents(0)).cpu()
    overlapped()
    lat = latents(0)
    for rnd in range(2):
        s_seq, a = timed(sequential)
        s_ovl, b = timed(overlapped)
        s_unet, _ = timed(lambda: [latents(i) for i in range(N)])
        s_dec, _ = timed(lambda: [decode_on_device(lat) for _ in range(N)])
        same = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        res[f"round {rnd + 1}"] = {"sequential_s_per_image": round(s_seq, 5), "overlapped_s_per_image": round(s_ovl, 5),
                                   "unet_only_s_per_image": round(s_unet, 5), "decode_only_s_per_image": round(s_dec, 5),
                                   "overlapped_over_sequential": round(s_ovl / s_seq, 4), "images_equal": same}
        print(res[f"round {rnd + 1}"], flush=True)
res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
with open(os.path.join(out, "probe_overlap.json"), "w") as f:
    json.dump(res, f, indent=1)
