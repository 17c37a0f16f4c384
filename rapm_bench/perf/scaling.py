"""`python -m rapm_bench.scaling`: evaluation and trajectory precompute on 1 vs G GPUs (docs/design.md §9).

Builds once, into `--work`, a random-weight pipeline of SDXL's full architecture (perf.sdxl's "full" size: UNet
and VAE configs, SDXL's two CLIP text encoders), synthetic COCO-2014 data (captions_val2014.json
and JPEGs), a random-weight clean-fid Inception-v3 TorchScript file and a random-weight open_clip
ViT-g-14 checkpoint: timings do not depend on the weights. Then, for each G of `--gpus`, it
launches G processes (`torch.distributed.run`, what `accelerate launch` runs) that call the real
`evaluate` (teacher, DDIM trailing, 4 steps, guidance 1: RAPM's sampling cost) and the real
trajectory cache (the sdxl distill preset's w, N, M), and writes
results/bench/scaling-<gpu>.json: speed-ups, and the FID and CLIP score, which must not move with G.

`--small` runs the same with SDXL's modules at tiny widths on the CPU (gloo): the test's path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .scaling_build import (  # noqa: F401 (the build's names, also reached as scaling.X)
    INCEPTION_FILE,
    SMALL_CLIP,
    Settings,
    build,
    build_clip,
    build_coco,
    build_inception,
    build_teacher,
    log,
    text_encoder_configs,
)
from .sdxl import clip_tokenizer  # noqa: F401 (scaling.clip_tokenizer: its old home)

STEPS, GUIDANCE = 4, 1.0  # `eval --model teacher --steps 4 --guidance 1`: RAPM's sampler without its LoRA
FID_RTOL = 1e-6  # FID of G processes must equal FID of one within this relative tolerance


# --- 2. protocol and reference statistics -----------------------------------------------------------------
def register(s: Settings) -> Any:
    """coco30k on the N synthetic pairs at `--resolution`, made known to this process (small: with the small
    CLIP); returns the protocol."""
    from ..eval import protocols

    proto = dataclasses.replace(protocols.get_protocol("coco30k"), name=f"scaling-{s.num_images}",
                                num_pairs=s.num_images, generation_resolution=s.resolution)
    if s.small:
        import open_clip

        open_clip.add_model_config(s.clip_config)
        proto = dataclasses.replace(proto, clip_model=SMALL_CLIP, clip_pretrained=None)
    protocols.PROTOCOLS[proto.name] = proto
    return proto


def prepare_reference(s: Settings, proto: Any, device: torch.device) -> Path:
    """`rapm-bench data coco`'s library function: the pair list and reference FID statistics under s.data."""
    from ..eval.coco import prepare_coco
    from ..eval.features import load_extractor

    extractor = load_extractor(proto, s.inception, device)
    return prepare_coco(s.annotations, s.images, proto, s.data, extractor, progress=False)


# --- 3. one worker process of a G-process launch ----------------------------------------------------------
def time_trajectories(s: Settings, cache: Path) -> dict[str, Any]:
    """Fill a fresh trajectory cache of K trajectories (the sdxl distill preset's w, N, M) across the processes."""
    from accelerate import PartialState

    from ..distill.config import resolve_distill
    from ..distill.trajectories import load_or_build, make_spec, training_prompts
    from ..worlds import load_world

    cfg = resolve_distill("sdxl", teacher=str(s.teacher), device="cpu" if s.small else "auto",
                          precision="fp32" if s.small else None, resolution=s.resolution,
                          num_trajectories=s.trajectories, trajectory_batch=s.trajectory_batch,
                          prompts=str(s.annotations), cache_dir=str(cache))
    state = PartialState(cpu=s.small)
    world_cfg = cfg.world if state.num_processes == 1 else dataclasses.replace(cfg.world, device=str(state.device))
    world = load_world(world_cfg)
    prompts = training_prompts("sdxl", cfg.num_trajectories, cfg.prompts)
    guidance = world.default_guidance if cfg.guidance is None else cfg.guidance
    spec = make_spec(world, prompts, cfg.trajectory_seed, guidance, cfg.slots, cfg.substeps, cfg.store_dtype,
                     cfg.trajectory_batch)
    state.wait_for_everyone()
    t0 = time.perf_counter()
    trajs = load_or_build(world, prompts, spec, cache, progress=False)  # ends with a barrier: the slowest's time
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "num": len(trajs), "folder": str(trajs.folder), "guidance": guidance,
            "slots": cfg.slots, "substeps": cfg.substeps, "batch": cfg.trajectory_batch,
            "precision": cfg.world.precision, "store_dtype": cfg.store_dtype}


