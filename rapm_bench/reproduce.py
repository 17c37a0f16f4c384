"""`rapm-bench reproduce`: distil, evaluate every model at its step counts, write the table, in one command.

A plan is data (STYLE.md rule 2): the distillation runs and the evaluations of one preset,
each with a cost estimate. Running it skips every step whose output already exists and
matches (a finished run folder, a result JSON of the same model, steps, guidance, protocol,
image count and weights), so a second run only rewrites the table and plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

OBJECTIVES = ("rapm", "pcm", "dmd2")


@dataclass(frozen=True)
class DistillStep:
    """One `rapm-bench distill` run: the student a registry model is evaluated with."""

    model: str  # registry name the student is evaluated as (rapm, pcm, dmd2)
    objective: str  # distill objective
    overrides: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields beside the preset's
    seed: int = 0  # training seed (LoRA init and every iteration's draws); the trajectories are shared

    @property
    def key(self) -> str:
        """Run-folder name: `rapm`, or `rapm-seed1` for another training seed."""
        return run_key(self.model, self.seed)


@dataclass(frozen=True)
class EvalStep:
    """One `rapm-bench eval`."""

    model: str
    steps: int
    trained: bool = False  # evaluate the LoRA of this plan's distillation of `model`, not the shipped one
    seed: int = 0  # which training seed's LoRA (trained only); seeds > 0 write under <out>/seeds/seed<S>/


def run_key(model: str, seed: int) -> str:
    """`rapm` for seed 0, `rapm-seed2` for seed 2."""
    return model if seed == 0 else f"{model}-seed{seed}"


@dataclass(frozen=True)
class Plan:
    """What `reproduce` does for one preset."""

    preset: str
    distills: tuple[DistillStep, ...]
    evals: tuple[EvalStep, ...]
    num_images: int | None  # None = the protocol's
    grid_prompts: int = 8  # captions in the side-by-side sample grid (0: none)
    protocol: str | None = None  # None = the preset's default protocol


TEACHER_STEPS_TINY = (2, 4, 8, 16)


def tiny_plan(quick: bool, seeds: int = 1) -> Plan:
    """Tiny: RAPM, PCM and DMD2 trained here at one budget (`seeds` training seeds each); the teacher at
    2-16 steps (its CFG)."""
    budget = {"iters": 50} if quick else {}
    distills = tuple(DistillStep(m, m, budget | ({"seed": s} if s else {}), s)
                     for s in range(seeds) for m in OBJECTIVES)
    teacher = (4, 8) if quick else TEACHER_STEPS_TINY
    evals = (*(EvalStep("teacher", s) for s in teacher),
             *(EvalStep(m, 4, trained=True, seed=s) for s in range(seeds) for m in OBJECTIVES))
    return Plan("tiny", distills, evals, num_images=256 if quick else 512, grid_prompts=6 if quick else 8)


def sdxl_plan(quick: bool) -> Plan:
    """SDXL: RAPM distilled here; the published RAPM, PCM, DMD2 LoRAs and the teacher on coco30k."""
    from baselines.pcm import STEPS as PCM_STEPS

    distills = (DistillStep("rapm", "rapm", {"iters": 2000} if quick else {}),)
    evals = (EvalStep("rapm", 4, trained=True), EvalStep("rapm", 4), *(EvalStep("pcm", s) for s in PCM_STEPS),
             EvalStep("dmd2", 4), EvalStep("teacher", 4), EvalStep("teacher", 25))
    # no sample grid: it would load the teacher once per row again; `rapm-bench generate` makes one
    return Plan("sdxl", distills, evals, num_images=5000 if quick else None, grid_prompts=0)


def make_plan(preset: str, quick: bool = False, seeds: int = 1) -> Plan:
    """The plan of a preset."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if preset == "tiny":
        return tiny_plan(quick, seeds)
    if preset == "sdxl":
        if seeds != 1:
            raise UserError("--seeds applies to the tiny preset (one SDXL distillation takes hours)")
        return sdxl_plan(quick)
    raise UserError(f"unknown preset {preset!r}; use tiny or sdxl")


