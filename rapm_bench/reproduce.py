"""`rapm-bench reproduce`: distil, evaluate every model at its step counts, write the table, in one command.

A plan is data (docs/design.md §1, conventions): the distillation runs and the evaluations of one preset,
each with a cost estimate. Running it skips every step whose output already exists and
matches (a finished run folder, a result JSON of the same model, steps, guidance, protocol,
image count and weights), so a second run only rewrites the table and plots.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .worlds.registry import Costs, get_world_spec


def planned_objectives(preset: str = "tiny") -> tuple[str, ...]:
    """The objectives a world's plan trains: the registered ones (rapm_bench.plugins, in --objective's order)
    its WorldSpec has an iteration cost for (a plug-in's objective joins once its world prices it)."""
    from .distill.config import known_objectives

    costs = get_world_spec(preset).costs.iteration
    return tuple(n for n in known_objectives() if n in costs)


def __getattr__(name: str) -> Any:
    if name == "OBJECTIVES":  # the tiny plan's objectives, from the registry (no copy of the list here)
        return planned_objectives("tiny")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DistillStep:
    """One `rapm-bench distill` run: the student a registry model is evaluated with."""

    model: str  # registry name the student is evaluated as (rapm, pcm, dmd2)
    objective: str  # distill objective
    overrides: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields beside the preset's
    seed: int = 0  # training seed (LoRA init and every iteration's draws); the trajectories are shared
    steps: int = 4  # the student's sampling steps N (`distill --steps`)

    @property
    def key(self) -> str:
        """Run-folder name: `rapm` (4 steps, seed 0), `rapm-seed1`, `rapm-1step`, `rapm-1step-seed2`."""
        return run_key(self.model, self.seed, self.steps)


@dataclass(frozen=True)
class EvalStep:
    """One `rapm-bench eval`."""

    model: str
    steps: int
    trained: bool = False  # evaluate the LoRA of this plan's distillation of `model`, not the shipped one
    seed: int = 0  # which training seed's LoRA (trained only); seeds > 0 write under <out>/seeds/seed<S>/


def run_key(model: str, seed: int, steps: int = 4) -> str:
    """`rapm` for 4 steps and seed 0, `rapm-seed2` for seed 2, `rapm-1step-seed2` for a 1-step student."""
    return model + ("" if steps == 4 else f"-{steps}step") + ("" if seed == 0 else f"-seed{seed}")


@dataclass(frozen=True)
class Plan:
    """What `reproduce` does for one preset."""

    preset: str
    distills: tuple[DistillStep, ...]
    evals: tuple[EvalStep, ...]
    num_images: int | None  # None = the protocol's
    grid_prompts: int = 8  # captions in the side-by-side sample grid (0: none)
    protocol: str | None = None  # None = the preset's default protocol


TEACHER_STEPS_TINY = (1, 2, 4, 16)  # the README's default: within ~12 min on 2 CPU cores
STUDENT_STEPS_TINY = (1, 4)  # the default: the regime where methods differ (1 step) and the paper's (4)
SWEEP_STUDENT_STEPS = (1, 2, 4, 8)  # --sweep: students at every step count the published models ship
SWEEP_TEACHER_STEPS = (1, 2, 4, 8, 16, 50)


def tiny_plan(quick: bool, seeds: int = 1, steps: tuple[int, ...] | None = None, sweep: bool = False) -> Plan:
    """Tiny: RAPM, PCM and DMD2 trained here at one budget for each student step count N (`seeds` training
    seeds each, shared trajectories per N); the teacher at 1-16 steps (--sweep: 1-50) with its CFG."""
    budget = {"iters": 50} if quick else {}
    student_steps = steps or (SWEEP_STUDENT_STEPS if sweep else (4,) if quick else STUDENT_STEPS_TINY)
    distills = tuple(DistillStep(m, m, budget | {"slots": n} | ({"seed": s} if s else {}), s, n)
                     for n in student_steps for s in range(seeds) for m in planned_objectives("tiny"))
    teacher = SWEEP_TEACHER_STEPS if sweep else (4, 8) if quick else TEACHER_STEPS_TINY
    evals = (*(EvalStep("teacher", s) for s in teacher),
             *(EvalStep(d.model, d.steps, trained=True, seed=d.seed) for d in distills))
    return Plan("tiny", distills, evals, num_images=256 if quick else 512, grid_prompts=6 if quick else 8)


def sdxl_plan(quick: bool, seeds: int = 1, steps: tuple[int, ...] | None = None, sweep: bool = False) -> Plan:
    """SDXL: RAPM distilled here; the published RAPM, PCM, DMD2 LoRAs and the teacher on coco30k."""
    from .models import get_model

    if seeds != 1 or steps is not None or sweep:
        raise UserError("--seeds, --steps and --sweep apply to the tiny preset (one SDXL distillation takes "
                        "hours)")

    PCM_STEPS = get_model("pcm").steps  # the step counts its published LoRAs ship
    distills = (DistillStep("rapm", "rapm", {"iters": 2000} if quick else {}),)
    evals = (EvalStep("rapm", 4, trained=True), EvalStep("rapm", 4), *(EvalStep("pcm", s) for s in PCM_STEPS),
             EvalStep("dmd2", 4), EvalStep("teacher", 4), EvalStep("teacher", 25))
    # no sample grid: it would load the teacher once per row again; `rapm-bench generate` makes one
    # the trained RAPM's result goes to <out>/trained, beside the published LoRAs' rows (same model name)
    return Plan("sdxl", distills, evals, num_images=5000 if quick else None, grid_prompts=0)


def make_plan(preset: str, quick: bool = False, seeds: int = 1, steps: tuple[int, ...] | None = None,
              sweep: bool = False) -> Plan:
    """The plan of a preset (`steps`: the students' step counts; `sweep`: all of them and the teacher to 50)."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if steps is not None and (not steps or min(steps) < 1):
        raise UserError(f"--steps must list step counts of at least 1, got {','.join(map(str, steps)) or 'none'}")
    world = get_world_spec(preset)
    if world.plan is None:
        raise UserError(f"preset {preset!r} has no reproduce plan")
    return world.plan(quick, seeds, steps, sweep)


# --- cost estimates ----------------------------------------------------------------------------------
def costs(preset: str) -> Costs:
    """A world's seconds and megabytes per unit of work (its WorldSpec's `costs`)."""
    c = get_world_spec(preset).costs
    if c is None:
        raise UserError(f"preset {preset!r} has no cost estimates for reproduce")
    return c


def estimate(plan: Plan, distill_cfgs: dict[str, Any], num_images: int) -> list[tuple[str, float, float]]:
    """(step description, seconds, MB on disk) for every step of the plan."""
    from .distill.config import objective_spec
    from .models import get_model

    c = costs(plan.preset)
    rows: list[tuple[str, float, float]] = []
    seen_traj: set[tuple[Any, ...]] = set()
    for step in plan.distills:
        cfg = distill_cfgs[step.key]
        key = (cfg.num_trajectories, cfg.trajectory_seed, cfg.guidance, cfg.substeps, cfg.slots, cfg.prompts,
               objective_spec(cfg.objective).interior)  # PCM's cache also keeps the points inside the slots
        traj_s = 0.0 if key in seen_traj else cfg.num_trajectories * cfg.slots * cfg.substeps * 2 * c.trajectory_forward
        traj_mb = 0.0 if key in seen_traj else cfg.num_trajectories * c.trajectory_mb * (2 * cfg.slots + 1) / 9
        seen_traj.add(key)
        per_iter = c.iteration[step.objective] * (0.25 + 0.75 * cfg.slots / 4)  # measured at 4 slots; a fixed part
        rows.append((f"distill {step.key} ({step.objective}, {cfg.iters} iterations)",
                     traj_s + cfg.iters * per_iter, traj_mb + c.lora_mb))
    for ev in plan.evals:
        # a student trained here samples without CFG (RAPM, PCM: guidance 1; DMD2: 0), at the N it was trained for
        guidance = 1.0 if ev.trained else get_model(ev.model).resolve(ev.steps, None)[1]
        passes = ev.steps * (2 if (guidance is None or guidance > 1) else 1)
        rows.append((f"eval {run_key(ev.model, ev.seed)} {ev.steps}-step{' (trained here)' if ev.trained else ''}",
                     num_images * (passes * c.image_forward + c.image_overhead), 0.01))
    return rows


# --- running -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReproduceConfig:
    """`rapm-bench reproduce` options."""

    preset: str = "tiny"
    quick: bool = False
    out: str | None = None  # results folder; None = results/<preset>
    runs: str | None = None  # run folders; None = runs/reproduce/<preset>
    device: str = "auto"
    teacher: str | None = None  # sdxl: hub id or local folder
    prompts: str | None = None  # sdxl: COCO-2014 train captions for the trajectories
    data_dir: str | None = None  # sdxl: prepared protocol data (`rapm-bench data coco`)
    inception: str | None = None
    clip_checkpoint: str | None = None
    num_images: int | None = None  # None = the plan's
    seeds: int = 1  # tiny: training seeds per method for the equal-budget comparison
    steps: tuple[int, ...] | None = None  # tiny: the students' step counts N; None = the plan's (1 and 4)
    sweep: bool = False  # tiny: students at 1, 2, 4, 8 steps, the teacher at 1-50; results in <out>/sweep
    jobs: int = 1  # distillations / evaluations at once, one process each (a GPU fits ~8-16 tiny runs)
    dry_run: bool = False


def distill_configs(cfg: ReproduceConfig, plan: Plan, runs: Path) -> dict[str, Any]:
    """The resolved DistillConfig of each distillation step."""
    from .distill.config import resolve_distill

    world = {"device": cfg.device, "teacher": cfg.teacher}
    out = {}
    for step in plan.distills:
        objective = {} if step.objective == "rapm" else {"objective": step.objective}
        out[step.key] = resolve_distill(plan.preset, out=str(runs / step.key), prompts=cfg.prompts,
                                          **world, **objective, **step.overrides)
    return out


def run_distill(dcfg: Any, progress: bool = True) -> dict[str, Any]:
    """Distil, resume an interrupted run, or reuse a finished one (same config, same iterations)."""
    from .distill.engine import distill

    out = Path(dcfg.out)
    summary = out / "summary.json"
    if summary.is_file() and (out / "config.json").is_file():
        from .distill.config import DistillConfig

        old = DistillConfig.from_json((out / "config.json").read_text())
        if dcfg.grad_checkpointing is None:  # auto: the run's config.json holds the choice it made
            old = replace(old, grad_checkpointing=None)
        if old == dcfg and \
                json.loads(summary.read_text())["iters"] == dcfg.iters:
            return json.loads(summary.read_text()) | {"reused": True}
    return distill(dcfg, resume=(out / "config.json").is_file(), progress=progress)


def result_matches(path: Path, ev: EvalStep, num_images: int, protocol_hash: str, lora: Path | None) -> bool:
    """Whether an existing result JSON is this evaluation (same model, steps, protocol, images and weights)."""
    from .files import sha256_file

    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if (r.get("steps"), r.get("num_images"), r.get("model"), r.get("protocol_hash")) != \
            (ev.steps, num_images, ev.model, protocol_hash):
        return False
    if lora is None:
        return True
    return (r.get("lora") or {}).get("sha256") == sha256_file(lora)


def reproduce(cfg: ReproduceConfig, echo: Any = print) -> dict[str, Any]:
    """Run (or print, with `dry_run`) the preset's plan; return a summary."""
    from .eval.protocols import default_protocol, get_protocol
    from .report.comparison import write_comparison, write_step_grids
    from .report.html import write_report
    from .report.plots import write_plots
    from .report.table import write_table

    if cfg.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {cfg.jobs}")
    plan = make_plan(cfg.preset, cfg.quick, cfg.seeds, cfg.steps, cfg.sweep)
    out = Path(cfg.out) if cfg.out else Path("results") / plan.preset / ("sweep" if cfg.sweep else "")
    runs = Path(cfg.runs) if cfg.runs else Path("runs") / "reproduce" / plan.preset
    trained_out = out / get_world_spec(plan.preset).trained_results  # SDXL: beside the published LoRAs' rows
    protocol = get_protocol(plan.protocol) if plan.protocol else default_protocol(plan.preset)
    num_images = (plan.num_images or protocol.num_pairs) if cfg.num_images is None else cfg.num_images
    if num_images < 2:
        raise UserError(f"--num-images must be at least 2, got {num_images}")
    dcfgs = distill_configs(cfg, plan, runs)
    est = estimate(plan, dcfgs, num_images)
    total_s, total_mb = sum(s for _, s, _ in est), sum(m for _, _, m in est)
    flags = (" --quick" if cfg.quick else "") + (f" --seeds {cfg.seeds}" if cfg.seeds > 1 else "") + \
        (" --sweep" if cfg.sweep else "") + (f" --steps {','.join(map(str, cfg.steps))}" if cfg.steps else "")
    echo(f"reproduce --preset {plan.preset}{flags}: {len(plan.distills)} distillations, "
         f"{len(plan.evals)} evaluations of {num_images} images; results -> {out}, runs -> {runs}")
    for what, s, mb in est:
        echo(f"  {what:<48} ~{_duration(s):>8}  ~{mb:,.1f} MB")
    echo(f"  estimated total: ~{_duration(total_s)} on {costs(plan.preset).device} with --jobs 1 (finished steps are skipped), "
         f"~{total_mb:,.0f} MB on disk")
    if cfg.dry_run:
        return {"plan": plan, "estimate": est, "ran": []}

    t0 = time.perf_counter()
    ran: list[str] = []
    loras = {step.key: Path(dcfgs[step.key].out) / "lora.safetensors" for step in plan.distills}
    # 1. Distillations, `jobs` at once, the longest first (two runs that share a trajectory cache may both build
    #    a shard: the writes are atomic and the shards identical, and a shard takes seconds).
    cost = {row[0].split()[1]: row[1] for row in est if row[0].startswith("distill ")}
    order = sorted((s.key for s in plan.distills), key=lambda k: -cost.get(k, 0.0)) if cfg.jobs > 1 else \
        [s.key for s in plan.distills]
    for i, summary in _pool(cfg.jobs, [(run_distill, (dcfgs[key], cfg.jobs == 1)) for key in order]):
        if not summary.get("reused"):
            ran.append(f"distill {order[i]}")
        echo(f"distill {order[i]}: {'reused' if summary.get('reused') else 'done'} -> {loras[order[i]]}")
    # 2. Evaluations: the first in this process (it builds the reference statistics every job reads).
    todo: list[tuple[EvalStep, Path, Path | None]] = []
    for ev in plan.evals:
        folder = (trained_out if ev.seed == 0 else out / "seeds" / f"seed{ev.seed}") if ev.trained else out
        lora = loras[run_key(ev.model, ev.seed, ev.steps)] if ev.trained else None
        path = folder / _result_name(ev.model, ev.steps, protocol.name)
        if path.is_file() and result_matches(path, ev, num_images, protocol.hash(), lora):
            echo(f"eval {run_key(ev.model, ev.seed)} {ev.steps}-step: reused {path}")
            continue
        todo.append((ev, folder, lora))
    jobs = [(run_eval, (cfg, plan, ev, folder, lora, protocol.name, num_images)) for ev, folder, lora in todo]
    for i, result in itertools.chain(_pool(1, jobs[:1]), ((i + 1, r) for i, r in _pool(cfg.jobs, jobs[1:]))):
        ev = todo[i][0]
        ran.append(f"eval {run_key(ev.model, ev.seed)} {ev.steps}")
        echo(f"eval {run_key(ev.model, ev.seed)} {ev.steps}-step: FID {result['fid']:.3f}  "
             f"CLIP {result['clip_score']:.3f}")
    # 3. Table, plots, the comparison per step count and its sample grids.
    inputs = [out] + ([trained_out] if trained_out != out else [])
    write_table(inputs, out, plan.preset)
    write_plots(inputs, out, plan.preset, plan.grid_prompts, cfg.device)
    wrote = ["table.md", "fid_vs_steps.png", "fid_vs_clip.png", "samples.png"]
    if len({s.objective for s in plan.distills}) > 1:
        if write_comparison(plan, dcfgs, out, protocol.name) is not None:
            wrote.append("comparison.md")
        wrote += [p.name for p in write_step_grids(plan, out, protocol.name, plan.grid_prompts, cfg.device)]
    wrote.append(write_report(out).name)  # report.html: the table, plots, grids and provenance in one page
    echo(f"wrote {', '.join(wrote)} in {out} ({len(ran)} steps run, {time.perf_counter() - t0:.0f} s)")
    return {"plan": plan, "estimate": est, "ran": ran, "out": str(out)}


