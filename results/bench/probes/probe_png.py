"""Probe (issue 14): how fast the host writes SDXL-sized PNGs, on one thread and on several.

    OUT=results/bench/probes python results/bench/probes/probe_png.py   # any machine; ~1 min

`generate` writes every image as a PNG (`generate.png_bytes`, Pillow's default zlib level); at 1024 px that is a
large share of an image's time next to the GPU's ~0.11 s. Pillow releases the GIL while it compresses, so threads
help. This encodes IMAGES (env, default 32) 1024² images — smooth ones (bilinear upsampled noise, closer to photos
than white noise) — on 1, 2, 4, 8 and 16 threads, and writes $OUT/probe_png-<CPUs>cpu.json (images/s each, the
machine's CPU count).
"""

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rapm_bench.generate import png_bytes

out = os.environ.get("OUT", "/tmp")
n = int(os.environ.get("IMAGES", "32"))
gen = torch.Generator().manual_seed(0)
images = [torch.nn.functional.interpolate(torch.rand(1, 3, 64, 64, generator=gen), size=(1024, 1024),
                                          mode="bilinear")[0].mul(255).round().to(torch.uint8) for _ in range(n)]
res = {"host": platform.node(), "cpu_count": os.cpu_count(), "images": n, "mb_per_png": None, "images_per_s": {}}
res["mb_per_png"] = round(len(png_bytes(images[0])) / 1e6, 2)
for threads in (1, 2, 4, 8, 16):
    if threads > (os.cpu_count() or 1):
        break
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(png_bytes, images))
        res["images_per_s"][threads] = round(n / (time.perf_counter() - t0), 2)
    print(threads, res["images_per_s"][threads], flush=True)
with open(os.path.join(out, f"probe_png-{os.cpu_count()}cpu.json"), "w") as f:
    json.dump(res, f, indent=1)
