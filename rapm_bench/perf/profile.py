"""Where a RAPM iteration's GPU time goes: torch.profiler over the bench's replica of the engine's iteration.

    python -m rapm_bench.perf.profile --variants plain/graphs,merged/graphs --out results/bench

For each variant (`rapm-bench bench` spelling), three iterations warm up (graph captures), two are profiled;
the table of the top CUDA kernels by self time goes to <out>/profile-<variant>.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from ..distill.config import distill_preset
    from .config import parse_variant, resolve_bench
    from .stages import rapm_iteration, rapm_setup
    from .worlds import build_world

    p = argparse.ArgumentParser(prog="python -m rapm_bench.perf.profile", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="plain/graphs,merged/graphs")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--rows", type=int, default=30)
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
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                for i in range(3, 5):
                    rapm_iteration(world, s, i)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=90)
            path = a.out / f"profile-{name.replace('/', '-')}.txt"
            path.write_text(f"# {name}: 2 iterations, sdxl preset, {torch.cuda.get_device_name(device)}\n{table}\n")
            print(f"== {name}\n{table}", flush=True)
        finally:
            s.cleanup()
            del s
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
