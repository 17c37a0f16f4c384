"""The distillation loop: one readable function with commented phases (EDM2 `training_loop` style).

One loop for every objective (`cfg.objective`: RAPM, or the re-trained PCM and DMD2
baselines, objectives.py): same trajectories, same LoRA student, same run folder.

Run folder (`cfg.out`): config.json (first), train_log.jsonl, samples/step_*.png,
checkpoint.safetensors (LoRA, the objective's critic modules, optimisers, RNG, step: atomic),
lora.safetensors (the student, diffusers or kohya keys), summary.json.

Every iteration re-seeds from (seed, step) (docs/design.md §1), so a run interrupted and
resumed from its last checkpoint ends bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..worlds.registry import get_world_spec
from .checkpoint import CHECKPOINT
from .config import DistillConfig, objective_spec, validate
from .objectives import STUDENT as ADAPTER  # the student's PEFT adapter name

LOG = "train_log.jsonl"
COND_CACHE = 2048  # prompt encodings kept on the device (SDXL: 0.3 MB each, 1000 trajectories ~ 0.3 GB)
LORA_FILE = "lora.safetensors"


class DivergedError(UserError):
    """A loss or gradient went NaN/inf: the run stops and keeps its last good checkpoint."""


# --- small helpers -----------------------------------------------------------------------------------
def derived_seed(seed: int, purpose: str, step: int) -> int:
    """A 63-bit seed for (seed, purpose, step): independent streams, no overlap between purposes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{step}".encode()).digest()[:8], "little") >> 1


def trajectory_index(seed: int, step: int, num: int) -> int:
    """The trajectory of iteration `step`: a fresh permutation of the K trajectories per epoch."""
    epoch, i = divmod(step, num)
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch)))
    return int(perm[i])


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A cached trajectory tensor as fp32 on `device`; to a GPU through pinned memory, without the stream sync of a
    copy from pageable memory (issue 14)."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device, torch.float32)


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant (so `--resume --iters` can extend a run without changing its past)."""
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def cache_root(cfg: DistillConfig) -> Path:
    """Where the trajectory caches live."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    from ..files import default_cache_dir

    return default_cache_dir() / "trajectories"


def open_run(out: Path, cfg: DistillConfig, resume: bool) -> None:
    """Accept `out` if new/empty or holding this run (`--resume` may change --iters); write config.json."""
    from ..files import atomic_write_bytes, remove_stale_tmp
    from ..locks import is_lock_file

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    cfg_path = out / "config.json"
    remove_stale_tmp(out)  # a writer killed mid-write leaves only a temporary file behind
    if out.exists() and any(not is_lock_file(p) for p in out.iterdir()):  # the lock files are not the run's
        if not cfg_path.is_file():
            raise UserError(f"--out {out} holds other files; choose another --out or empty it")
        try:
            old = DistillConfig.from_json(cfg_path.read_text())
        except (KeyError, TypeError, ValueError):
            raise UserError(f"--out {out} holds another command's files (its config.json is not a distill "
                            "config); choose another --out or empty it") from None
        old = replace(old, log_with=cfg.log_with)  # where the curves also go does not define the run
        if old != cfg and not (resume and replace(old, iters=cfg.iters) == cfg):
            diff = old.diff(cfg)  # config.json's (flat) names
            raise UserError(f"--out {out} holds a run with another config (differs in: {', '.join(diff)}); "
                            "choose another --out, or pass --resume to continue it with a new --iters only")
    elif resume:
        raise UserError(f"nothing to resume in {out}: no run there")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg_path, cfg.to_json().encode())  # the resolved config, before any work


def sample_prompts(cfg: DistillConfig, train_prompts: tuple[str, ...]) -> list[str]:
    """Captions of the periodic sample grids: the world's own (tiny: eval-split captions) or the first training
    prompts."""
    source = get_world_spec(cfg.world.preset).sample_prompts
    return source(cfg.sample_count) if source is not None else list(train_prompts[: cfg.sample_count])


