"""Where a RAPM iteration's GPU time goes: torch.profiler over the bench's replica of the engine's iteration.

    python -m rapm_bench.perf.profile --variants plain/graphs,merged/graphs --out results/bench

For each variant (`rapm-bench bench` spelling), three iterations warm up (graph captures), two are profiled;
the table of the top CUDA kernels by self time goes to <out>/profile-<variant>.txt, headed by the iteration's
wall time, the time the GPU was busy (the union of its kernels' intervals) and the stream synchronisations one
iteration makes (torch.cuda's sync debug mode): each one drains the GPU's queue, which then waits on the host.
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


def main(argv: list[str] | None = None) -> None:
    from ..distill.config import distill_preset
    from .config import parse_variant, resolve_bench
    from .stages import rapm_iteration, rapm_setup
    from .worlds import build_world

    p = argparse.ArgumentParser(prog="python -m rapm_bench.perf.profile", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="plain/graphs,merged/graphs")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--rows", type=int, default=60)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = resolve_bench("sdxl")
    device = torch.device("cuda")
    world = build_world(cfg, device)
    dcfg = distill_preset("sdxl")
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.variants.split(","):
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