# --- cost estimates ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work, measured (tiny: a 2-core CPU, results/tiny/rapm.md) or derived (SDXL:
    one H100/H200 from REFERENCE.md's timings, eager bf16)."""

    trajectory_forward: float  # one teacher image-forward inside the batched trajectory precompute
    iteration: dict[str, float]  # one training iteration per objective
    image_forward: float  # one image-forward while generating for an evaluation (batched)
    image_overhead: float  # per image: decode, features, CLIP
    trajectory_mb: float  # disk per trajectory
    lora_mb: float


COSTS = {
    # tiny, measured by `rapm-bench reproduce` on an idle 2-core CPU (results/tiny/README.md): 256
    # trajectories × 16 sub-steps × 2 (CFG) in 75 s; 200 iterations RAPM 79 s, PCM 39 s, DMD2 80 s;
    # 512 images at 4 / 32 image-forwards in 18.4 / 133 s.
    "tiny": Costs(trajectory_forward=75 / (256 * 16 * 2), iteration={"rapm": 0.40, "pcm": 0.20, "dmd2": 0.40},
                  image_forward=0.0080, image_overhead=0.0040, trajectory_mb=9 * 3 * 32 * 32 * 4 / 1e6, lora_mb=0.25),
    # SDXL on one H100 (results/bench/README.md): UNet forward ≈ 19 ms per image at batch 8 (146 ms); a RAPM
    # iteration of the engine 1.3 s (--lora-impl merged, 4 slots a pass; PCM/DMD2 on PEFT layers: guesses); a
    # 4-step evaluation 0.241 s per image with the fp32 VAE, Inception and ViT-g-14 (scaling, one GPU).
    "sdxl": Costs(trajectory_forward=0.019, iteration={"rapm": 1.3, "pcm": 2.0, "dmd2": 4.0},
                  image_forward=0.019, image_overhead=0.165, trajectory_mb=9 * 4 * 128 * 128 * 2 / 1e6, lora_mb=6.0),
}


def estimate(plan: Plan, distill_cfgs: dict[str, Any], num_images: int) -> list[tuple[str, float, float]]:
    """(step description, seconds, MB on disk) for every step of the plan."""
    from .models import get_model

    c = COSTS[plan.preset]
    rows: list[tuple[str, float, float]] = []
    seen_traj: set[tuple[Any, ...]] = set()
    for step in plan.distills:
        cfg = distill_cfgs[step.key]
        key = (cfg.num_trajectories, cfg.trajectory_seed, cfg.guidance, cfg.substeps, cfg.slots, cfg.prompts,
               cfg.objective == "pcm")  # PCM's cache also keeps the points inside the slots
        traj_s = 0.0 if key in seen_traj else cfg.num_trajectories * cfg.slots * cfg.substeps * 2 * c.trajectory_forward
        traj_mb = 0.0 if key in seen_traj else cfg.num_trajectories * c.trajectory_mb
        seen_traj.add(key)
        rows.append((f"distill {step.key} ({step.objective}, {cfg.iters} iterations)",
                     traj_s + cfg.iters * c.iteration[step.objective], traj_mb + c.lora_mb))
    for ev in plan.evals:
        spec = get_model(ev.model)
        _, guidance = spec.resolve(ev.steps, None)
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

        if DistillConfig.from_json((out / "config.json").read_text()) == dcfg and \
                json.loads(summary.read_text())["iters"] == dcfg.iters:
            return json.loads(summary.read_text()) | {"reused": True}
    return distill(dcfg, resume=(out / "config.json").is_file(), progress=progress)


