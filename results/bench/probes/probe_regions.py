"""Probe (issue 14): which regions of the SDXL UNet to compile for its no-grad passes (generation, trajectories).

    OUT=results/bench/probes python results/bench/probes/probe_regions.py   # a CUDA GPU; ~5 min on a cold cache

The batch-16 UNet profile (profiles/profile-unet-b16-h100.txt) shows eager kernels between the compiled blocks
(regions.BLOCKS): each Transformer2DModel's GroupNorm, the copies that change its layout around proj_in and proj_out,
and its residual add. This times the random-weight SDXL UNet (bf16, batch `BATCH`, no grad) in each of `VARIANTS`
(default the first three): eager; regions.BLOCKS compiled; regions.WIDE (each Transformer2DModel whole); each down,
mid and up block whole (coarse); the whole UNet (whole); regions.WIDE with inductor's coordinate-descent tuning of its
Triton kernels (wide-cdt), or with that and max-autotune's Triton GEMM templates beside cuBLAS, which can fold a bias
or residual add into a product's epilogue (wide-autotune). Those two compile anew, after torch._dynamo.reset(). Each
is called directly and replayed from a CUDA graph (cudagraphs.Graphed, as generation runs it). It records the first
call's seconds (the compile: cold unless inductor's cache holds it; the variants run in one process, so a later one may
reuse an earlier one's kernels) and the largest difference to the eager output relative to its largest value, and
writes $OUT/probe_regions.json.

With GENERATE=1 (VARIANTS may then be empty) it also times whole `generate_batch` calls at batch `BATCH` (4 steps,
guidance 1, the protocol's decode, UNet calls from CUDA graphs, as `eval` runs them) with regions.BLOCKS and
regions.WIDE compiled, alternating, `ROUNDS` rounds of 5 batches each, and the uint8 difference of their images.
"""

import json
import os
import time

import torch
from probe_common import cuda_ms

from rapm_bench import regions
from rapm_bench.cudagraphs import Graphed
from rapm_bench.perf.sdxl import build_unet

out = os.environ.get("OUT", "/tmp")
batch = int(os.environ.get("BATCH", "16"))
dev = torch.device("cuda")
unet = build_unet("full", dev, torch.bfloat16)
g = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(batch, 4, 128, 128, device=dev, generator=g, dtype=torch.bfloat16)
t = torch.full((batch,), 749, device=dev)
cond = {"encoder_hidden_states": torch.randn(batch, 77, 2048, device=dev, generator=g, dtype=torch.bfloat16),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280, device=dev, generator=g, dtype=torch.bfloat16),
                              "time_ids": torch.tensor([1024, 1024, 0, 0, 1024, 1024], device=dev,
                                                       dtype=torch.bfloat16).repeat(batch, 1)}}


@torch.no_grad()
def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return unet(x, t, **cond).sample


res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": batch}


def save() -> None:
    """Write what is measured so far (a run cut off keeps its finished variants)."""
    with open(os.path.join(out, "probe_regions.json"), "w") as f:
        json.dump(res, f, indent=1)


with torch.no_grad():
    reference = call(x, t).float()
scale = float(reference.abs().max())
COARSE = ("DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D")
VARIANTS = {"eager": None, "blocks": regions.BLOCKS, "wide": regions.WIDE, "coarse": COARSE,
            "whole": ("UNet2DConditionModel",), "wide-cdt": regions.WIDE, "wide-autotune": regions.WIDE}
INDUCTOR = {"wide-cdt": {"coordinate_descent_tuning": True},  # inductor config each variant compiles under
            "wide-autotune": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                              "coordinate_descent_tuning": True}}
start = time.perf_counter()
for name in filter(None, os.environ.get("VARIANTS", "eager,blocks,wide").split(",")):
    classes = VARIANTS[name]
    if time.perf_counter() - start > float(os.environ.get("DEADLINE_S", "1e9")):
        print(name, "skipped: past DEADLINE_S", flush=True)
        continue
    row: dict = {}
    if name in INDUCTOR:
        torch._dynamo.reset()  # dynamo's cache would hand back the graphs compiled under the default config
        row["inductor"] = INDUCTOR[name]
    if classes is not None:
        row["regions"] = regions.compile_blocks(unet, classes=classes)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch._inductor.config.patch(INDUCTOR.get(name, {})):  # compiled at the first call
        y = call(x, t)
    torch.cuda.synchronize()
    row["first_call_s"] = round(time.perf_counter() - t0, 1)
    row["max_rel_diff_to_eager"] = float((y.float() - reference).abs().max()) / scale
    row["ms_per_pass"] = round(cuda_ms(lambda: call(x, t), warm=2, n=10), 2)
    graphed = Graphed(call)
    with torch.no_grad():  # Graphed replays only where grad is off
        row["ms_per_pass_graphed"] = round(cuda_ms(lambda graphed=graphed: graphed(x, t), warm=3, n=10), 2)
        row["graphed_equals_direct"] = bool(torch.equal(graphed(x, t), call(x, t))) and graphed.replays > 0
    graphed.release()
    for m in unet.modules():  # regions.uncompile_blocks, for any classes
        m._compiled_call_impl = None
    res[name] = row
    print(name, row, flush=True)
    save()
if os.environ.get("GENERATE") == "1":
    from rapm_bench.cudagraphs import graphed_predict
    from rapm_bench.eval.protocols import default_protocol
    from rapm_bench.generate import generate_batch
    from rapm_bench.perf.config import resolve_bench
    from rapm_bench.perf.worlds import build_world
    from rapm_bench.sampling import DDIM_TRAILING

    del unet, reference
    torch.cuda.empty_cache()
    world = build_world(resolve_bench("sdxl"), dev)
    world.set_vae_precision(default_protocol("sdxl").vae_precision)
    prompts, seeds = [f"bench prompt {i}" for i in range(batch)], list(range(batch))
    images, gen = {}, {}
    for rnd in range(int(os.environ.get("ROUNDS", "2"))):
        for name in ("blocks", "wide"):
            with regions.blocks_compiled(world.inner.unet, True, getattr(regions, name.upper())), \
                    graphed_predict(world):
                run = lambda: generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)  # noqa: E731
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                images[name] = run()  # compiles in the first round, captures the graphs
                first = time.perf_counter() - t0
                ms = cuda_ms(run, warm=1, n=5) / batch
            gen[f"{name}, round {rnd + 1}"] = {"ms_per_image": round(ms, 2), "first_call_s": round(first, 1)}
            print("generate", name, rnd + 1, gen[f"{name}, round {rnd + 1}"], flush=True)
    d = (images["wide"].int() - images["blocks"].int()).abs()
    gen["uint8 difference wide - blocks"] = {"max": int(d.max()), "changed_share": float((d > 0).float().mean())}
    print(gen["uint8 difference wide - blocks"], flush=True)
    res["generate"] = gen
save()