def _result_name(model: str, steps: int, protocol: str) -> str:
    """The eval engine's result file name."""
    from .eval.engine import result_name

    return result_name(model, steps, protocol)


def run_eval(cfg: ReproduceConfig, plan: Plan, ev: EvalStep, folder: Path, lora: Path | None, protocol: str,
             num_images: int) -> dict[str, Any]:
    """One evaluation of the plan (a top-level function: it runs in a worker process with --jobs)."""
    from .config import EvalConfig, WorldConfig
    from .eval.engine import evaluate

    world = WorldConfig(preset=plan.preset, teacher=cfg.teacher, device=cfg.device)
    result = evaluate(EvalConfig(world=world, model=ev.model, lora=str(lora) if lora else None, steps=ev.steps,
                                 protocol=protocol, num_images=num_images, out=str(folder), data_dir=cfg.data_dir,
                                 inception=cfg.inception, clip_checkpoint=cfg.clip_checkpoint))
    assert result is not None  # one process
    return result


def _pool(jobs: int, calls: list[tuple[Any, tuple[Any, ...]]]) -> Iterator[tuple[int, Any]]:
    """(index, result) of each call as it finishes, `jobs` worker processes at once (1: here, in order)."""
    if jobs == 1 or len(calls) <= 1:
        for i, (fn, args) in enumerate(calls):
            yield i, fn(*args)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(min(jobs, len(calls)), mp_context=mp.get_context("spawn"),
                                initializer=_worker_init, initargs=(jobs,)) as pool:
        futures = {pool.submit(fn, *args): i for i, (fn, args) in enumerate(calls)}
        for f in cf.as_completed(futures):
            yield futures[f], f.result()


def _worker_init(jobs: int) -> None:
    """A worker's share of the CPU threads (tiny runs on a GPU are launch-bound: one thread each is plenty)."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def _duration(seconds: float) -> str:
    """3 s, 4.2 min, 1.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
