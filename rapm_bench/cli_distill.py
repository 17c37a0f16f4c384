"""`rapm-bench distill`: parse, resolve the preset's DistillConfig, call the engine (docs/design.md §1: the CLI is thin)."""

from __future__ import annotations

from typing import Annotated

import typer


def _targets(text: str | None) -> tuple[str, ...] | None:
    """'to_q,to_k' -> ('to_q', 'to_k')."""
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def distill(
    preset: Annotated[str, typer.Option(help="World: `tiny` (embedded shapes world, CPU, offline) or `sdxl`.")]
    = "tiny",
    out: Annotated[str | None, typer.Option(help="Run folder (config.json, checkpoint, train_log.jsonl, samples/, "
                                                 "lora.safetensors); default: runs/distill/<preset>[-<objective>]. Rerunning the "
                                                 "same command resumes an interrupted run.")] = None,
    objective: Annotated[str | None, typer.Option(help="`rapm` (ours), or a re-trained baseline on the same engine, "
                                                       "trajectories and LoRA: `pcm` (phased consistency) or `dmd2` "
                                                       "(distribution matching + GAN).")] = None,
    iters: Annotated[int | None, typer.Option(help="Training iterations, one trajectory each (batch 1; dmd2: critic "
                                                   "steps, the generator updates every --dmd2-fake-steps); default: "
                                                   "the preset's (tiny 200, sdxl 20000).")] = None,
    lr: Annotated[float | None, typer.Option(help="Student LoRA learning rate (AdamW, constant after warm-up); "
                                                  "default: the preset's.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear learning-rate warm-up iterations; default: the "
                                                    "preset's.")] = None,
    disc_lr: Annotated[float | None, typer.Option(help="Discriminator heads' learning rate; default: the preset's.")]
    = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (the paper: 1).")] = None,
    substeps: Annotated[int | None, typer.Option("--M", "-M", help="Teacher DDIM sub-steps per slot for the "
                                                                    "trajectories (M); default: the preset's.")] = None,
    steps: Annotated[int | None, typer.Option(help="The student's sampling steps N (1, 2, 4, 8, ...) = RAPM's coarse "
                                                   "slots, PCM's phases, DMD2's generator timesteps (DDIM-trailing "
                                                   "boundaries for N); the LoRA records N and its sampler, and "
                                                   "`eval --model lora:PATH` samples it at N. Default 4.")] = None,
    slots: Annotated[int | None, typer.Option(help="Alias of --steps (the paper's name: coarse time-slots).")]
    = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Teacher CFG scale w for the trajectories (and DMD2's real "
                                                            "score); default: the preset's (tiny 2.0, sdxl the "
                                                            "world's 5.0).")] = None,
    lambda_abs: Annotated[float | None, typer.Option(help="Weight of absolute-position matching (z̃_n).")] = None,
    lambda_rel: Annotated[float | None, typer.Option(help="Weight of relative-position matching (ẑ_n).")] = None,
    lambda_reg: Annotated[float | None, typer.Option(help="Weight of the pseudo-Huber regression to z̃_n (0: off).")]
    = None,
    distance: Annotated[str | None, typer.Option(help="`gan` (two hinge discriminators) or `l2` (plain MSE to the "
                                                      "same targets).")] = None,
    pcm_huber_c: Annotated[float | None, typer.Option(help="pcm: pseudo-Huber constant c, per element (0.001).")]
    = None,
    pcm_ema: Annotated[float | None, typer.Option(help="pcm: EMA decay of the target LoRA; 0 = the student itself, "
                                                       "stop-grad (PCM's LoRA scripts; default).")] = None,
    pcm_adv_weight: Annotated[float | None, typer.Option(help="pcm: adversarial consistency weight (0 = off, "
                                                              "default).")] = None,
    dmd2_fake_rank: Annotated[int | None, typer.Option(help="dmd2: rank of the fake-score LoRA (default 8).")] = None,
    dmd2_fake_lr: Annotated[float | None, typer.Option(help="dmd2: fake-score learning rate; default: --lr.")]
    = None,
    dmd2_fake_steps: Annotated[int | None, typer.Option(help="dmd2: critic updates per generator update (two "
                                                               "time-scale rule; DMD2: 5).")] = None,
    dmd2_gan_weight: Annotated[float | None, typer.Option(help="dmd2: generator GAN weight (DMD2 SDXL: 5e-3; 0 = "
                                                               "off).")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="OBJECTIVE.FIELD=VALUE",
        help="An objective's own setting, repeatable: e.g. --set pcm.huber_c=0.002, --set dmd2.fake_lr=none, "
             "--set rapm.distance=l2 (the fields of rapm, pcm, dmd2 and any plug-in's; the flags above are "
             "aliases).")] = None,
    num_trajectories: Annotated[int | None, typer.Option(help="Teacher trajectories K (prompts × seeded noise); "
                                                              "default: the preset's (tiny 256, sdxl 1000).")] = None,
    trajectory_batch: Annotated[int | None, typer.Option(help="Trajectories per teacher batch and cache shard; "
                                                              "shards split across `accelerate launch` "
                                                              "processes; default: the preset's (tiny 64, sdxl "
                                                              "8).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Caption file for the trajectories: text (one a line) or COCO "
                                                     "captions_train2014.json; tiny default: the shapes train split.")]
    = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint, allowing a new "
                                              "--iters (every other option must match).")] = False,
    format: Annotated[str | None, typer.Option("--format", help="LoRA keys: `diffusers` (load_lora_weights, rapm-bench "
                                                                "generate --lora) or `kohya` (ComfyUI/A1111).")]
    = None,
    grad_checkpointing: Annotated[bool | None, typer.Option(
        "--grad-checkpointing/--no-grad-checkpointing",
        help="Recompute UNet activations in backward (less memory); default: off for tiny; sdxl: chosen from the "
             "GPU's free memory (off when the passes fit), recorded in the run's config.json.")] = None,
    fast_nograd: Annotated[bool | None, typer.Option(
        "--fast-nograd/--no-fast-nograd",
        help="GPU: replay RAPM's no-grad passes (roll-out, relative targets, real features) from CUDA graphs and "
             "merge the first roll-out jump with the relative targets; default: on (the CPU path is eager).")] = None,
    fast_grad: Annotated[bool | None, typer.Option(
        "--fast-grad/--no-fast-grad",
        help="GPU with --lora-impl merged and no gradient checkpointing: replay RAPM's gradient passes (forward "
             "and backward) from CUDA graphs; default: on (otherwise, and on the CPU, eager).")] = None,
    compile_blocks: Annotated[bool | None, typer.Option(
        "--compile-blocks/--no-compile-blocks",
        help="GPU with --lora-impl merged or fast and no gradient checkpointing: compile each ResNet and transformer "
             "block of the UNet (LoRA layers stay eager); the first iterations compile (4+ minutes on a new machine, "
             "under a minute from inductor's on-disk cache); default: on (the CPU path is eager).")] = None,
    log_every: Annotated[int | None, typer.Option(help="Iterations per train_log.jsonl row (interval means); "
                                                       "default: the preset's (tiny 10, sdxl 50).")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated LoRA target module suffixes; default: "
                                                     "attention, FF, resnet convs, samplers, time embedding.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher: hub id or local diffusers folder; default: the "
                                                     "preset's.")] = None,
    device: Annotated[str | None, typer.Option(help="`auto`, `cpu`, `cuda`, `cuda:1`, ...")] = None,
    precision: Annotated[str | None, typer.Option(help="Frozen-weight precision: `auto`, `fp32`, `fp16`, `bf16` "
                                                       "(LoRA weights stay fp32); default: the preset's.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the LoRA/head init and every iteration's randomness.")]
    = None,
    cache_dir: Annotated[str | None, typer.Option(help="Trajectory cache root; default: ~/.cache/rapm-bench/"
                                                       "trajectories. Compiled UNet blocks keep inductor's kernels in "
                                                       "its inductor/ (default ~/.cache/rapm-bench/inductor) unless "
                                                       "TORCHINDUCTOR_CACHE_DIR is set.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Iterations between checkpoints.")] = None,
    sample_every: Annotated[int | None, typer.Option(help="Iterations between sample grids (0: only the last).")]
    = None,
    slot_chunk: Annotated[int | None, typer.Option(help="Slots per student forward: N is fastest, 1 uses least "
                                                        "memory (sdxl default 4: 22.6 GiB on an H100).")] = None,
    lora_impl: Annotated[str | None, typer.Option(help="`peft` (diffusers/PEFT LoRA layers), `merged` (every "
                                                       "pass one kernel with W + s·B·A, low-rank backward; rapm "
                                                       "only) or `fast` (base kernel + low-rank branch, no weight "
                                                       "copy; rapm only). Default: the preset's (tiny peft, sdxl merged; "
                                                       "pcm/dmd2 peft).")] = None,
    log_with: Annotated[str | None, typer.Option(help="Also log every train_log.jsonl scalar and the sample grids "
                                                      "to `tensorboard`, `wandb` or `mlflow` (offline, under "
                                                      "<out>/logs/; needs that package).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and exit.")] = False,
) -> None:
    """Distil the teacher into a few-step student with RAPM (rank-1 LoRA, batch 1, no real images), or re-train
    the PCM or DMD2 baseline the same way (--objective)."""
    from .cli_common import run
    from .distill.config import resolve_distill

    if steps is not None and slots is not None and steps != slots:
        run(_fail, f"--steps {steps} and --slots {slots} disagree: they are one setting (give one)")
    slots = steps if steps is not None else slots

    config = run(
        resolve_distill, preset, settings=settings or (), out=out, objective=objective, iters=iters, lr=lr, warmup=warmup, disc_lr=disc_lr,
        rank=rank, substeps=substeps, slots=slots, guidance=cfg, lambda_abs=lambda_abs, lambda_rel=lambda_rel,
        lambda_reg=lambda_reg, distance=distance, num_trajectories=num_trajectories,
        trajectory_batch=trajectory_batch, prompts=prompts, format=format,
        grad_checkpointing=grad_checkpointing, fast_nograd=fast_nograd, fast_grad=fast_grad,
        compile_blocks=compile_blocks,
        log_every=log_every, lora_targets=_targets(targets), teacher=teacher, device=device,
        precision=precision, seed=seed, cache_dir=cache_dir, checkpoint_every=checkpoint_every,
        sample_every=sample_every, slot_chunk=slot_chunk, lora_impl=lora_impl, pcm_huber_c=pcm_huber_c, pcm_ema=pcm_ema,
        pcm_adv_weight=pcm_adv_weight, dmd2_fake_rank=dmd2_fake_rank, dmd2_fake_lr=dmd2_fake_lr,
        dmd2_fake_steps=dmd2_fake_steps, dmd2_gan_weight=dmd2_gan_weight, log_with=log_with,
    )
    if dry_run:
        typer.echo(config.to_json())
        return
    from .distill.engine import distill as run_distill

    summary = run(run_distill, config, resume)
    if summary is None:  # another process of an `accelerate launch`: it helped with the trajectories
        return
    typer.echo(f"distilled {summary['iters']} iterations in {summary['total_seconds'] / 60:.1f} min "
               f"({summary['machine']}) -> {summary['lora']['path']}\nevaluate: {summary['eval']}")


def _fail(message: str) -> None:
    """Raise a one-line user error (through `cli_common.run`: exit 2)."""
    from .errors import UserError

    raise UserError(message)