def result_matches(path: Path, ev: EvalStep, num_images: int, protocol_hash: str, lora: Path | None) -> bool:
    """Whether an existing result JSON is this evaluation (same model, steps, protocol, images and weights)."""
    from .generate import sha256_file

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
    from .config import EvalConfig, WorldConfig
    from .eval.engine import evaluate, result_name
    from .eval.protocols import default_protocol, get_protocol
    from .report.plots import write_plots
    from .report.table import write_table

    plan = make_plan(cfg.preset, cfg.quick, cfg.seeds)
    out = Path(cfg.out) if cfg.out else Path("results") / plan.preset
    runs = Path(cfg.runs) if cfg.runs else Path("runs") / "reproduce" / plan.preset
    trained_out = out if plan.preset == "tiny" else out / "trained"  # SDXL: beside the published LoRAs' rows
    protocol = get_protocol(plan.protocol) if plan.protocol else default_protocol(plan.preset)
    num_images = cfg.num_images or plan.num_images or protocol.num_pairs
    if num_images < 2:
        raise UserError(f"--num-images must be at least 2, got {num_images}")
    dcfgs = distill_configs(cfg, plan, runs)
    est = estimate(plan, dcfgs, num_images)
    total_s, total_mb = sum(s for _, s, _ in est), sum(m for _, _, m in est)
    flags = (" --quick" if cfg.quick else "") + (f" --seeds {cfg.seeds}" if cfg.seeds > 1 else "")
    echo(f"reproduce --preset {plan.preset}{flags}: {len(plan.distills)} distillations, "
         f"{len(plan.evals)} evaluations of {num_images} images; results -> {out}, runs -> {runs}")
    for what, s, mb in est:
        echo(f"  {what:<48} ~{_duration(s):>8}  ~{mb:,.1f} MB")
    device_note = "a 2-core CPU" if plan.preset == "tiny" else "one H100"
    echo(f"  estimated total: ~{_duration(total_s)} on {device_note} (finished steps are skipped), "
         f"~{total_mb:,.0f} MB on disk")
    if cfg.dry_run:
        return {"plan": plan, "estimate": est, "ran": []}

    t0 = time.perf_counter()
    ran: list[str] = []
    loras: dict[str, Path] = {}
    for step in plan.distills:
        summary = run_distill(dcfgs[step.key])
        loras[step.key] = Path(dcfgs[step.key].out) / "lora.safetensors"
        if not summary.get("reused"):
            ran.append(f"distill {step.key}")
        echo(f"distill {step.key}: {'reused' if summary.get('reused') else 'done'} -> {loras[step.key]}")
    world = WorldConfig(preset=plan.preset, teacher=cfg.teacher, device=cfg.device)
    for ev in plan.evals:
        folder = (trained_out if ev.seed == 0 else out / "seeds" / f"seed{ev.seed}") if ev.trained else out
        lora = loras[run_key(ev.model, ev.seed)] if ev.trained else None
        path = folder / result_name(ev.model, ev.steps, protocol.name)
        name = run_key(ev.model, ev.seed)
        if path.is_file() and result_matches(path, ev, num_images, protocol.hash(), lora):
            echo(f"eval {name} {ev.steps}-step: reused {path}")
            continue
        result = evaluate(EvalConfig(world=world, model=ev.model, lora=str(lora) if lora else None, steps=ev.steps,
                                     protocol=protocol.name, num_images=num_images, out=str(folder),
                                     data_dir=cfg.data_dir,
                                     inception=cfg.inception, clip_checkpoint=cfg.clip_checkpoint))
        if result is not None:
            ran.append(f"eval {name} {ev.steps}")
            echo(f"eval {name} {ev.steps}-step: FID {result['fid']:.3f}  CLIP {result['clip_score']:.3f}")
    inputs = [out] + ([trained_out] if trained_out != out else [])
    write_table(inputs, out, plan.preset)
    write_plots(inputs, out, plan.preset, plan.grid_prompts, cfg.device)
    if len({s.objective for s in plan.distills}) > 1 and len({s.seed for s in plan.distills}) > 1:
        # several seeds: the comparison; a one-seed run leaves an earlier --seeds K comparison in place
        write_comparison(plan, dcfgs, out, protocol.name)
        echo(f"wrote {out / 'comparison.md'}")
    echo(f"wrote {out / 'table.md'}, fid_vs_steps.png, fid_vs_clip.png, samples.png "
         f"({len(ran)} steps run, {time.perf_counter() - t0:.0f} s)")
    return {"plan": plan, "estimate": est, "ran": ran, "out": str(out)}


