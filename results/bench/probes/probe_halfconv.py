"""Probe (issue 14): the TF32 decode's convolutions on fp16 tensor cores, scaled (worlds/halfconv.py).

    OUT=results/bench/probes python results/bench/probes/probe_halfconv.py   # a CUDA GPU; ~4 min

Convolutions are ~73 % of the compiled TF32 decode (profiles/profile-vae-tf32-b4-h100.txt) at ~222 TFLOP/s of
TF32. First (CONVS=1, the default) one 3×3 convolution per decoder stage at batch 16: TF32 (fp32 tensors), fp16
NCHW, fp16 channels_last. Then the whole compiled decode (worlds/sdxl.py VAEDecoder, random-weight SDXL VAE,
DECODE_BATCHES, default 16): TF32 as `generate` runs it, and with `half_convolutions` "bounded" and "everywhere",
ROUNDS rounds (default 2), each against the fp32 decode (TF32 off) in uint8 levels; each half decode against the TF32
one, and its first 4 images decoded one by one against the same in the batch. PROFILE=1: each half decode's kernels,
one call, to $OUT/profile-vae-half-<mode>-b<batch>.txt. Writes $OUT/probe_halfconv.json.
"""

import json
import os

import torch
import torch.nn.functional as F
from probe_common import cuda_ms, time_decodes

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
N = 16
SHAPES = [(512, 512, 128), (512, 512, 256), (256, 256, 512), (128, 128, 1024)]  # (C in, C out, side)


res = {"gpu": torch.cuda.get_device_name(), "convolutions, batch 16": {}}
for cin, cout, side in SHAPES if os.environ.get("CONVS", "1") == "1" else []:
    x = torch.randn(N, cin, side, side, device=dev)
    w = torch.randn(cout, cin, 3, 3, device=dev) / (cin * 9) ** 0.5
    tflop = 2 * N * side * side * cout * cin * 9 / 1e12
    row = {}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    row["tf32"] = cuda_ms(lambda a=x, b=w: F.conv2d(a, b, padding=1))
    x16, w16 = x.half(), w.half()
    row["fp16"] = cuda_ms(lambda a=x16, b=w16: F.conv2d(a, b, padding=1))
    x16c, w16c = x16.contiguous(memory_format=torch.channels_last), w16.contiguous(memory_format=torch.channels_last)
    row["fp16 channels_last"] = cuda_ms(lambda a=x16c, b=w16c: F.conv2d(a, b, padding=1))
    row = {k: {"ms": round(v, 3), "TFLOP/s": round(tflop / v * 1e3)} for k, v in row.items()}
    res["convolutions, batch 16"][f"{cin}->{cout} at {side}"] = row
    print(cin, cout, side, row, flush=True)
    del x, x16, x16c
    torch.cuda.empty_cache()

from rapm_bench.perf.stages_eval import uint8_difference  # noqa: E402

modes = ("", "bounded", "everywhere")  # VAEDecoder.half_convolutions: TF32, fp16 where bounded, fp16 everywhere
runs = time_decodes(res, "half_convolutions", "16", int(os.environ.get("ROUNDS", "2")), n=5, values=modes)
for batch, (decoder, latents, images) in runs.items():
    for mode in modes[1:]:
        decoder.half_convolutions = mode
        if os.environ.get("PROFILE"):  # the half decode's kernels, one call
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decoder(latents)
                torch.cuda.synchronize()
            with open(os.path.join(out, f"profile-vae-half-{mode}-b{batch}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
        res[f"batch {batch}: {mode} vs tf32"] = uint8_difference(images[mode], images[""])
        one = torch.cat([decoder(c) for c in latents[:4].split(1)])  # batch independence of the half decode
        res[f"batch {batch}: {mode}, first 4 one by one vs in the batch"] = uint8_difference(one, images[mode][:4])
        print(mode, res[f"batch {batch}: {mode} vs tf32"],
              res[f"batch {batch}: {mode}, first 4 one by one vs in the batch"], flush=True)
with open(os.path.join(out, "probe_halfconv.json"), "w") as f:
    json.dump(res, f, indent=1)
