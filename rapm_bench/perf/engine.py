"""The distillation engine timed on itself (issue 14): `rapm-bench distill --preset sdxl` on a random-weight
SDXL teacher, steady-state seconds per iteration from its own train_log.jsonl.

    python -m rapm_bench.perf.engine --iters 150 --log-every 50

builds (once) a random-weight SDXL pipeline in `--work` (perf.scaling_build.build_teacher: perf.sdxl, size full), writes a caption
file, runs the real CLI as a subprocess, and writes results/bench/engine-sdxl-<device>.json: the command,
the machine, the trajectory time, and the seconds per iteration of every log interval after the first (the
first holds the CUDA-graph captures and cuDNN's warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(f"[perf.engine {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rapm_bench.perf.engine", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/perf-engine"), help="teacher, captions and run folder")
    p.add_argument("--iters", type=int, default=150, help="iterations (default 150: 100 timed after 50)")
    p.add_argument("--log-every", type=int, default=50, help="iterations per log row = per timed interval")
    p.add_argument("--trajectories", type=int, default=16, help="teacher trajectories (default 16)")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder of the result JSON")
    p.add_argument("--extra", default="", help="more `rapm-bench distill` options, e.g. '--grad-checkpointing'")
    p.add_argument("--tag", default="", help="suffix of the result file name (a variant's name)")
    return p.parse_args(argv)


def interval_seconds(log_path: Path, every: int) -> list[float]:
    """Seconds per iteration of each logged interval (from the rows' cumulative `minutes`)."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    minutes = [0.0] + [r["minutes"] for r in rows]
    return [(b - a) * 60 / every for a, b in zip(minutes[:-1], minutes[1:], strict=True)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..files import atomic_write_bytes
    from ..provenance import device_info, git_commit_state, library_versions
    from .scaling_build import build_teacher

    a = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m rapm_bench.perf.engine: needs a CUDA GPU (the sdxl preset's engine)")
    device = torch.device("cuda")
    work = a.work.resolve()
    teacher, captions, run = work / "teacher", work / "captions.txt", work / f"run{a.tag}"
    if not (teacher / "model_index.json").is_file():
        t0 = time.perf_counter()
        build_teacher(teacher, False, device, 1024)
        log(f"random-weight SDXL teacher built in {time.perf_counter() - t0:.0f} s")
        torch.cuda.empty_cache()
    captions.write_text("".join(f"a photo of object number {i} on a table\n" for i in range(a.trajectories)))
    cmd = [sys.executable, "-m", "rapm_bench", "distill", "--preset", "sdxl", "--teacher", str(teacher), "--prompts", str(captions),
           "--num-trajectories", str(a.trajectories), "--iters", str(a.iters), "--log-every", str(a.log_every),
           "--sample-every", "0", "--cache-dir", str(work / "cache"),
           "--out", str(run), *shlex.split(a.extra)]
    if run.exists():
        import shutil

        shutil.rmtree(run)
    log("$ " + shlex.join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    per = interval_seconds(run / "train_log.jsonl", a.log_every)
    steady = per[1:] if len(per) > 1 else per
    mean = sum(steady) / len(steady)
    result = {
        "command": shlex.join(cmd), "driver": shlex.join(["python", "-m", "rapm_bench.perf.engine",
                                                          *(sys.argv[1:] if argv is None else argv)]),
        "device": device_info(device), "versions": library_versions(), "git": git_commit_state(),
        "config": json.loads((run / "config.json").read_text()),
        "grad_checkpointing": summary.get("grad_checkpointing"),
        "trajectory_seconds": summary["trajectories"]["seconds"], "trajectories": a.trajectories,
        "seconds_per_iteration_by_interval": per, "timed_iterations": a.log_every * len(steady),
        "seconds_per_iteration": mean, "wall_seconds": round(wall, 1),
        "hours_20k_iterations": 20_000 * mean / 3600,
    }
    path = a.out / f"engine-sdxl{a.tag}-{result['device']['slug']}.json"
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    log(f"{mean:.3f} s/iteration over {result['timed_iterations']} iterations after {a.log_every} "
        f"(intervals {', '.join(f'{x:.3f}' for x in per)}); 20K iterations {result['hours_20k_iterations']:.2f} h; "
        f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
