"""Running the stages and reporting them: the estimates, issue 14's goals, the result JSON, the summary."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..provenance import device_info, git_commit_state, library_versions
from ..worlds.base import pick_device
from ..worlds.registry import get_world_spec
from .config import STAGES, BenchConfig, validate
from .measure import peak_for
from .stages import (
    Bench,
    headline_row,
    stage_generate,
    stage_matmul,
    stage_rapm_iteration,
    stage_trajectories,
    stage_unet_forward,
)
from .stages_eval import stage_eval_features, stage_feature_precision, stage_vae_precision

STAGE_FUNCS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "matmul": stage_matmul, "unet-forward": stage_unet_forward, "rapm-iteration": stage_rapm_iteration,
    "trajectories": stage_trajectories, "generate": stage_generate, "eval-features": stage_eval_features,
    "vae-precision": stage_vae_precision, "feature-precision": stage_feature_precision,
}


# --- estimates and goals -------------------------------------------------------------------------------------
def estimates(cfg: BenchConfig, stages: dict[str, Any]) -> dict[str, Any]:
    """Whole-job times from the stages that ran: distillation, 30K generations, 30K evaluations."""
    out: dict[str, Any] = {}
    traj, rapm = stages.get("trajectories"), stages.get("rapm-iteration")
    if traj and rapm:
        t_traj = cfg.rapm.trajectories * headline_row(traj)["seconds_per_unit"]
        t_iter = cfg.rapm.iterations * headline_row(rapm)["seconds"]
        out["distillation"] = {"trajectories": cfg.rapm.trajectories, "iterations": cfg.rapm.iterations,
                               "variant": rapm["headline"], "trajectory_hours": t_traj / 3600,
                               "training_hours": t_iter / 3600, "hours": (t_traj + t_iter) / 3600,
                               "hours_by_variant": {r["name"]: (t_traj + cfg.rapm.iterations * r["seconds"]) / 3600
                                                    for r in rapm["variants"]},
                               "paper_hours_a6000": 31.5}
    if traj:
        row = headline_row(traj)
        out["trajectories"] = {"num": cfg.rapm.trajectories, "seconds": cfg.rapm.trajectories * row["seconds_per_unit"],
                               "floor_seconds": None if row["floor_seconds"] is None
                               else cfg.rapm.trajectories * row["floor_seconds"] / row["units_per_call"]}
    if gen := stages.get("generate"):
        row = headline_row(gen)
        out["generate"] = {"images": cfg.gen.images, "seconds": cfg.gen.images * row["seconds_per_unit"],
                           "floor_seconds": None if row["floor_seconds"] is None
                           else cfg.gen.images * row["floor_seconds"] / row["units_per_call"]}
    if ev := stages.get("eval-features"):
        per_precision: dict[str, float] = {}
        for row in ev["variants"]:
            p = row.get("precision", "fp32")
            per_precision[p] = per_precision.get(p, 0.0) + row["seconds_per_unit"]
        out["eval_features"] = {"images": cfg.eval.images,
                                "seconds": {p: cfg.eval.images * s for p, s in per_precision.items()}}
    return out


@dataclass(frozen=True)
class Goal:
    """A target of issue #7 for the full SDXL architecture on one H100."""

    name: str
    what: str
    target: float
    higher_is_better: bool

    def check(self, value: float | None, applies: bool) -> dict[str, Any]:
        """JSON row: the value, the target and whether it is met (None where unmeasured)."""
        met = None if value is None else (value >= self.target if self.higher_is_better else value <= self.target)
        return {"goal": self.name, "what": self.what, "value": value,
                "target": (">= " if self.higher_is_better else "<= ") + f"{self.target:g}",
                "met": met, "applies": applies}


GOALS: tuple[Goal, ...] = (  # issue 14's targets for the full SDXL architecture on one H200
    Goal("rapm_iteration_seconds", "RAPM iteration, batch 1, the sdxl preset as the engine runs it", 0.50, False),
    Goal("rapm_lora_overhead", "RAPM iteration (batch 1) over the same passes without LoRA", 1.10, False),
    Goal("rapm_peak_memory_gib", "peak memory of the RAPM iteration with gradient checkpointing", 24.0, False),
    Goal("distillation_hours", "1000 trajectories + 20K iterations (paper: 31.5 h on one A6000)", 3.0, False),
    Goal("trajectories_ratio", "1000 trajectories: floor / time", 0.65, True),
    Goal("generate_30k_seconds", "30K images, 4 steps, guidance 1, VAE decode in the protocol's precision", 2700.0,
         False),
    Goal("eval_30k_seconds", "features of 30K images (Inception + ViT-g-14 CLIP) in the protocol's precision", 120.0,
         False),
)


