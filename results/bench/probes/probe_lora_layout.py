"""Probe (issue 14): the merged LoRA's eager convolutions and cuDNN's layout transposes in a RAPM iteration.

    OUT=results/bench/probes python results/bench/probes/probe_lora_layout.py   # a CUDA GPU; ~2.5 min a variant, cold cache

The merged iteration's profile (profiles/profile-merged-graphs-gradgraphs-blocks-h100.txt) spends ~25 ms an
iteration in cuDNN's NCHW<->NHWC transposes (6 ms in the plain one): FastLoRA's layers run eagerly between the compiled
blocks, so each LoRA convolution hands cuDNN NCHW tensors. This times one RAPM iteration (the bench's `rapm_setup` and
`rapm_iteration`, as `engine.distill` runs it: the sdxl distill preset, random-weight SDXL, CUDA graphs, compiled
blocks) for each of `VARIANTS` (`<bench RAPM variant>:<nchw|nhwc>`; nhwc puts the UNet's convolution weights in
channels_last before the LoRA is attached, so the merged weights follow). Per variant: the warm-up's seconds (compiles,
graph captures) and the ms of an iteration over `ITERS`, written to $OUT/probe_lora_layout.json after each one.
"""

import json
import os
import time

import torch

from rapm_bench.distill.config import distill_preset
from rapm_bench.perf.config import parse_variant, resolve_bench
from rapm_bench.perf.stages import rapm_iteration, rapm_setup
from rapm_bench.perf.worlds import build_world, set_channels_last

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
iters = int(os.environ.get("ITERS", "8"))
world = build_world(resolve_bench("sdxl"), dev)
dcfg = distill_preset("sdxl")
res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "iterations": iters}
default = "merged/graphs/gradgraphs/blocks:nchw,merged/graphs/gradgraphs/blocks:nhwc,plain/graphs/gradgraphs/blocks:nhwc," \
          "plain/graphs/gradgraphs/blocks:nchw"
for name in os.environ.get("VARIANTS", default).split(","):
    variant, layout = name.split(":")
    set_channels_last(world.inner.unet, layout == "nhwc")
    s = rapm_setup(world, dcfg, parse_variant(variant), 0)
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(3):  # compiles (new strides: new graphs), captures the graphs
            rapm_iteration(world, s, i)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(3, 3 + iters):
            rapm_iteration(world, s, i)
        e1.record()
        torch.cuda.synchronize()
        res[name] = {"warmup_s": round(warm, 1), "ms_per_iteration": round(e0.elapsed_time(e1) / iters, 2),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    finally:
        s.cleanup()
        del s
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(name, res[name], flush=True)
    with open(os.path.join(out, "probe_lora_layout.json"), "w") as f:
        json.dump(res, f, indent=1)
