"""Where the GPU time goes: torch.profiler over the bench's replica of the engine's iteration, or over the
no-grad passes of generation and trajectories.

    python -m rapm_bench.perf.profile --variants plain/graphs,merged/graphs --out results/bench
    python -m rapm_bench.perf.profile --variants "" --passes unet,vae --out results/bench

For each variant (`rapm-bench bench` spelling), three iterations warm up (graph captures), two are profiled;
the table of the top CUDA kernels by self time goes to <out>/profile-<variant>.txt, headed by the iteration's
wall time, the time the GPU was busy (the union of its kernels' intervals) and the stream synchronisations one
iteration makes (torch.cuda's sync debug mode): each one drains the GPU's queue, which then waits on the host.

`--passes unet`: the no-grad UNet call of generation and trajectories at `--unet-batch`, its blocks compiled as
the engine runs them; `vae`: the decode at `--vae-batch` in the sdxl protocol's precision (compiled). Each file
(profile-unet-b16.txt, profile-vae-tf32-b4.txt) adds a table by kernel kind: GPU time, counted FLOPs
(FlopCounterMode) and the TF32/bf16 rate each kind reached, which names what limits the pass. `generate`: a whole
`generate_batch` at `--unet-batch` (graphs, blocks compiled, the protocol's decode), for its idle time, and
four of them in a row through `generate_batches` (each queued before the last is waited for).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def count_syncs(fn: Callable[[], object]) -> int:
    """How many times `fn` synchronises a CUDA stream with the host (warnings of torch.cuda's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def busy_seconds(prof: torch.profiler.profile) -> float:
    """Seconds in which at least one GPU kernel or copy of the profile ran (the union of their intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total / 1e6  # the profiler's times are microseconds


KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # kernel kind by substrings of the CUDA kernel's name, first match wins (cuDNN's convolution kernels on sm90
    # carry "implicit_gemm" in their names, so convolutions come before matrix products, and its layout
    # transposes "cudnn", so those come before convolutions)
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("layout", ("nchwtonhwc", "nhwctonchw")),  # cuDNN's own layout transposes around a convolution
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit", "winograd", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "xmma")),
    ("fused (triton)", ("triton",)),
)
OP_KINDS: dict[str, str] = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
                            "convolution": "convolution", "_convolution": "convolution"}


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (KINDS), else "other"."""
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def op_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call by kernel kind (measure.flop_counts by op; the call runs eagerly)."""
    from .measure import flop_counts

    out: dict[str, int] = {}
    for name, n in flop_counts(fn).items():
        kind = "attention" if "attention" in name else OP_KINDS.get(name, "other")
        out[kind] = out.get(kind, 0) + n
    return out


def kinds_table(prof: torch.profiler.profile, calls: int, flops: dict[str, int]) -> str:
    """GPU time per call by kernel kind, with the counted FLOPs and the rate each kind reached (those two columns
    only where FLOPs were counted)."""
    times: dict[str, float] = {}
    for e in prof.events():  # GPU-side events only: kernels, copies, memsets (an op's row repeats its kernels)
        if e.device_type == torch.autograd.DeviceType.CUDA and "Command Buffer" not in e.name:
            kind = kernel_kind(e.name)
            times[kind] = times.get(kind, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / calls
    total = sum(times.values())
    lines = [f"{'kind':<16}{'ms':>9}{'share':>8}" + (f"{'TFLOP':>9}{'TFLOP/s':>10}" if flops else "")]
    for kind, ms in [*sorted(times.items(), key=lambda kv: -kv[1]), ("all", total)]:
        line = f"{kind:<16}{ms:9.2f}{ms / total:8.1%}"
        if flops:
            tf = (sum(flops.values()) if kind == "all" else flops.get(kind, 0)) / 1e12
            line += f"{tf:9.3f}" + (f"{tf / ms * 1e3:10.0f}" if tf else "")
        lines.append(line)
    return "\n".join(lines)


def profile_pass(name: str, fn: Callable[[], object], calls: int, out: Path, rows: int, note: str,
                 count: bool = True) -> None:
    """Warm `fn` up (compiles), profile `calls` calls, write <out>/profile-<name>.txt (kinds table + top kernels);
    `count=False` leaves the FLOPs out (a graph's replay has no ops to count)."""
    flops = op_flops(fn) if count else {}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    syncs = count_syncs(fn)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    busy = busy_seconds(prof) / calls
    head = (f"# {name}: {note}; {calls} calls profiled, {torch.cuda.get_device_name()}\n"
            f"# per call (under the profiler): wall {wall * 1e3:.1f} ms, GPU busy {busy * 1e3:.1f} ms, "
            f"idle {(wall - busy) * 1e3:.1f} ms; stream synchronisations in one call: {syncs}\n")
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)
    text = f"{head}\n{kinds_table(prof, calls, flops)}\n\n{table}\n"
    (out / f"profile-{name}.txt").write_text(text)
    print(f"== {name}\n{text}", flush=True)


def profile_passes(world: object, passes: list[str], unet_batch: int, vae_batch: int, out: Path, rows: int) -> None:
    """Profile generation's and trajectories' no-grad passes (`--passes`): the UNet with compiled blocks, the decode,
    and a whole `generate_batch` as 30K-image generation runs it."""
    from .. import regions
    from ..eval.protocols import default_protocol
    from .stages import _unet_inputs

    if "unet" in passes:
        x, t, cond = _unet_inputs(world, unet_batch, 0)  # type: ignore[arg-type]
        with regions.blocks_compiled(world.inner.unet, True):  # type: ignore[attr-defined]
            call = torch.no_grad()(lambda: world.predict(x, t, cond))  # type: ignore[attr-defined]
            profile_pass(f"unet-b{unet_batch}", call, 2, out, rows,
                         f"no-grad UNet call at batch {unet_batch}, bf16, blocks compiled")
    if "vae" in passes:
        precision = default_protocol("sdxl").vae_precision
        world.set_vae_precision(precision)  # type: ignore[attr-defined]
        gen = torch.Generator().manual_seed(0)
        z = torch.randn((vae_batch, *world.latent_shape), generator=gen).to(world.device)  # type: ignore[attr-defined]
        decoder = world.inner.decoder  # type: ignore[attr-defined]
        profile_pass(f"vae-{precision}-b{vae_batch}", lambda: decoder(z), 2, out, rows,
                     f"VAE decode at batch {vae_batch}, {precision}, compiled")
    if "generate" in passes:
        profile_generate(world, unet_batch, out, rows)


def profile_generate(world: object, batch: int, out: Path, rows: int) -> None:
    """A whole `generate_batch` (4 DDIM steps, guidance 1, the protocol's decode) at `batch`, the UNet's blocks
    compiled and its calls replayed from CUDA graphs, as the bench's generation headline runs it: its idle time
    is what the passes above leave out (the sampler, prompts, noise, the images' way to the host)."""
    from .. import regions
    from ..cudagraphs import graphed_predict
    from ..eval.protocols import default_protocol
    from ..generate import generate_batch, generate_batches
    from ..sampling import DDIM_TRAILING
    from .stages import STREAMED

    precision = default_protocol("sdxl").vae_precision
    world.set_vae_precision(precision)  # type: ignore[attr-defined]
    prompts = [f"bench prompt {i}" for i in range(batch)]
    seeds = list(range(batch))
    unet = world.inner.unet  # type: ignore[attr-defined]
    with regions.blocks_compiled(unet, True, regions.WIDE), graphed_predict(world):  # generation's regions
        profile_pass(f"generate-b{batch}", lambda: generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0), 2,
                     out, rows, f"generate_batch at batch {batch}: 4 steps, graphs, regions.WIDE compiled, VAE {precision}; "
                     "FLOPs not counted (a graph's replay has no ops to count)", count=False)
        jobs = [(prompts, seeds)] * STREAMED  # as `generate` and `eval` run them: each queued before the last returns
        profile_pass(f"generate-b{batch}-x{STREAMED}", lambda: sum(1 for _ in generate_batches(
                     world, jobs, DDIM_TRAILING, 4, 1.0)), 2, out, rows, f"generate_batches, {STREAMED} batches of "
                     f"{batch} in a row: 4 steps, graphs, regions.WIDE compiled, VAE {precision}; FLOPs not counted",
                     count=False)


