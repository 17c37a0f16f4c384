"""Probe (issue 14): the compiled TF32 decode with its upsamplers as 2x2 convolutions (worlds/subpixel.py).

    OUT=results/bench/probes python results/bench/probes/probe_subpixel.py   # a CUDA GPU; ~3 min cold

The SDXL decoder's three upsamplers (nearest 2x, then 3x3) are 2.78 of its 10.47 TFLOP an image at 1024 px; as 2x2
convolutions of the small input they are 1.24, and the repeated input is never written. This times the compiled TF32
decode (worlds/sdxl.py VAEDecoder as `generate` runs it, random-weight SDXL VAE) with `subpixel_upsample` off and on at
batch 16 (DECODE_BATCHES), `ROUNDS` alternating rounds (default 3), each with its uint8 difference to the fp32 decode
(TF32 off), and the two against each other; with PROFILE=1 (the default) one call of each under the profiler, kernel
tables to $OUT/profile-vae-subpixel-{off,on}-b<batch>.txt. Writes $OUT/probe_subpixel.json.
"""

import json
import os

import torch
from probe_common import profile_decode, time_decodes

from rapm_bench.perf.stages_eval import uint8_difference

out = os.environ.get("OUT", "/tmp")
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
runs = time_decodes(res, "subpixel_upsample", "16", int(os.environ.get("ROUNDS", "3")), n=5)
for batch, (decoder, latents, images) in runs.items():
    res[f"batch {batch}: on vs off"] = uint8_difference(images[True], images[False])
    print(f"batch {batch}: on vs off", res[f"batch {batch}: on vs off"], flush=True)
    for on in (False, True) if os.environ.get("PROFILE", "1") == "1" else ():
        decoder.subpixel_upsample = on
        profile_decode(decoder, latents, os.path.join(out, f"profile-vae-subpixel-{'on' if on else 'off'}-b{batch}.txt"))
with open(os.path.join(out, "probe_subpixel.json"), "w") as f:
    json.dump(res, f, indent=1)
