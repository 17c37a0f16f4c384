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
from probe_common import cuda_ms, time_decodes

from rapm_bench.worlds.groupnorm import chunked_group_norm

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
SHAPES = [(4, 512, 256, 256), (4, 512, 512, 512), (4, 256, 512, 512), (4, 256, 1024, 1024), (4, 128, 1024, 1024)]


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
        ms = cuda_ms(lambda fn=fn, args=args: fn(*args))
        row[name] = {"ms": round(ms, 3), "GB/s": round(gb / ms * 1e3)}
        if not name.startswith("floor"):
            row[name]["max_abs_diff_fp64"] = float((fn(*args).double() - exact).abs().max())
    res["x".join(map(str, shape))] = row
    print(shape, row, flush=True)
    del x, exact
    torch.cuda.empty_cache()
time_decodes(res, "chunked_group_norm", "4,16")
with open(os.path.join(out, "probe_groupnorm.json"), "w") as f:
    json.dump(res, f, indent=1)
