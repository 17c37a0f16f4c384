"""Probe (issue 14): what the compiled TF32 decode's fp32 activations cost, against a decode that stores them in bf16.

    OUT=results/bench/probes python results/bench/probes/probe_decode_storage.py   # a CUDA GPU; ~4 min cold

The protocol's decode (worlds/sdxl.py VAEDecoder, precision "tf32": fp16 convolutions at TF32's input precision,
fp16 attention products, fp32 sums, normalisations and residual stream) keeps its activations in fp32 between the
convolutions: ~15 ms an image of its ~31 at batch 16 on an H100 went to inductor's normalisation, SiLU and scaling
kernels (profiles/profile-vae-half-everywhere-b16-h100.txt), which move those bytes at memory bandwidth. The bf16
decode (precision "bf16": every tensor 2 bytes) bounds what 2-byte storage could save. This times both compiled, at
batch 16 (random-weight SDXL VAE, 1024 px), `ROUNDS` alternating rounds (default 3), each with its uint8 difference to
the fp32 decode (TF32 off; the keys say "decode tf32 ..., precision=bf16" for the bf16 one), and the two against each
other; with PROFILE=1 (the default) one call of each under the profiler, kernel tables to
$OUT/profile-vae-{tf32,bf16}-storage-b16.txt. Writes $OUT/probe_decode_storage.json.
"""

import json
import os

import torch
from probe_common import profile_decode, time_decodes

from rapm_bench.perf.stages_eval import uint8_difference

out = os.environ.get("OUT", "/tmp")
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
runs = time_decodes(res, "precision", "16", int(os.environ.get("ROUNDS", "3")), n=5, values=("tf32", "bf16"))
for batch, (decoder, latents, images) in runs.items():
    res[f"batch {batch}: bf16 vs tf32"] = uint8_difference(images["bf16"], images["tf32"])
    for precision in ("tf32", "bf16") if os.environ.get("PROFILE", "1") == "1" else ():
        decoder.precision = precision
        profile_decode(decoder, latents, os.path.join(out, f"profile-vae-{precision}-storage-b{batch}.txt"))
with open(os.path.join(out, "probe_decode_storage.json"), "w") as f:
    json.dump(res, f, indent=1)