def goal_values(stages: dict[str, Any], est: dict[str, Any], feature_precision: str = "fp32") -> dict[str, float | None]:
    """Each goal's measured value (None where its stage did not run)."""
    values: dict[str, float | None] = {g.name: None for g in GOALS}
    if rapm := stages.get("rapm-iteration"):
        row = headline_row(rapm)
        values["rapm_iteration_seconds"] = row["seconds"]
        values["rapm_lora_overhead"] = row.get("vs_plain")
        ckpt = [r["peak_memory_gib"] for r in rapm["variants"] if r["grad_checkpointing"] and r["lora"] != "plain"
                and r["peak_memory_gib"] is not None]
        values["rapm_peak_memory_gib"] = min(ckpt) if ckpt else None
    if "distillation" in est:
        values["distillation_hours"] = est["distillation"]["hours"]
    if stages.get("trajectories"):
        values["trajectories_ratio"] = headline_row(stages["trajectories"])["ratio"]
    if "generate" in est:
        values["generate_30k_seconds"] = est["generate"]["seconds"]
    if "eval_features" in est:
        values["eval_30k_seconds"] = est["eval_features"]["seconds"].get(feature_precision)
    return values


def result_path(cfg: BenchConfig, slug: str) -> Path:
    """results/bench/<preset>[-small]-<device>.json."""
    return Path(cfg.out) / f"{cfg.name}-{slug}.json"


# --- the command ---------------------------------------------------------------------------------------------------
def partial_path(cfg: BenchConfig, slug: str) -> Path:
    """Where a run keeps its finished stages until it ends (`--resume` continues from them)."""
    return result_path(cfg, slug).with_suffix(".partial.json")