def save_samples(world: Any, prompts: list[str], steps: int, path: Path, recipe: Any = None,
                 guidance: float = 1.0) -> None:
    """A grid of student samples with its sampler (default: RAPM's DDIM trailing, guidance 1), seeds 0..n-1."""
    from ..generate import generate_batch, save_grid
    from ..sampling import DDIM_TRAILING

    images = generate_batch(world, prompts, list(range(len(prompts))), recipe or DDIM_TRAILING, steps, guidance)
    if images.shape[-1] < 128:  # tiny world: 32 px, upscaled (nearest) to be seen
        images = images.repeat_interleave(128 // images.shape[-1], -1).repeat_interleave(128 // images.shape[-2], -2)
    save_grid(images, path, nrow=len(prompts))


class JsonlLog:
    """Interval means of the losses, one JSON row every `every` iterations (each key over the iterations that
    logged it: DMD2 updates its generator on every 5th only)."""

    def __init__(self, path: Path, every: int, start: int) -> None:
        self.path, self.every = path, every
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        from ..files import atomic_write_bytes

        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a partial last row from a killed run: the checkpoint decides what stays
                break
        keep = [r for r in rows if r["step"] <= start]  # a resumed run rewrites what came after its checkpoint
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def add(self, step: int, values: dict[str, float], extra: dict[str, float]) -> dict[str, float] | None:
        """Accumulate one iteration; return the row when one is written."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        if (step + 1) % self.every:
            return None
        row = {"step": step + 1, **extra, **{k: v / self.counts[k] for k, v in self.sums.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.sums, self.counts = {}, {}
        return row


def machine(device: torch.device) -> str:
    """One line naming the hardware."""
    import os

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} threads (torch {torch.__version__})"


# --- the loop ----------------------------------------------------------------------------------------
def compile_blocks_here(cfg: DistillConfig, device: torch.device) -> bool:
    """Whether this run compiles the UNet's blocks (regions.py): asked for, on a GPU, with FastLoRA (PEFT's layers
    are not excluded from dynamo), without gradient checkpointing, and a torch that compiles regions."""
    from .. import regions

    return (cfg.compile_blocks and device.type == "cuda" and cfg.lora_impl != "peft" and not cfg.grad_checkpointing
            and regions.supported())


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """`rapm-bench distill`: teacher trajectories, then training of a LoRA student with `cfg.objective`;
    returns the summary (None on the other processes of an `accelerate launch`: they only share the
    trajectories). Running out of GPU memory ends in a one-line UserError that names what uses less."""
    from ..locks import hold

    try:
        with hold(Path(cfg.out), "run folder"):  # one job per run folder: a second fails at once, naming this one
            return _distill(cfg, resume, progress)
    except torch.cuda.OutOfMemoryError:
        raise UserError(oom_message(cfg)) from None


def oom_message(cfg: DistillConfig) -> str:
    """What to do after a GPU out-of-memory error in `distill`: resume from the last checkpoint with less memory."""
    ckpt = Path(cfg.out) / CHECKPOINT
    kept = "has no checkpoint yet"
    if ckpt.is_file():
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt") as f:
            kept = f"keeps its last checkpoint (iteration {f.metadata()['step']})"
    less = [f"--slot-chunk 1 (one slot per pass instead of {cfg.slot_chunk})" if cfg.slot_chunk > 1 else "",
            "" if cfg.grad_checkpointing else "--grad-checkpointing",
            "--lora-impl peft (no merged-weight copy)" if cfg.lora_impl == "merged" else "",
            f"a smaller --trajectory-batch than {cfg.trajectory_batch} (while computing trajectories)"]
    return (f"out of GPU memory while distilling: {cfg.out} {kept}; rerun the same command with --resume and "
            f"less memory: {', '.join(x for x in less if x)}")


def _distill(cfg: DistillConfig, resume: bool, progress: bool) -> dict[str, Any] | None:
    """The body of `distill`."""
    from accelerate import PartialState
    from tqdm import tqdm

    from ..cudagraphs import graphed_predict
    from ..files import atomic_write_bytes, sha256_file
    from ..lora import attach_lora, load_lora_state, lora_state_dict, save_lora
    from ..models import trained_record
    from ..precision import DTYPES
    from ..worlds import load_world
    from .checkpoint import CHECKPOINT, load_checkpoint, module_state, save_checkpoint, unflatten_optimizer
    from .memory import resolve_checkpointing
    from .objectives import Example, build_objective, use_adapter
    from .optim import adamw, load_optimizer
    from .schedule import SlotSchedule
    from .tracking import check_tracker, open_tracker
    from .trajectories import load_or_build, make_spec, training_prompts

    # 0. Run folder: the resolved config goes first (docs/design.md §1).
    #    Prompts, teacher and device are checked first, so that bad input leaves no run folder behind.
    validate(cfg)
    check_tracker(cfg.log_with)  # a missing tracker package: one line naming the pip command, nothing written
    out = Path(cfg.out)
    prompts = training_prompts(cfg.world.preset, cfg.num_trajectories, cfg.prompts, cfg.prompt_offset)
    state = PartialState(cpu=cfg.world.device == "cpu")  # several under `accelerate launch`, each on its own GPU
    world = load_world(cfg.world if state.num_processes == 1 else replace(cfg.world, device=str(state.device)))
    cfg, ckpt_why = resolve_checkpointing(cfg, world, out)  # auto: from the free memory; config.json records it
    if state.is_main_process:
        open_run(out, cfg, resume)
    t_start = time.perf_counter()

    # 1. Teacher and its trajectories (docs/rapm.md §3), computed before any LoRA exists. PCM also keeps every
    #    teacher point inside the slots (its consistency pairs): another cache key. Several processes split the
    #    missing shards; then the main process trains alone and the others return.
    device = world.device
    guidance = world.default_guidance if cfg.guidance is None else cfg.guidance
    compiled_blocks = 0
    if compile_blocks_here(cfg, device):  # before the trajectories: the teacher's passes run compiled blocks too
        from .. import regions

        cache = regions.persist_cache(Path(cfg.cache_dir) if cfg.cache_dir else None)
        compiled_blocks = regions.compile_blocks(world.unet)
        if progress and state.is_main_process:
            tqdm.write(f"the UNet's {compiled_blocks} blocks compile in the first passes: minutes on a new machine, "
                       f"less than one from inductor's cache {cache} (--no-compile-blocks: eager)")
    spec = make_spec(world, prompts, cfg.trajectory_seed, guidance, cfg.slots, cfg.substeps, cfg.store_dtype,
                     cfg.trajectory_batch, interior=objective_spec(cfg.objective).interior)
    with graphed_predict(world, cfg.fast_nograd):  # GPU: the teacher's CFG passes replay CUDA graphs
        trajs = load_or_build(world, prompts, spec, cache_root(cfg), progress)
    t_traj = time.perf_counter() - t_start
    if not state.is_main_process:
        return None
    sched = SlotSchedule(world.alphas_cumprod, cfg.slots, cfg.substeps)

    # 2. Student = teacher + LoRA (fp32 weights); teacher = the same UNet, adapters disabled (docs/rapm.md §5). The objective
    #    adds its own trainable parts: discriminator heads, DMD2's fake-score adapter, an EMA target.
    if cfg.grad_checkpointing:
        world.unet.enable_gradient_checkpointing()
    if cfg.lora_impl in ("merged", "fast"):  # rapm_bench/fastlora.py: "merged" runs one kernel per layer with
        from ..fastlora import FastLoRA  # W + s·B·A (a cached copy), "fast" the base kernel + low-rank branch

        merged = cfg.lora_impl == "merged"
        fast = FastLoRA(world.unet, cfg.rank, cfg.lora_targets, cfg.seed, merge_nograd=merged,
                        mode="merged" if merged else "unmerged")
        lora_params = fast.parameters()
        grad_inputs = fast.backward_inputs()  # A and B, and the token a graphed backward is reached through
        opt_params = fast.master_parameters()  # the same weights as one tensor, whose .grad holds all their grads
        student_state, load_student = fast.state_dict, fast.load_peft_state
    else:
        lora_params = attach_lora(world.unet, cfg.rank, cfg.lora_targets, ADAPTER, cfg.seed)
        opt_params = grad_inputs = lora_params

        def student_state() -> dict[str, torch.Tensor]:
            return lora_state_dict(world.unet, ADAPTER)

        def load_student(state: dict[str, torch.Tensor]) -> None:
            load_lora_state(world.unet, state, ADAPTER)
    objective = build_objective(cfg, world, sched, guidance, lora_params, world.encode_prompts([prompts[0]]))
    critic = objective.critic_groups()
    critic_params = [p for params, _ in critic for p in params]
    opt_g = adamw(opt_params, cfg.lr, cfg.betas, cfg.weight_decay, device)  # fused on a GPU (distill/optim.py)
    optimizers: dict[str, torch.optim.Optimizer] = {"g": opt_g}
    base_lrs: dict[str, list[float]] = {"g": [cfg.lr]}
    if critic:
        optimizers["d"] = adamw([{"params": params, "lr": lr} for params, lr in critic], critic[0][1], cfg.betas,
                                0.0, device)
        base_lrs["d"] = [lr for _, lr in critic]

    def state_modules() -> dict[str, dict[str, torch.Tensor]]:
        return {"lora": student_state(), **objective.state()}

    def export() -> Path:
        return save_lora(out / LORA_FILE, student_state(), cfg.rank, cfg.format, DTYPES[cfg.save_dtype],
                         trained_record(cfg.slots, cfg.objective, objective.recipe, objective.sample_guidance,
                                        cfg.world.preset))  # eval samples it at its N with its own sampler

    def samples(step: int) -> None:
        with use_adapter(world.unet, ADAPTER):  # the student alone (DMD2's fake score stays off)
            save_samples(world, grid_prompts, cfg.slots, out / "samples" / f"step_{step:06d}.png", objective.recipe,
                         objective.sample_guidance)
        if tracker is not None:
            tracker.image(out / "samples" / f"step_{step:06d}.png", step)

    # 3. Resume from the last checkpoint, if any.
    start = last_good = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        start, tensors, meta = load_checkpoint(ckpt_path)
        last_good = start
        load_student({k: v.to(device) for k, v in module_state(tensors, "lora").items()})
        objective.load_state({name: {k: v.to(device) for k, v in module_state(tensors, name).items()}
                              for name in objective.state()})
        for name, opt in optimizers.items():
            saved = unflatten_optimizer(tensors, meta[f"groups.{name}"], name)
            if name == "g" and opt_params is not lora_params:  # FastLoRA: one tensor (a per-layer state converted)
                saved = fast.master.to_flat_state(saved)
            load_optimizer(opt, saved)
        torch.set_rng_state(tensors["rng.torch"])
        if start > cfg.iters:
            raise UserError(f"the run in {out} is already at iteration {start}; pass --iters {start} or more")
    log = JsonlLog(out / LOG, cfg.log_every, start)
    tracker = open_tracker(cfg.log_with, out, out.name, asdict(cfg), start)  # --log-with: the same rows, grids
    grid_prompts = sample_prompts(cfg, trajs.prompts)
    if start == 0 and cfg.iters > 0:
        samples(0)

    # 4. Training: one trajectory per iteration (batch 1), no real images.
    t_loop = time.perf_counter()
    step = start
    bar = tqdm(total=cfg.iters, initial=start, desc=f"{cfg.objective} distill", unit="it", disable=not progress)
    conds: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(start, cfg.iters):
        # 4a. This iteration's randomness and data: functions of (seed, step) only.
        gen = torch.Generator(device).manual_seed(derived_seed(cfg.seed, "step", step))
        torch.manual_seed(derived_seed(cfg.seed, "global", step))  # any hidden global-RNG user follows (seed, step)
        k = trajectory_index(cfg.seed, step, len(trajs))
        ex = Example(to_device(trajs.z_tilde[k], device), to_device(trajs.z_delta[k], device),
                     None if trajs.z_fine is None else to_device(trajs.z_fine[k], device), step)
        cond = conds.get(k)  # the text encoders run once per trajectory prompt, not once per iteration
        if cond is None:
            cond = world.encode_prompts([trajs.prompts[k]])
            if len(conds) < COND_CACHE:
                conds[k] = cond
        for name, opt in optimizers.items():
            for group, base in zip(opt.param_groups, base_lrs[name], strict=True):
                group["lr"] = lr_at(step, base, cfg.warmup)

        # 4b. The objective's chunks (RAPM: roll out the N slots, detach between slots); backward chunk by chunk
        #     into the student LoRA (g_loss) and the critic (d_loss: heads, DMD2's fake score). Only parameters
        #     that require grad now are inputs: PEFT freezes the adapter that is not active.
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for terms in objective.chunks(ex, cond, gen, cfg.slot_chunk):
            parts: dict[str, torch.Tensor] = {}
            if terms.g_loss is not None:
                terms.g_loss.backward(inputs=grad_inputs)
                parts["g_loss"] = terms.g_loss.detach()
            parts |= terms.logs
            if terms.d_loss is not None:
                terms.d_loss.backward(inputs=[p for p in critic_params if p.requires_grad])
                parts["d_loss"] = terms.d_loss.detach()
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value

        # 4c. NaN/inf guard: stop before the update, keep the last good checkpoint.
        if any(p.grad is not None for p in opt_params):
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(opt_params,
                                                               cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        critic_grads = [p.grad for p in critic_params if p.grad is not None]
        critic_ok = torch.stack([torch.isfinite(g).all() for g in critic_grads]).all() if critic_grads else None
        scalars = [v.detach().double().reshape(()) for v in sums.values()]  # exact; one host sync for all
        read = torch.stack([*scalars, *([] if critic_ok is None else [critic_ok.double()])]).tolist()
        values = dict(zip(sums, read[:len(scalars)], strict=True))
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        bad += ["critic grad"] if critic_ok is not None and read[-1] != 1.0 else []
        if bad:
            bar.close()
            kept = f"its last good checkpoint (iteration {last_good})" if last_good else "no checkpoint yet"
            raise DivergedError(f"non-finite {', '.join(bad)} at iteration {step + 1}: stopped; {out} keeps {kept}; "
                                "lower --lr, then rerun with --resume")

        # 4d. Update the student and the critic; the objective's own bookkeeping (an EMA target).
        for opt in optimizers.values():
            opt.step()
        objective.after_step()

        # 4e. Log, sample, checkpoint.
        row = log.add(step, values, {"lr": lr_at(step, cfg.lr, cfg.warmup),
                                     "minutes": round((time.perf_counter() - t_loop) / 60, 4)})
        bar.update(1)
        if row is not None:
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("g_loss", "d_loss", "acc_abs", "mse_abs") if k in row})
            if tracker is not None:
                tracker.log(row)
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            samples(step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.iters:
            save_checkpoint(ckpt_path, step + 1, state_modules(), optimizers, {"config": asdict(cfg)})
            last_good = step + 1
            export()
    bar.close()

    # 5. The student as a LoRA file, a last sample grid and the summary.
    lora_path = export()
    if cfg.iters > 0 and (not cfg.sample_every or cfg.iters % cfg.sample_every):
        samples(cfg.iters)
    summary = {
        "objective": cfg.objective,
        "iters": cfg.iters,
        "resumed_from": start,
        "trajectories": {"key": spec.key(), "folder": str(trajs.folder), "num": len(trajs),
                         "guidance": guidance, "seconds": round(t_traj, 2)},
        "train_seconds": round(time.perf_counter() - t_loop, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "machine": machine(device),
        "grad_checkpointing": {"on": cfg.grad_checkpointing, "why": ckpt_why},
        "compiled_blocks": compiled_blocks,
        "lora": {"path": str(lora_path), "format": cfg.format, "sha256": sha256_file(lora_path),
                 "params": sum(p.numel() for p in lora_params)},
        "sampler": {**objective.recipe.describe(), "steps": cfg.slots, "guidance": objective.sample_guidance},
        "last_log": json.loads((out / LOG).read_text().splitlines()[-1]) if (out / LOG).read_text() else None,
        "eval": objective.eval_command(str(lora_path), cfg.slots, get_world_spec(cfg.world.preset).preset_flag()),
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if tracker is not None:
        tracker.close()
    return summary
