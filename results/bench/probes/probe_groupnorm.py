"""Probe (issue 14): the VAE decode's GroupNorm + SiLU at the SDXL decoder's shapes (batch 4, fp32, NCHW), compiled.

    OUT=results/bench/probes python results/bench/probes/probe_groupnorm.py   # a CUDA GPU; ~3 min

The TF32 decode's profile (profiles/profile-vae-tf32-b4-h100.txt) puts ~11 ms an image in inductor's GroupNorm
reductions. Per shape this times: inductor's `silu(group_norm(x))`; the same with the statistics split into chunks of
each group (worlds/groupnorm.py); a read-and-write floor (`x * 2`, compiled). Then the whole
TF32 decode (worlds/sdxl.py VAEDecoder, compiled, random-weight SDXL VAE) at batch 4 and 16 (DECODE_BATCHES), two
rounds, with inductor's GroupNorm and with worlds/groupnorm.py's, each against the fp32 decode (TF32 off) in uint8
levels. Writes $OUT/probe_groupnorm.json (ms, GB/s of the one read and one write a fused GroupNorm needs, max
|difference| to float64; the decodes' ms an image).
"""

import json
import os

import torch
import torch.nn.functional as F

from rapm_bench.worlds.groupnorm import chunked_group_norm

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
SHAPES = [(4, 512, 256, 256), (4, 512, 512, 512), (4, 256, 512, 512), (4, 256, 1024, 1024), (4, 128, 1024, 1024)]


def timeit(fn, warm=3, n=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def gn_ref(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-6))


def gn_chunked(x, w, b):
    return F.silu(chunked_group_norm(x, 32, w, b, 1e-6))


res = {"gpu": torch.cuda.get_device_name()}
ref_c = torch.compile(gn_ref, dynamic=False)
chk_c = torch.compile(gn_chunked, dynamic=False)
two_c = torch.compile(lambda x: x * 2, dynamic=False)
for shape in SHAPES:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, generator=g) * 3 + 1
    w = torch.rand(shape[1], device=dev, generator=g) + 0.5
    b = torch.randn(shape[1], device=dev, generator=g)
    exact = gn_ref(x.double(), w.double(), b.double())
    gb = 2 * x.numel() * 4 / 1e9
    row = {}
    for name, fn in (("inductor", ref_c), ("chunked", chk_c), ("floor x*2", two_c)):
        args = (x,) if name.startswith("floor") else (x, w, b)
        ms = timeit(lambda fn=fn, args=args: fn(*args))
        row[name] = {"ms": round(ms, 3), "GB/s": round(gb / ms * 1e3)}
        if not name.startswith("floor"):
            row[name]["max_abs_diff_fp64"] = float((fn(*args).double() - exact).abs().max())
    res["x".join(map(str, shape))] = row
    print(shape, row, flush=True)
    del x, exact
    torch.cuda.empty_cache()
from rapm_bench.perf.sdxl import build_vae  # noqa: E402
from rapm_bench.perf.stages_eval import uint8_difference  # noqa: E402
from rapm_bench.worlds.sdxl import VAEDecoder  # noqa: E402

decoder = VAEDecoder(build_vae("full", dev))
for batch in map(int, os.environ.get("DECODE_BATCHES", "4,16").split(",")):
    latents = torch.randn(batch, 4, 128, 128, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    decoder.precision = "fp32"
    reference = torch.cat([decoder(c) for c in latents.split(4)])
    for rnd in range(2):
        for chunked in (False, True):
            decoder.precision, decoder.chunked_group_norm = "tf32", chunked
            images = decoder(latents)  # compiles in the first round
            ms = timeit(lambda latents=latents: decoder(latents), warm=2, n=6) / batch
            key = f"decode tf32 batch {batch}, chunked_group_norm={chunked}, round {rnd + 1}"
            res[key] = {"ms_per_image": round(ms, 2)} | uint8_difference(images, reference)
            print(key, res[key], flush=True)
with open(os.path.join(out, "probe_groupnorm.json"), "w") as f:
    json.dump(res, f, indent=1)