def _identity(cfg: BenchConfig, info: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: config, GPU, commit and libraries."""
    return json.loads(json.dumps({"config": asdict(cfg), "device": info["name"], "git": git_commit_state(),
                                  "versions": library_versions()}))


def _resumed(cfg: BenchConfig, info: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """The stages an unfinished run of the same identity finished ({} when there is none)."""
    path = partial_path(cfg, info["slug"])
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("stages", {}), dict):
            raise ValueError("not a partial bench record")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the unfinished run {path} ({e}): delete it, or run without --resume") from None
    differs = [k for k in identity if saved.get("identity", {}).get(k) != identity[k]]
    if differs:
        raise UserError(f"the unfinished run {path} differs in {', '.join(differs)}: run without --resume "
                        "(it starts afresh and replaces that file)")
    return dict(saved.get("stages", {}))


def run_bench(cfg: BenchConfig, argv: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
              resume: bool = False) -> dict[str, Any]:
    """`rapm-bench bench`: run the stages, write the result JSON atomically, return it.

    After each stage the finished stages are kept in `partial_path`; with `resume`, a run of the same config,
    GPU, commit and libraries skips the stages found there (a run cut off by a time limit goes on).
    """
    validate(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_stages(cfg, argv, progress, resume)
    finally:
        torch.set_num_threads(threads)


def _run_stages(cfg: BenchConfig, argv: Sequence[str] | None, progress: Callable[[str], None] | None,
                resume: bool) -> dict[str, Any]:
    """The body of `run_bench`, with the thread count set."""
    from ..files import atomic_write_bytes

    device = pick_device(cfg.device)
    peak, peak_source = peak_for(device, cfg.peak_tflops)
    info = device_info(device)
    identity = _identity(cfg, info)
    stages: dict[str, Any] = _resumed(cfg, info, identity) if resume else {}
    resumed = list(stages)
    if progress and resumed:
        progress(f"resumed: {', '.join(resumed)} (finished by an earlier run of this config)")
    partial = partial_path(cfg, info["slug"])
    b = Bench(cfg, device, peak)
    t0 = time.perf_counter()
    for name in [s for s in STAGES if s in cfg.stages and s not in stages]:
        if progress:
            progress(f"{name} ...")
        t_stage = time.perf_counter()
        stages[name] = STAGE_FUNCS[name](b) | {"stage_seconds": round(time.perf_counter() - t_stage, 2)}
        atomic_write_bytes(partial, (json.dumps({"identity": identity, "stages": stages}, indent=2) + "\n").encode())
        if progress:
            progress("\n".join(stage_lines(name, stages[name])))
    stages = {s: stages[s] for s in STAGES if s in stages}  # the stages' order, resumed ones included
    est = estimates(cfg, stages)
    applies = get_world_spec(cfg.preset).bench_goals and cfg.scale == "full" and device.type == "cuda"
    from ..eval.protocols import default_protocol

    values = goal_values(stages, est, default_protocol(cfg.preset).feature_precision)
    result = {
        "schema": 1, "preset": cfg.name, "device": info | {"peak_tflops": peak, "peak_source": peak_source},
        "world": b.world.describe() if b._world is not None else None,
        "stages": stages, "estimates": est, "goals": [g.check(values[g.name], applies) for g in GOALS],
        "versions": library_versions(), "git": git_commit_state(),
        "command": shlex.join(argv) if argv is not None else shlex.join(sys.argv),
        "seconds_total": round(time.perf_counter() - t0 + sum(stages[s]["stage_seconds"] for s in resumed), 2),
        "resumed_stages": resumed, "config": asdict(cfg),
    }
    path = result_path(cfg, info["slug"])
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    partial.unlink(missing_ok=True)
    result["path"] = str(path)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_HEAD = f"  {'variant':42} {'s/call':>9} {'units/s':>10} {'TFLOP/call':>11} {'TFLOP/s':>8} {'ratio':>6} {'GiB':>7}"


def stage_lines(name: str, stage: dict[str, Any]) -> list[str]:
    """A stage's measurements as table lines (the headline starred)."""
    lines = [f"{name} ({stage['stage_seconds']:.1f} s)", _HEAD]
    for r in stage["variants"]:
        mark = "*" if r["name"] == stage["headline"] else " "
        extra = f"  x{r['vs_plain']:.2f} vs plain" if r.get("vs_plain") is not None and r["lora"] != "plain" else ""
        lines.append(f" {mark}{r['name'][:42]:42} {r['seconds']:9.4f} {r['throughput_per_s']:10.2f} "
                     f"{_fmt(None if r['flops_per_call'] is None else r['flops_per_call'] / 1e12, '11.4f')} "
                     f"{_fmt(r['tflops_achieved'], '8.2f')} {_fmt(r['ratio'], '6.3f')} "
                     f"{_fmt(r['peak_memory_gib'], '7.2f')}{extra}")
    for vae, d in stage.get("differences_vs_fp32", {}).items():
        lines.append(f"  uint8 vs fp32, VAE {vae}: max {d['max']}, mean {d['mean']:.4f}, changed {d['changed_share']:.2%}")
    for net, rows in stage.get("networks", {}).items():
        for p, r in rows.items():
            lines.append(f"  {net} {p}: FID {r['fid']:.6g} (rel. change {r.get('fid_rel_change', 0):.2e}), "
                         f"CLIP {r['clip']:.5g} (abs. change {r.get('clip_abs_change', 0):.2e})")
    return lines


def summary(result: dict[str, Any]) -> str:
    """A plain-text table of every measurement, the estimates and the goals."""
    dev = result["device"]
    lines = [f"rapm-bench bench {result['preset']} on {dev['name']} (peak {_fmt(dev['peak_tflops'], 'g')} TFLOP/s); "
             f"{result['seconds_total']:.1f} s"]
    for name, stage in result["stages"].items():
        lines += stage_lines(name, stage)
    est = result["estimates"]
    if "distillation" in est:
        d = est["distillation"]
        lines.append(f"distillation estimate: {d['hours']:.2f} h ({d['trajectories']} trajectories "
                     f"{d['trajectory_hours']:.2f} h + {d['iterations']} iterations {d['training_hours']:.2f} h)")
        lines.append("  by RAPM variant: " + ", ".join(f"{k} {h:.3g} h" for k, h in d["hours_by_variant"].items()))
    if "generate" in est:
        lines.append(f"{est['generate']['images']} images: {est['generate']['seconds'] / 60:.1f} min")
    if "eval_features" in est:
        per = ", ".join(f"{p} {s:.0f} s" for p, s in est["eval_features"]["seconds"].items())
        lines.append(f"features of {est['eval_features']['images']} images: {per}")
    for g in result["goals"]:
        if g["value"] is not None:
            state = {True: "met", False: "NOT met", None: "-"}[g["met"]] if g["applies"] else "n/a here"
            lines.append(f"goal {g['goal']}: {g['value']:.3g} (target {g['target']}): {state}")
    lines.append(f"wrote {result.get('path')}")
    return "\n".join(lines)
