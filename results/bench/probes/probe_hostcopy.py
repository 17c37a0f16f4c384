"""Probe (issue 14): the decoded images to the host through pinned memory (`rapm_bench/transfer.py` `to_pinned_host`; worlds/sdxl.py until 2026-12-08).

    OUT=results/bench/probes python results/bench/probes/probe_hostcopy.py   # a CUDA GPU; ~2 min

The batch-16 decode's profile (profiles/profile-vae-half-bounded-b16-h100.txt) spent 25 ms of a 637 ms call in the
pageable copy of its 50 MB of uint8 images to the host (~2 GB/s). Here the compiled TF32 decode (random-weight SDXL
VAE, DECODE_BATCHES, default 16), its images to the host pageable and pinned (`VAEDecoder.pinned_host`), ROUNDS
rounds (default 2), and one 50 MB copy alone each way. Writes $OUT/probe_hostcopy.json.
"""

import json
import os

import torch
from probe_common import cuda_ms, time_decodes

from rapm_bench.transfer import to_pinned_host

out = os.environ.get("OUT", "/tmp")
res = {"gpu": torch.cuda.get_device_name()}
images = torch.randint(0, 256, (16, 3, 1024, 1024), dtype=torch.uint8, device="cuda")
res["copy of 16 images, pageable ms"] = round(cuda_ms(lambda: images.cpu()), 2)
res["copy of 16 images, pinned ms"] = round(cuda_ms(lambda: to_pinned_host(images)), 2)
print(res, flush=True)
time_decodes(res, "pinned_host", "16", int(os.environ.get("ROUNDS", "2")), n=5)
with open(os.path.join(out, "probe_hostcopy.json"), "w") as f:
    json.dump(res, f, indent=1)