def write_comparison(plan: Plan, dcfgs: dict[str, Any], out: Path, protocol: str) -> dict[str, Any]:
    """The equal-budget comparison of the methods trained here: per method, each seed's scores and training
    time, their mean and sample standard deviation -> comparison.json and comparison.md."""
    import statistics

    from .eval.engine import result_name
    from .generate import atomic_write_bytes

    methods: dict[str, dict[str, Any]] = {}
    num_images = None
    for step in plan.distills:
        ev = next(e for e in plan.evals if e.trained and e.model == step.model and e.seed == step.seed)
        folder = out if step.seed == 0 else out / "seeds" / f"seed{step.seed}"
        r = json.loads((folder / result_name(ev.model, ev.steps, protocol)).read_text())
        summary = json.loads((Path(dcfgs[step.key].out) / "summary.json").read_text())
        num_images = r["num_images"]
        m = methods.setdefault(step.model, {"objective": step.objective, "iters": summary["iters"],
                                            "steps": ev.steps, "runs": []})
        m["runs"].append({"seed": step.seed, "fid": r["fid"], "clip_score": r["clip_score"],
                          "retrieval_accuracy": r.get("retrieval_accuracy"),
                          "train_seconds": summary["train_seconds"],
                          "seconds_per_iteration": summary["train_seconds"] / max(summary["iters"], 1),
                          "machine": summary["machine"]})
    for m in methods.values():
        for k in ("fid", "clip_score", "retrieval_accuracy", "seconds_per_iteration"):
            xs = [run[k] for run in m["runs"] if run[k] is not None]
            m[k] = {"mean": statistics.fmean(xs) if xs else None,
                    "sd": statistics.stdev(xs) if len(xs) > 1 else None}
    record = {"preset": plan.preset, "protocol": protocol, "num_images": num_images, "methods": methods}

    def cell(stat: dict[str, Any], fmt: str) -> str:
        if stat["mean"] is None:
            return "–"
        return format(stat["mean"], fmt) + ("" if stat["sd"] is None else " ± " + format(stat["sd"], fmt))

    lines = [f"# Equal-budget comparison ({plan.preset}, protocol {protocol}, {record['num_images']} images)", "",
             "Each method distilled by the same engine from the same teacher trajectories: batch 1, the same "
             "iterations, the same device; mean ± sample standard deviation over training seeds "
             "(`rapm-bench reproduce --seeds K`).", "",
             "| method | iterations | seeds | FID ↓ | CLIP ↑ | retrieval ↑ | s / iteration | FID per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        per_seed = ", ".join(f"{run['fid']:.2f}" for run in m["runs"])
        lines.append(f"| {name} ({m['steps']}-step) | {m['iters']} | {len(m['runs'])} | {cell(m['fid'], '.2f')} | "
                     f"{cell(m['clip_score'], '.2f')} | {cell(m['retrieval_accuracy'], '.3f')} | "
                     f"{cell(m['seconds_per_iteration'], '.2f')} | {per_seed} |")
    machines = sorted({str(run["machine"]) for m in methods.values() for run in m["runs"]})
    lines += ["", f"Training machine: {'; '.join(machines)}.", ""]
    atomic_write_bytes(out / "comparison.json", (json.dumps(record, indent=2) + "\n").encode())
    atomic_write_bytes(out / "comparison.md", "\n".join(lines).encode())
    return record


def _duration(seconds: float) -> str:
    """3 s, 4.2 min, 1.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
