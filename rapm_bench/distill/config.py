"""`rapm-bench distill`: one frozen config, one preset per world (docs/design.md §1).

Every field carries its default and why. The defaults are the `tiny` world's, chosen by the ablation in
results/tiny/rapm.md; a world's preset changes the fields its WorldSpec names (rapm_bench/worlds/registry.py:
`sdxl` keeps the objective's defaults and scales the run to the paper's: 1000 trajectories, 20K iterations,
batch 1, rank 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..config import WorldConfig
from ..errors import UserError
from ..lora import LORA_FORMATS, LORA_TARGETS
from ..worlds.registry import get_world_spec

OBJECTIVES = ("rapm", "pcm", "dmd2")  # --objective: RAPM (ours), PCM (Wang et al. 2024), DMD2 (Yin et al. 2024)
LOG_WITH = ("tensorboard", "wandb", "mlflow")  # --log-with: accelerate's trackers (distill/tracking.py)
LORA_IMPLS = ("peft", "merged", "fast")  # --lora-impl: PEFT layers, or rapm_bench.fastlora's layers: "merged"
#                                           (W + s·B·A in one kernel, a cached copy), "fast" (the low-rank branch)


def known_objectives() -> tuple[str, ...]:
    """--objective's values: the shipped OBJECTIVES, then any other plug-in's (rapm_bench.plugins)."""
    from ..plugins import objective_names

    return OBJECTIVES + tuple(n for n in objective_names() if n not in OBJECTIVES)


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a distillation run; written to `out/config.json` before any work."""

    world: WorldConfig = field(default_factory=WorldConfig)  # the teacher (preset, weights, device, precision)
    out: str = "runs/distill/tiny"  # run folder: config, checkpoint, log, samples, lora.safetensors

    # --- 1. teacher trajectories (docs/rapm.md §3) ------------------------------------------------
    num_trajectories: int = 256  # K prompts × seeded noise; tiny: 256 is enough at batch 1 (paper: 1000)
    slots: int = 4  # N coarse slots = the student's sampling steps (`--steps`; N = 4: DDIM trailing 999, 749, 499,
    #                 249; N = 1: 999 only); the LoRA records N and its sampler, and eval samples it at N
    substeps: int = 4  # M teacher DDIM sub-steps per slot (N·M-step teacher); tiny ablation: 4 ≈ 10
    guidance: float | None = 2.0  # teacher CFG scale w; None = the world's default; tiny ablation: 2 beat 3 and 5
    prompts: str | None = None  # caption file (.txt, or COCO captions_*.json); None = shapes train split (tiny)
    prompt_offset: int = 0  # tiny: first train-split index (the evaluator trains from 5M, the eval split is apart)
    trajectory_seed: int = 0  # trajectory k starts from noise seeded with trajectory_seed + k
    trajectory_batch: int = 64  # trajectories per teacher batch (and per cache shard)
    cache_dir: str | None = None  # None = $RAPM_BENCH_CACHE or ~/.cache/rapm-bench, under trajectories/<hash>
    store_dtype: str = "fp32"  # dtype of stored trajectory points (fp16 halves SDXL's 1.2 GB for 1000)

    # --- 2. student (docs/rapm.md §5) --------------------------------------------------------------
    rank: int = 1  # LoRA rank (paper: 1); tiny ablation: 4 is no better
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes: attention, FF, resnets, samplers, time emb
    grad_checkpointing: bool | None = False  # recompute UNet activations in backward (SDXL bs 1: 5.9 vs 13.9 GiB);
    #                                          None = auto: off when the passes fit the GPU's free memory (the
    #                                          run's config.json records the choice, distill/memory.py)
    slot_chunk: int = 4  # slots per student forward: N batches the roll-out (speed), 1 saves memory
    fast_nograd: bool = True  # GPU: RAPM's no-grad passes (roll-out, relative targets, real features) replayed
    #                           from CUDA graphs, the first roll-out jump and the relative targets in one batch;
    #                           the CPU path is eager either way (objectives.fast_nograd)
    lora_impl: str = "peft"  # "peft": diffusers/PEFT layers; "merged": fastlora.FastLoRA, every pass one kernel
    #                          with W + s·B·A and a low-rank backward (RAPM only; SDXL on an H100 at 4 slots per
    #                          pass: ×0.97 of the bare UNet passes vs PEFT's ×1.91, results/bench/README.md);
    #                          "fast": fastlora.FastLoRA through the low-rank branch (no weight copy; RAPM only)

    # --- 3. objective (docs/rapm.md §4) --------------------------------------------------------
    lambda_abs: float = 0.1  # adversarial weight, absolute position z̃_n (teacher point); tiny: 1.0 hurt in a first ablation (issue 5)
    lambda_rel: float = 0.1  # adversarial weight, relative position ẑ_n (student jump from ẑΔ_{n+1})
    lambda_reg: float = 1.0  # pseudo-Huber regression to z̃_n (0 = off); tiny: without it the GAN alone diverges
    distance: str = "gan"  # "gan": two hinge discriminators; "l2": plain MSE to the same targets (ablation)
    huber_c: float = 0.03  # pseudo-Huber on the per-element RMS d: sqrt(d² + c²) − c; L2-like below c, L1 above
    disc_hidden: int = 64  # discriminator head width (conv3×3 → GroupNorm → SiLU → conv1×1 per feature level)

    # --- 3b. which objective; the re-trained baselines' own fields (baselines/pcm.py, dmd2.py) -----
    objective: str = "rapm"  # "rapm" (ours), "pcm" (phased consistency), "dmd2" (distribution matching + GAN)
    pcm_huber_c: float = 0.001  # PCM: pseudo-Huber per element, sqrt(d² + c²) − c (PCM's and LCM's scripts: 0.001)
    pcm_ema: float = 0.0  # PCM target: 0 = the student itself, stop-grad (PCM's LoRA scripts); else EMA decay
    pcm_adv_weight: float = 0.0  # PCM's optional adversarial term (heads as RAPM's, real = the target); 0 = off
    dmd2_fake_rank: int = 8  # DMD2 fake score = the UNet + a second LoRA of this rank (DMD2: a full UNet copy)
    dmd2_fake_lr: float | None = None  # fake-score LoRA learning rate; None = --lr (DMD2 uses one LR for both)
    dmd2_fake_steps: int = 5  # two time-scale update rule: critic updates per generator update (DMD2: 5)
    dmd2_gan_weight: float = 5e-3  # generator GAN weight (DMD2 SDXL: 5e-3; real = the teacher's z̃_0); 0 = off
    dmd2_t_min: float = 0.02  # DMD gradient at t ~ U[t_min·T, t_max·T] (DMD/DMD2: 0.02 to 0.98)
    dmd2_t_max: float = 0.98

    # --- 4. optimisation --------------------------------------------------------------------------
    iters: int = 200  # iterations, one trajectory each (batch 1); tiny: FID is flat from ~50 (rapm.md)
    lr: float = 1e-3  # student (LoRA) AdamW learning rate; constant after warm-up so --resume can extend
    disc_lr: float = 1e-3  # discriminator heads' AdamW learning rate
    betas: tuple[float, float] = (0.0, 0.99)  # Adam betas of both optimisers (β1 = 0, the usual GAN choice)
    weight_decay: float = 0.0  # AdamW decay (LoRA B starts at 0: decay would pull it back)
    warmup: int = 20  # linear LR warm-up iterations
    grad_clip: float = 1.0  # max global grad norm of the LoRA (0 = off)
    seed: int = 0  # LoRA init, head init, and every iteration's randomness via (seed, step)

    # --- 5. run management ------------------------------------------------------------------------
    checkpoint_every: int = 50  # iterations between atomic checkpoints (and LoRA exports)
    log_every: int = 10  # iterations per JSONL log row (interval means)
    sample_every: int = 100  # iterations between sample grids (0 = only at the end)
    sample_count: int = 8  # prompts in each sample grid (student, N DDIM-trailing steps, guidance 1)
    format: str = "diffusers"  # LoRA file keys: "diffusers" (load_lora_weights) or "kohya" (ComfyUI/A1111)
    save_dtype: str = "fp32"  # dtype of the exported LoRA (fp16 halves the file)
    log_with: str | None = None  # also log the JSONL scalars and sample grids to "tensorboard", "wandb" or
    #                              "mlflow" (accelerate's trackers, offline, under out/logs/); not part of what
    #                              identifies a run: a resume may add or change it

    def to_json(self) -> str:
        """Stable JSON of the resolved config."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> DistillConfig:
        """Inverse of `to_json`."""
        d = json.loads(text)
        d["world"] = WorldConfig(**d["world"])
        for name in ("lora_targets", "betas"):
            d[name] = tuple(d[name])
        return DistillConfig(**d)


def distill_preset(name: str) -> DistillConfig:
    """The named world's distill preset: DistillConfig's defaults (tiny's) with the world's own fields
    (`WorldSpec.distill`, `WorldSpec.distill_world`; rapm_bench/worlds/registry.py)."""
    spec = get_world_spec(name)  # one error message for unknown presets
    base = DistillConfig()
    return replace(base, world=replace(base.world, preset=spec.name, **spec.distill_world), **spec.distill)


def resolve_distill(preset: str = "tiny", **overrides: Any) -> DistillConfig:
    """The preset's config with the given overrides (None = keep the preset's), validated.

    World fields (`teacher`, `device`, `precision`, `resolution`, `vae`) may be given flat. Without `out`,
    another objective than the preset's runs in `<preset out>-<objective>`.
    """
    base = distill_preset(preset)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "out" not in overrides and overrides.get("objective", base.objective) != base.objective:
        overrides["out"] = f"{base.out}-{overrides['objective']}"  # runs/distill/tiny-pcm: runs of objectives apart
    world_keys = {f.name for f in fields(WorldConfig)} - {"preset"}
    world = replace(base.world, **{k: overrides.pop(k) for k in list(overrides) if k in world_keys})
    unknown = set(overrides) - {f.name for f in fields(DistillConfig)}
    if unknown:
        raise TypeError(f"unknown distill config fields: {sorted(unknown)}")
    for name in ("lora_targets", "betas"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    if overrides.get("objective", base.objective) != "rapm" and "lora_impl" not in overrides:
        overrides["lora_impl"] = "peft"  # PCM's EMA target and DMD2's second adapter work on PEFT layers
    cfg = replace(base, world=world, **overrides)
    validate(cfg)
    return cfg


def validate(cfg: DistillConfig) -> None:
    """Reject values the engine cannot run, with the option's name."""
    if cfg.slots < 1:
        raise UserError(f"--steps must be at least 1 (the student's sampling steps = coarse slots), got {cfg.slots}")
    positive = {"num_trajectories": cfg.num_trajectories, "substeps": cfg.substeps,
                "trajectory_batch": cfg.trajectory_batch, "rank": cfg.rank, "slot_chunk": cfg.slot_chunk,
                "checkpoint_every": cfg.checkpoint_every, "log_every": cfg.log_every,
                "disc_hidden": cfg.disc_hidden}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.iters < 0:
        raise UserError(f"--iters must be at least 0, got {cfg.iters}")
    if cfg.lr <= 0 or cfg.disc_lr <= 0:
        raise UserError(f"learning rates must be positive, got --lr {cfg.lr}, --disc-lr {cfg.disc_lr}")
    for name in ("lambda_abs", "lambda_rel", "lambda_reg"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(cfg, name)}")
    if cfg.objective not in OBJECTIVES and cfg.objective not in (known := known_objectives()):
        raise UserError(f"--objective must be one of {', '.join(known)}, got {cfg.objective!r}")
    if cfg.objective == "rapm" and cfg.lambda_abs == cfg.lambda_rel == cfg.lambda_reg == 0:
        raise UserError("all loss weights are 0: set --lambda-abs, --lambda-rel or --lambda-reg")
    if cfg.pcm_huber_c <= 0:
        raise UserError(f"--pcm-huber-c must be positive, got {cfg.pcm_huber_c}")
    if not 0.0 <= cfg.pcm_ema < 1.0:
        raise UserError(f"--pcm-ema must be in [0, 1) (0 = stop-grad target), got {cfg.pcm_ema}")
    for name in ("pcm_adv_weight", "dmd2_gan_weight"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(cfg, name)}")
    if cfg.dmd2_fake_rank < 1 or cfg.dmd2_fake_steps < 1:
        raise UserError(f"--dmd2-fake-rank and --dmd2-fake-steps must be at least 1, got {cfg.dmd2_fake_rank} "
                        f"and {cfg.dmd2_fake_steps}")
    if cfg.dmd2_fake_lr is not None and cfg.dmd2_fake_lr <= 0:
        raise UserError(f"--dmd2-fake-lr must be positive, got {cfg.dmd2_fake_lr}")
    if not 0.0 <= cfg.dmd2_t_min < cfg.dmd2_t_max <= 1.0:
        raise UserError(f"dmd2_t_min and dmd2_t_max need 0 <= t_min < t_max <= 1, got {cfg.dmd2_t_min}, "
                        f"{cfg.dmd2_t_max}")
    if cfg.lora_impl not in LORA_IMPLS:
        raise UserError(f"--lora-impl must be one of {', '.join(LORA_IMPLS)}, got {cfg.lora_impl!r}")
    if cfg.lora_impl in ("merged", "fast") and cfg.objective != "rapm":
        raise UserError(f"--lora-impl {cfg.lora_impl} trains the rapm objective only; --objective {cfg.objective} needs "
                        "--lora-impl peft (its EMA target or second adapter works on PEFT layers)")
    if cfg.log_with is not None and cfg.log_with not in LOG_WITH:
        raise UserError(f"--log-with must be one of {', '.join(LOG_WITH)}, got {cfg.log_with!r}")
    if cfg.distance not in ("gan", "l2"):
        raise UserError(f"--distance must be `gan` or `l2`, got {cfg.distance!r}")
    if cfg.format not in LORA_FORMATS:
        raise UserError(f"--format must be one of {', '.join(LORA_FORMATS)}, got {cfg.format!r}")
    for name in ("store_dtype", "save_dtype"):
        if getattr(cfg, name) not in ("fp32", "fp16", "bf16"):
            raise UserError(f"{name} must be fp32, fp16 or bf16, got {getattr(cfg, name)!r}")
    if cfg.guidance is not None and not 0.0 <= cfg.guidance <= 50.0:
        raise UserError(f"--cfg must be between 0 and 50, got {cfg.guidance}")
    if cfg.substeps > 1000 // cfg.slots:
        raise UserError(f"--steps {cfg.slots} leaves {1000 // cfg.slots} timesteps per slot, fewer than --M "
                        f"{cfg.substeps} teacher sub-steps: lower --steps or --M")
    world = get_world_spec(cfg.world.preset)
    if world.training_prompts is None and cfg.prompts is None:
        raise UserError(f"--preset {world.name} needs --prompts FILE: {world.prompts_help}")