def worker(s: Settings, folder: Path) -> None:
    """One process of a launch: the real `evaluate`, then the trajectory fill; the main one writes result.json."""
    from accelerate import PartialState

    from ..config import EvalConfig, WorldConfig
    from ..eval.engine import evaluate
    from ..files import atomic_write_bytes
    from ..worlds import sdxl

    sdxl.HALF_CONVOLUTIONS = s.half_convolutions  # the decoders this process builds
    sdxl.HALF_ATTENTION = s.half_attention
    proto = register(s)
    cfg = EvalConfig(world=WorldConfig(preset="sdxl", teacher=str(s.teacher), device="cpu" if s.small else "auto"),
                     model="teacher", steps=STEPS, guidance=GUIDANCE, protocol=proto.name,
                     num_images=s.num_images, out=str(folder / "eval"), batch_size=s.batch_size,
                     data_dir=str(s.data), inception=str(s.inception), clip_checkpoint=str(s.clip),
                     compile_blocks=s.compile_blocks, overlap_scoring=s.overlap_scoring)
    main = PartialState(cpu=s.small).is_main_process
    if main:
        log(f"evaluating {s.num_images} images at {s.resolution} px")
    t0 = time.perf_counter()
    result = evaluate(cfg)
    eval_wall = time.perf_counter() - t0
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if main:
        assert result is not None
        log(f"eval done in {eval_wall:.1f} s (loop {result['timing']['loop_s']:.1f} s); "
            f"filling {s.trajectories} trajectories")
    traj = time_trajectories(s, folder / "trajectories")
    if main:
        assert result is not None
        record = {"processes": result["timing"]["processes"], "eval_wall_s": eval_wall, "timing": result["timing"],
                  "fid": result["fid"], "clip_score": result["clip_score"], "device": result["device"],
                  "trajectories": traj}
        atomic_write_bytes(folder / "result.json", (json.dumps(record, indent=2) + "\n").encode())
        log(f"trajectories done in {traj['seconds']:.1f} s")


