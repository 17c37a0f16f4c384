"""FastLoRA's per-step rebuild of W + s·B·A timed on its own (issue 14): packed groups against layer by layer.

    python -m rapm_bench.perf.rebuild --out results/bench

On a random-weight SDXL UNet (perf.sdxl, size full, bf16) with the engine's rank-1 merged FastLoRA, times the
refresh that follows every optimiser step (`fastlora.refresher`, replayed from its CUDA graph) in four forms:
the packed groups (`_Group`) through the compiled `merge_rank1` or aten's addcmul, and each layer alone through
the compiled `merge_into` or the aten kernels. The floor is one copy of every target weight (the bytes the rebuild must
move: read W, write W'), timed in the same run. Writes
<out>/rebuild-<device>.json with the command and the machine. The CPU runs it too (no graphs; `--size tiny`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

FORMS: dict[str, dict[str, bool]] = {  # name: FastLoRA packing, the rebuild graph's kernels compiled, Triton's
    "packed groups, triton merge_rank1": {"pack": True, "compiled": True, "triton": True},
    "packed groups, compiled merge_rank1": {"pack": True, "compiled": True, "triton": False},
    "packed groups, aten addcmul": {"pack": True, "compiled": False},
    "per layer, compiled merge_into": {"pack": False, "compiled": True},
    "per layer, aten": {"pack": False, "compiled": False},
}


def timed(fn: Any, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after two warm-up calls."""
    from .measure import measure

    return list(measure("rebuild", fn, device, repeats, 2, "refresh", 1, count=False).seconds)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .. import fastlora
    from ..distill.config import distill_preset
    from ..files import atomic_write_bytes
    from ..provenance import device_info, git_commit_state, library_versions
    from .sdxl import build_unet

    args = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m rapm_bench.perf.rebuild", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="full", choices=["tiny", "small", "full"], help="perf.sdxl UNet size")
    p.add_argument("--repeats", type=int, default=20, help="timed refreshes per form")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder of the result JSON")
    a = p.parse_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dcfg = distill_preset("sdxl")
    unet = build_unet(a.size, device, dtype).requires_grad_(False)
    rows = []
    for name, form in FORMS.items():
        saved = fastlora.COMPILE_REBUILD, fastlora.TRITON_REBUILD
        fastlora.COMPILE_REBUILD, fastlora.TRITON_REBUILD = form["compiled"], form.get("triton", False)
        lora = fastlora.FastLoRA(unet, dcfg.rank, dcfg.lora_targets, dcfg.seed, mode="merged",
                                 pack_weights=form["pack"])
        params = lora.parameters()
        refresh = fastlora.refresher(unet)
        assert refresh is not None
        refresh()  # the caches, built eagerly

        @torch.no_grad()
        def write(params: list[torch.nn.Parameter] = params) -> None:
            torch._foreach_add_(params, 1e-3)  # an optimiser step's in-place writes: every layer is stale

        def step(refresh: Any = refresh, write: Any = write) -> None:
            write()
            refresh()

        t_step = timed(step, device, a.repeats)
        t_write = timed(write, device, a.repeats)
        weights = sum(w.base.weight.numel() for w in lora.layers.values())
        moved = weights * 2 * unet.dtype.itemsize  # read W, write W'
        rows.append({"name": name, "seconds": sorted(t_step)[len(t_step) // 2] - sorted(t_write)[len(t_write) // 2],
                     "seconds_all": t_step, "write_seconds_all": t_write, "layers": len(lora.layers),
                     "groups": len(lora.groups), "bytes": moved,
                     "graph_replays": getattr(refresh, "replays", 0)})
        print(f"{name}: {rows[-1]['seconds'] * 1e3:.2f} ms ({len(lora.layers)} layers, {len(lora.groups)} groups, "
              f"{refresh.replays} graph replays)", flush=True)
        lora.remove()
        fastlora.COMPILE_REBUILD, fastlora.TRITON_REBUILD = saved
        del lora, params, refresh
    moved = rows[0]["bytes"]
    pair = [torch.empty(moved // 2, dtype=torch.uint8, device=device) for _ in range(2)]  # W's bytes: W' = W
    t_copy = timed(lambda: pair[1].copy_(pair[0]), device, a.repeats)
    pair.clear()
    floor = sorted(t_copy)[len(t_copy) // 2]
    bandwidth = moved / floor
    for r in rows:
        r["floor_seconds"] = floor
        r["ratio"] = r["floor_seconds"] / r["seconds"] if r["seconds"] > 0 else None
    result = {"command": shlex.join(["python", "-m", "rapm_bench.perf.rebuild", *args]),
              "device": device_info(device), "versions": library_versions(), "git": git_commit_state(),
              "unet": a.size, "dtype": str(dtype).removeprefix("torch."), "rank": dcfg.rank,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "forms": rows}
    path = a.out / f"rebuild-{result['device']['slug']}.json"
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, floor {moved / bandwidth * 1e3:.2f} ms; wrote {path}")
    return result


if __name__ == "__main__":
    main()