def main(argv: list[str] | None = None) -> None:
    from ..distill.config import distill_preset
    from .config import parse_variant, resolve_bench
    from .stages import rapm_iteration, rapm_setup
    from .worlds import build_world

    p = argparse.ArgumentParser(prog="python -m rapm_bench.perf.profile", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="plain/graphs,merged/graphs", help="RAPM variants ('' for none)")
    p.add_argument("--passes", default="", help="no-grad passes to profile too: unet, vae, generate (comma-separated)")
    p.add_argument("--unet-batch", type=int, default=16, help="the UNet pass's batch (16: generation's, trajectories')")
    p.add_argument("--vae-batch", type=int, default=4, help="the decode's batch")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--rows", type=int, default=60)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = resolve_bench("sdxl")
    device = torch.device("cuda")
    world = build_world(cfg, device)
    dcfg = distill_preset("sdxl")
    a.out.mkdir(parents=True, exist_ok=True)
    passes = [x for x in a.passes.split(",") if x]
    if passes:
        profile_passes(world, passes, a.unet_batch, a.vae_batch, a.out, a.rows)
    for name in filter(None, a.variants.split(",")):
        s = rapm_setup(world, dcfg, parse_variant(name), 0)
        try:
            for i in range(3):
                rapm_iteration(world, s, i)
            torch.cuda.synchronize()
            syncs = count_syncs(lambda s=s: rapm_iteration(world, s, 3))
            torch.cuda.synchronize()
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for i in range(4, 6):
                    rapm_iteration(world, s, i)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / 2
            busy = busy_seconds(prof) / 2
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=90)
            head = (f"# {name}: 2 iterations, sdxl preset, {torch.cuda.get_device_name(device)}\n"
                    f"# per iteration (under the profiler): wall {wall * 1e3:.1f} ms, GPU busy {busy * 1e3:.1f} ms, "
                    f"idle {(wall - busy) * 1e3:.1f} ms; stream synchronisations in one iteration: {syncs}\n")
            path = a.out / f"profile-{name.replace('/', '-')}.txt"
            path.write_text(f"{head}{table}\n")
            print(f"== {name}\n{head}{table}", flush=True)
        finally:
            s.cleanup()
            del s
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