# --- 4. the measurement -----------------------------------------------------------------------------------
def launch(s: Settings, g: int, g_max: int | None = None) -> dict[str, Any]:
    """Run the workers as G processes on a fresh run folder; their result plus the launch's wall-clock time.
    Every process of every launch gets the CPU threads one of `g_max` processes gets (default G): a CPU matrix
    product sums in another order with another thread count, and the runs must give the same numbers."""
    folder = s.root / "runs" / f"g{g}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (g_max or g))))  # the CPU shared fairly
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(g),
           "-m", "rapm_bench.scaling", *s.argv(), "--worker-dir", str(folder)]
    log(f"launching {g} process{'es' if g > 1 else ''}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    launch_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"the {g}-process run failed (exit code {proc.returncode}); its output is above")
    return json.loads((folder / "result.json").read_text()) | {"launch_s": launch_s}


def same_cache(a: Path, b: Path) -> bool:
    """Whether two trajectory cache folders hold the same shards with equal tensors."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob("shard_*.safetensors"))
    if not names or names != sorted(p.name for p in b.glob("shard_*.safetensors")):
        return False
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def extrapolate(timing: dict[str, Any], n: int) -> float | None:
    """An eval of n images from a shorter run's timing (extrapolated, not run): load + first group + the other
    images at the steady rate + the tail (once a run); None without a steady rate."""
    steady = timing.get("steady_images_per_s")
    if not steady:
        return None
    return timing["load_s"] + timing["first_group_s"] + (n - timing["first_group_images"]) / steady + timing["tail_s"]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per G: timings, speed-ups against the first run (G = 1), and the scores' agreement with it."""
    base = runs[0]
    rows = []
    for r in runs:
        t, bt = r["timing"], base["timing"]
        fid_diff = abs(r["fid"] - base["fid"])
        rows.append({
            "processes": r["processes"],
            "load_s": t["load_s"],
            "loop_s": t["loop_s"],
            "images_per_s": t["images_per_s"],
            "eval_wall_s": r["eval_wall_s"],  # evaluate() on the main process: load, loop, result file
            "compiled_blocks": t.get("compiled_blocks"),
            "first_group_s": t.get("first_group_s"),  # the first 64 images (a shard's): compiles and captures in it
            "steady_images_per_s": t.get("steady_images_per_s"),
            **{k: t.get(k) for k in ("generate_s", "score_s", "prepare_s", "tail_s", "overlap_scoring",
                                     "groups_scored_beside")},  # the loop's phases (main process; prepare_s: its
            #                                                    worker thread, beside generation) and its tail
            "eval_30k_extrapolated_s": extrapolate(t, 30_000),
            "launch_s": r["launch_s"],  # the whole launch: imports, evaluation, trajectories
            "speedup_loop": bt["loop_s"] / t["loop_s"],
            "speedup_wall": base["eval_wall_s"] / r["eval_wall_s"],
            "fid": r["fid"],
            "clip_score": r["clip_score"],
            "fid_abs_diff": fid_diff,
            "fid_equal": fid_diff <= FID_RTOL * abs(base["fid"]),
            "clip_abs_diff": abs(r["clip_score"] - base["clip_score"]),
            "trajectories_s": r["trajectories"]["seconds"],
            "trajectories_speedup": base["trajectories"]["seconds"] / r["trajectories"]["seconds"],
            "trajectories_identical": same_cache(Path(base["trajectories"]["folder"]),
                                                 Path(r["trajectories"]["folder"])),
            "device": r["device"],
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The short table printed at the end."""
    head = (f"{'G':>2} {'load s':>7} {'loop s':>7} {'img/s':>7} {'x loop':>6} {'x wall':>6} {'FID':>10} "
            f"{'|dFID|':>8} {'FID ok':>6} {'traj s':>7} {'x traj':>6} {'traj ==':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['processes']:>2} {r['load_s']:7.1f} {r['loop_s']:7.1f} {r['images_per_s']:7.2f} "
                     f"{r['speedup_loop']:6.2f} {r['speedup_wall']:6.2f} {r['fid']:10.4f} {r['fid_abs_diff']:8.1e} "
                     f"{str(r['fid_equal']):>6} {r['trajectories_s']:7.1f} {r['trajectories_speedup']:6.2f} "
                     f"{str(r['trajectories_identical']):>7}")
    return "\n".join(lines)


def measure(s: Settings, gpus: list[int], out: Path, argv: list[str]) -> Path:
    """Build, prepare the reference statistics, run each G, write the result JSON; returns its path."""
    from ..config import get_preset
    from ..files import atomic_write_bytes
    from ..provenance import device_info, git_commit, versions

    if not gpus or gpus[0] != 1 or gpus != sorted(set(gpus)):
        raise UserError(f"--gpus must start at 1 and increase (e.g. 1,2), got {','.join(map(str, gpus))}")
    if s.trajectories > s.num_images:
        raise UserError(f"--trajectories {s.trajectories} needs as many captions; --num-images is {s.num_images}")
    device = torch.device("cuda" if torch.cuda.is_available() and not s.small else "cpu")
    if device.type == "cuda" and gpus[-1] > torch.cuda.device_count():
        raise UserError(f"--gpus {gpus[-1]}: this machine has {torch.cuda.device_count()} GPUs")
    info = device_info(device)
    t0 = time.perf_counter()
    built = build(s, device)
    build_s = time.perf_counter() - t0
    proto = register(s)
    t0 = time.perf_counter()
    stats = prepare_reference(s, proto, device)
    reference_s = time.perf_counter() - t0
    log(f"reference statistics in {reference_s:.1f} s: {stats}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    runs = [launch(s, g, gpus[-1]) for g in gpus]
    rows = summarize(runs)
    traj = {k: v for k, v in runs[0]["trajectories"].items() if k not in ("seconds", "folder")}
    record = {
        "what": "1 vs G GPUs: generation + FID/CLIP evaluation (evaluate) and the trajectory precompute "
                "(load_or_build) on SDXL's architecture with random weights",
        "gpu": info["name"],
        "gpu_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "device": info,
        "settings": {
            "small": s.small, "num_images": s.num_images, "resolution": s.resolution,
            "eval": {"model": "teacher", "sampler": "DDIM trailing", "steps": STEPS, "guidance": GUIDANCE,
                     "protocol": proto.to_dict(), "protocol_hash": proto.hash(),
                     "batch_size": s.batch_size or get_preset("sdxl").batch_size, "compile_blocks": s.compile_blocks,
                     "vae_half_convolutions": s.half_convolutions or "off", "vae_half_attention": s.half_attention,
                     "overlap_scoring": s.overlap_scoring},
            "trajectories": traj,  # the sdxl distill preset's w, N, M, shard size and precisions
        },
        "versions": versions(),
        "command": " ".join(["python -m rapm_bench.scaling", *argv]),
        "git_commit": git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "build_s": build_s,
        "built": built,
        "reference_s": reference_s,
        "fid_rtol": FID_RTOL,
        "runs": rows,
    }
    path = out / f"scaling-{'small-' if s.small else ''}{info['slug']}.json"
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    print(table(rows), flush=True)
    for r in rows:
        if r["eval_30k_extrapolated_s"] is not None:
            log(f"G={r['processes']}: first group {r['first_group_s']:.1f} s, then {r['steady_images_per_s']:.2f} img/s; "
                f"tail {r['tail_s']:.1f} s; 30K eval extrapolated {r['eval_30k_extrapolated_s'] / 60:.1f} min (with "
                f"load); loop phases: generate {r['generate_s']:.1f} s, score {r['score_s']:.1f} s "
                f"({r['groups_scored_beside']} groups between UNet calls); beside them, the CPU preparing "
                f"{r['prepare_s']:.1f} s")
    log(f"wrote {path}")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (`--worker-dir` is internal: one worker process of a launch)."""
    p = argparse.ArgumentParser(prog="python -m rapm_bench.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/scaling"),
                   help="build and run folder; a complete build there is reused (default: runs/scaling)")
    p.add_argument("--gpus", default="1,2", help="process counts to run, from 1 (default: 1,2)")
    p.add_argument("--num-images", type=int, default=256, help="N: images evaluated per run (default: 256)")
    p.add_argument("--resolution", type=int, default=None, help="generation side (default: 1024; small: 64)")
    p.add_argument("--trajectories", type=int, default=64, help="K teacher trajectories timed (default: 64)")
    p.add_argument("--trajectory-batch", type=int, default=None,
                   help="trajectories per shard (default: the sdxl distill preset's, 8)")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch (default: the sdxl preset's, 4)")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder of the result JSON")
    p.add_argument("--small", action="store_true", help="SDXL's modules at tiny widths, on the CPU (gloo)")
    p.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="eval's UNet blocks compiled or not (default: eval's own rule, regions.pays: compiled on a GPU "
                        "from 16,384 images x steps); the first group's time holds the compile")
    p.add_argument("--vae-half-convolutions", choices=["everywhere", "bounded", "off"], default="everywhere",
                   help="the compiled TF32 decode's convolutions on fp16 tensor cores (worlds/halfconv.py): everywhere "
                        "(the default: all, scaled per image), bounded (those reading silu(GroupNorm)) or off")
    p.add_argument("--vae-half-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="the compiled TF32 decode's attention products on fp16 tensor cores (worlds/attention.py; the "
                        "default) or in TF32")
    p.add_argument("--overlap-scoring", action=argparse.BooleanOptionalAction, default=True,
                   help="eval's --overlap-scoring: each group scored between the next group's UNet calls on a side "
                        "CUDA stream (default), or after it")
    p.add_argument("--worker-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> Settings:
    """The settings of parsed arguments."""
    return Settings(work=a.work.resolve(), small=a.small, num_images=a.num_images,
                    resolution=a.resolution or (64 if a.small else 1024), trajectories=a.trajectories,
                    trajectory_batch=a.trajectory_batch, batch_size=a.batch_size, compile_blocks=a.compile_blocks,
                    half_convolutions="" if a.vae_half_convolutions == "off" else a.vae_half_convolutions,
                    overlap_scoring=a.overlap_scoring, half_attention=a.vae_half_attention)


def main(argv: list[str] | None = None) -> None:
    """Run the measurement, or one worker process of it."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        if a.worker_dir is not None:
            worker(settings(a), a.worker_dir)
        else:
            measure(settings(a), [int(g) for g in a.gpus.split(",") if g.strip()], a.out, argv)
    except UserError as e:
        print(f"rapm_bench.scaling: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
