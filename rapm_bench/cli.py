"""The `rapm-bench` command line: parse, resolve a config, call one library function.

Errors a user can fix print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .cli_common import Preset, run
from .errors import UserError

app = typer.Typer(
    name="rapm-bench",
    help="Distil a text-to-image teacher into a 4-step student with RAPM on one GPU, then evaluate "
    "RAPM, PCM, DMD2 and the teacher (FID, CLIP score) on one declared protocol. "
    "The default preset `tiny` is an embedded shapes world that runs offline on a CPU; "
    "`--preset sdxl` is the paper's setting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


CompileBlocks = Annotated[bool | None, typer.Option(  # generate's and eval's
    "--compile-blocks/--no-compile-blocks", help="Compile each ResNet block and each transformer (Transformer2DModel) "
    "of the UNet whole (a CUDA GPU; about a minute on a new machine, seconds from inductor's cache in ~/.cache/rapm-bench/inductor); "
    "default: when images x steps >= 16384 (SDXL; the tiny world: never), where it pays back.")]


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Model name from the registry (`teacher`, `rapm`, ...); "
                                            "its sampler and guidance come from its spec.")] = "teacher",
    steps: Annotated[int | None, typer.Option(help="Sampling steps; default: the model's.")] = None,
    guidance: Annotated[float | None, typer.Option(
        help="Classifier-free guidance scale; <= 1 disables CFG; default: the model's (teacher: the world's).")] = None,
    prompts: Annotated[str | None, typer.Option(
        help="UTF-8 text file, one caption a line; default on `tiny`: captions from the shapes eval split.")] = None,
    out: Annotated[str, typer.Option(help="Output folder for {index:06d}.png, config.json and manifest.json; "
                                          "rerunning the same command resumes.")] = "out/generate",
    lora: Annotated[str | None, typer.Option(
        help="LoRA file or folder (diffusers, kohya or PEFT keys; .safetensors, or .pt read weights-only); "
        "replaces the model's own weights.")] = None,
    fuse: Annotated[bool, typer.Option(help="Merge the LoRA into the UNet before sampling.")] = False,
    num_images: Annotated[int | None, typer.Option(help="How many images; default: one per caption "
                                                        "(16 grammar captions on `tiny`).")] = None,
    seed: Annotated[int, typer.Option(help="Image i is drawn with seed + i, whatever the batch size.")] = 0,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch; default: the preset's (sdxl: 16 on a GPU "
                                                        "of 70 GiB or more, else 4).")] = None,
    grid: Annotated[str | None, typer.Option(help="Also write a contact sheet of the first 64 images here.")] = None,
    compile_blocks: CompileBlocks = None,
    preset: Preset = "tiny",
    teacher: Annotated[str | None, typer.Option(help="Teacher: hub id or local diffusers folder; "
                                                      "default: the preset's.")] = None,
    device: Annotated[str, typer.Option(help="`auto`, `cpu`, `cuda`, `cuda:1`, ...")] = "auto",
    precision: Annotated[str, typer.Option(help="`auto` (fp16 on GPU, fp32 on CPU), `fp32`, `fp16`, `bf16`; "
                                                "the SDXL VAE stays fp32.")] = "auto",
    resolution: Annotated[int | None, typer.Option(help="Image side in pixels; default: the teacher's.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and exit.")] = False,
) -> None:
    """Generate images for captions with one model (one seeded generator per image)."""
    from .config import GenerateConfig, WorldConfig, resolve_generate

    cfg = run(  # its counts checked here, before torch is imported
        GenerateConfig,
        world=WorldConfig(preset=preset, teacher=teacher, device=device, precision=precision, resolution=resolution),
        out=out, model=model, steps=steps, guidance=guidance, lora=lora, fuse=fuse, prompts=prompts,
        num_images=num_images, seed=seed, batch_size=batch_size, grid=grid, compile_blocks=compile_blocks,
    )
    if dry_run:
        typer.echo(run(resolve_generate, cfg).to_json())
        return
    from .generate import generate as run_generate

    manifest = run(run_generate, cfg)
    typer.echo(f"wrote {len(manifest['images'])} images to {out}")


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Option(help="`teacher`, a registry name (`rapm`, ...), or `lora:PATH` "
                                            "(any few-step LoRA, DDIM trailing, guidance 1).")] = "rapm",
    steps: Annotated[int | None, typer.Option(help="Sampling steps; default: the model's.")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale; default: the model's (teacher: the world's).")]
    = None,
    lora: Annotated[str | None, typer.Option(help="Evaluate these LoRA weights under --model's name, sampler and "
                                                  "steps (e.g. your own `rapm-bench distill` output as `rapm`).")]
    = None,
    protocol: Annotated[str | None, typer.Option(help="Evaluation protocol (`tiny`, `coco30k`, `dmd2-coco10k`); "
                                                      "default: the preset's.")] = None,
    num_images: Annotated[int | None, typer.Option(help="Evaluate the first K caption pairs; default: all of the "
                                                        "protocol's.")] = None,
    out: Annotated[str | None, typer.Option(help="Folder for the result JSON; default: results/<preset>.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result JSON on stdout.")] = False,
    seed: Annotated[int, typer.Option(help="Image i is drawn with seed + i.")] = 0,
    batch_size: Annotated[int | None, typer.Option(help="Images per generation batch; default: the preset's (sdxl: "
                                                        "16 on a GPU of 70 GiB or more, else 4).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Prepared protocol data (`rapm-bench data coco`) and "
                                                      "reference-statistics cache; default: ~/.cache/rapm-bench.")]
    = None,
    inception: Annotated[str | None, typer.Option(help="Local clean-fid Inception weights (coco protocols).")] = None,
    clip_checkpoint: Annotated[str | None, typer.Option(help="Local open_clip checkpoint (coco protocols).")] = None,
    save_images: Annotated[str | None, typer.Option(help="Also save the generated PNGs in this folder.")] = None,
    compile_blocks: CompileBlocks = None,
    overlap_scoring: Annotated[bool, typer.Option(
        "--overlap-scoring/--no-overlap-scoring", help="Score each group of 64 images (FID and CLIP networks) "
        "between the next group's UNet calls, on a side CUDA stream: its host time hides behind the UNet's. Off: "
        "after the next group, with less GPU memory at once. The same scores either way.")] = True,
    preset: Preset = "tiny",
    teacher: Annotated[str | None, typer.Option(help="Teacher: hub id or local diffusers folder.")] = None,
    device: Annotated[str, typer.Option(help="`auto`, `cpu`, `cuda`, ...")] = "auto",
    precision: Annotated[str, typer.Option(help="`auto`, `fp32`, `fp16`, `bf16`.")] = "auto",
) -> None:
    """Generate for a protocol's captions and compute FID and CLIP score with full provenance.

    Several GPUs: `accelerate launch --num_processes G -m rapm_bench.cli eval ...` shards the
    captions and merges the statistics exactly (same scores as one process).
    """
    import json

    from .config import EvalConfig, WorldConfig

    cfg = run(  # its counts checked here, before torch is imported
        EvalConfig,
        world=WorldConfig(preset=preset, teacher=teacher, device=device, precision=precision),
        model=model, lora=lora, steps=steps, guidance=guidance, protocol=protocol, num_images=num_images, out=out,
        seed=seed,
        batch_size=batch_size, data_dir=data_dir, inception=inception, clip_checkpoint=clip_checkpoint,
        images_out=save_images, compile_blocks=compile_blocks, overlap_scoring=overlap_scoring,
    )
    from .eval.engine import evaluate as run_eval

    result = run(run_eval, cfg)
    if result is None:
        return
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    retrieval = "" if result["retrieval_accuracy"] is None else f"  retrieval {result['retrieval_accuracy']:.3f}"
    typer.echo(f"{result['model']} {result['steps']}-step, {result['protocol']} ({result['num_images']} images): "
               f"FID {result['fid']:.3f}  CLIP {result['clip_score']:.3f}{retrieval}  "
               f"[{result['seconds']:.1f} s, {result['images_per_second']:.1f} img/s] -> {result.get('path')}")


Inputs = Annotated[list[str] | None, typer.Option("--results", help="Result JSON files or folders "
                                                                     "(default: results/<preset>).")]


@app.command()
def table(
    results: Inputs = None,
    out: Annotated[str | None, typer.Option(help="Folder for table.md/.csv/.tex; default: results/<preset>.")] = None,
    reported: Annotated[bool, typer.Option(help="Add the authors' reported rows, labelled as reported.")] = True,
    preset: Preset = "tiny",
) -> None:
    """Write the comparison table (our measured rows beside the papers' reported ones): Markdown, CSV, LaTeX."""
    from pathlib import Path

    from .report.table import write_table

    inputs = [Path(p) for p in results] if results else [Path("results") / preset]
    typer.echo(run(write_table, inputs, Path(out) if out else Path("results") / preset, preset, reported), nl=False)


@app.command()
def plot(
    results: Inputs = None,
    out: Annotated[str | None, typer.Option(help="Folder for the PNGs; default: results/<preset>.")] = None,
    grid_prompts: Annotated[int, typer.Option(help="Captions in the side-by-side sample grid (0: no grid).")] = 8,
    device: Annotated[str, typer.Option(help="Device for the sample grid.")] = "auto",
    preset: Preset = "tiny",
) -> None:
    """Plot FID against steps, FID against CLIP score, and a side-by-side sample grid of every model."""
    from pathlib import Path

    from .report.plots import write_plots

    inputs = [Path(p) for p in results] if results else [Path("results") / preset]
    paths = run(write_plots, inputs, Path(out) if out else Path("results") / preset, preset, grid_prompts, device)
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command()
def report(
    results_dir: Annotated[str | None, typer.Argument(help="Results folder (result JSONs, table, plots); default: "
                                                            "results/<preset>.")] = None,
    out: Annotated[str | None, typer.Option(help="HTML file to write; default: <RESULTS_DIR>/report.html.")] = None,
    preset: Preset = "tiny",
) -> None:
    """Write one self-contained HTML page (open it in any browser, offline): the table with intervals and
    provenance, comparison.md, the plots and sample grids."""
    from pathlib import Path

    from .report.html import write_report

    path = run(write_report, Path(results_dir) if results_dir else Path("results") / preset,
               Path(out) if out else None)
    typer.echo(f"wrote {path}")


@app.command()
def reproduce(
    preset: Preset = "tiny",
    quick: Annotated[bool, typer.Option(help="A smaller budget: tiny 50 iterations, 256 images, teacher at 4 and 8 "
                                             "steps (~3 min on 2 CPU cores); sdxl 2000 iterations, 5000 images.")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan with time and disk estimates, then exit.")] = False,
    out: Annotated[str | None, typer.Option(help="Results folder (JSON per model, table.md/csv/tex, plots); "
                                                 "default: results/<preset>.")] = None,
    runs: Annotated[str | None, typer.Option(help="Distillation run folders; default: runs/reproduce/<preset>.")]
    = None,
    num_images: Annotated[int | None, typer.Option(help="Images per evaluation; default: the plan's (tiny 512, "
                                                        "sdxl the protocol's 30K).")] = None,
    seeds: Annotated[int, typer.Option(help="tiny: training seeds per method (RAPM, PCM, DMD2) for the "
                                            "equal-budget comparison (comparison.md: mean ± sd); seed 0's runs "
                                            "are the table's, seeds > 0 go to <out>/seeds/.")] = 1,
    steps: Annotated[str | None, typer.Option(help="tiny: the students' sampling steps N, comma-separated (each "
                                                   "method is distilled for each N); default: 1,4.")] = None,
    sweep: Annotated[bool, typer.Option(help="tiny: the full sweep: students at 1,2,4,8 steps, the teacher at "
                                             "1-50 steps; results in results/tiny/sweep (with --seeds 3: what "
                                             "results/tiny/sweep holds; a GPU and --jobs 12 take minutes).")]
    = False,
    jobs: Annotated[int, typer.Option(help="Distillations and evaluations at once, one process each (tiny on a "
                                           "GPU: launch-bound, 8-16 fit one card; on a CPU keep 1).")] = 1,
    device: Annotated[str, typer.Option(help="`auto`, `cpu`, `cuda`, ...")] = "auto",
    teacher: Annotated[str | None, typer.Option(help="sdxl: teacher hub id or local diffusers folder.")] = None,
    prompts: Annotated[str | None, typer.Option(help="sdxl: COCO-2014 train captions (captions_train2014.json) for "
                                                     "the trajectories.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="sdxl: prepared protocol data (`rapm-bench data coco`).")]
    = None,
    inception: Annotated[str | None, typer.Option(help="sdxl: local clean-fid Inception weights.")] = None,
    clip_checkpoint: Annotated[str | None, typer.Option(help="sdxl: local open_clip ViT-g-14 checkpoint.")] = None,
) -> None:
    """Distil, evaluate every model at its step counts and write the table and plots, in one resumable command.

    tiny: RAPM, PCM and DMD2 distilled here at the same budget for 1 and 4 steps (--steps, --sweep), the teacher
    at 1-16 steps; comparison.md per step count with intervals and seed-noise verdicts (--seeds).
    sdxl: RAPM distilled here, the published RAPM, PCM and DMD2 LoRAs, the teacher; coco30k.
    Finished steps (run folders, result JSONs of the same model, steps, images and weights) are reused.
    """
    from .reproduce import ReproduceConfig
    from .reproduce import reproduce as run_reproduce

    cfg = ReproduceConfig(preset=preset, quick=quick, out=out, runs=runs, device=device, teacher=teacher,
                          prompts=prompts, data_dir=data_dir, inception=inception, clip_checkpoint=clip_checkpoint,
                          num_images=num_images, seeds=seeds, steps=run(_step_list, steps), sweep=sweep, jobs=jobs,
                          dry_run=dry_run)
    run(run_reproduce, cfg, typer.echo)


def _step_list(text: str | None) -> tuple[int, ...] | None:
    """'1,4' -> (1, 4); a one-line error for anything else."""
    if text is None:
        return None
    try:
        steps = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--steps must be comma-separated integers, e.g. 1,4; got {text!r}") from None
    if not steps or min(steps) < 1:
        raise UserError(f"--steps must list step counts of at least 1, got {text!r}")
    return tuple(dict.fromkeys(steps))


@app.command()
def bench(
    ctx: typer.Context,
    preset: Preset = "tiny",
    scale: Annotated[str, typer.Option(help="`full`, or `small`: the SDXL architecture with tiny widths "
                                            "(CPU smoke runs).")] = "full",
    stages: Annotated[str | None, typer.Option(help="Comma-separated stages: matmul, unet-forward, rapm-iteration, "
                                                    "trajectories, generate, eval-features; default: all.")] = None,
    out: Annotated[str, typer.Option(help="Folder of the result JSON (<preset>-<device>.json).")] = "results/bench",
    repeats: Annotated[int | None, typer.Option(help="Timed calls per measurement (median reported); "
                                                     "default: the preset's.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Untimed calls after the FLOP-counting one.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image side in pixels (sdxl: default 1024).")] = None,
    device: Annotated[str, typer.Option(help="`auto`, `cpu`, `cuda`, `cuda:1`, ...")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="UNet dtype: `auto` (bf16 on GPU, fp32 on CPU), `bf16`, "
                                                   "`fp16`, `fp32`.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads; default: torch's. On a shared CPU, 1 avoids "
                                                     "OpenMP stalls.")] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="Dense bf16 peak for the floors; default: the "
                                                           "table's entry for this GPU.")] = None,
    lora: Annotated[str | None, typer.Option(help="LoRA of the RAPM headline: `merged` (fastlora.FastLoRA, every "
                                                  "pass through W + s·B·A), `fast` (FastLoRA, gradient passes "
                                                  "through the low-rank branch) or `peft`; default: the distill "
                                                  "preset's --lora-impl.")] = None,
    rapm_variants: Annotated[str | None, typer.Option(help="Comma-separated RAPM variants: plain, fast, merged or "
                                                           "peft, each optionally with /ckpt, /unmerged (not for "
                                                           "merged), /chunkK slots per pass, /graphs (the "
                                                           "engine's --fast-nograd), /gradgraphs (its "
                                                           "--fast-grad) and /blocks (compiled UNet "
                                                           "blocks) (default: the "
                                                           "distill preset's), e.g. merged/ckpt/chunk1.")] = None,
    traj_batch: Annotated[int | None, typer.Option(help="Trajectories per teacher batch.")] = None,
    gen_batch: Annotated[int | None, typer.Option(help="Images per generation call.")] = None,
    vae_variants: Annotated[str | None, typer.Option(help="Comma-separated VAE variants that `generate` times on a "
                                                     "GPU at --gen-batch: fp32, tf32 or bf16, each optionally with "
                                                     "/channels_last, /eager (not compiled), /sdpa or /tf32attn (the "
                                                     "attention) and /tf32conv, /bounded or /halfall (the "
                                                     "convolutions) (default: the preset's), e.g. "
                                                     "tf32,bf16/eager.")] = None,
    eval_batch: Annotated[int | None, typer.Option(help="Images per feature-network call.")] = None,
    merge_lora: Annotated[bool | None, typer.Option("--merge-lora/--no-merge-lora", help="No-grad passes through "
                                                    "merged LoRA weights; default: on.")] = None,
    cfg_batch: Annotated[bool | None, typer.Option("--cfg-batch/--no-cfg-batch", help="Both CFG branches in one "
                                                   "UNet call; default: on.")] = None,
    channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last", help="NHWC activations "
                                                       "and convolution weights; default: off.")] = None,
    sdpa: Annotated[bool | None, typer.Option("--sdpa/--no-sdpa", help="torch SDPA attention (else diffusers' "
                                              "classic processor); default: on.")] = None,
    compile_unet: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the UNet for "
                                                      "no-grad passes (slow start); default: off.")] = None,
    compile_blocks: Annotated[bool | None, typer.Option("--compile-blocks/--no-compile-blocks", help="Compile each "
                                                        "ResNet and transformer block of the UNet (regional "
                                                        "compilation, LoRA layers eager) for unet-forward and "
                                                        "trajectories, and for generate each ResNet block and "
                                                        "each Transformer2DModel whole, as generation; default: trajectories as the "
                                                        "distill engine and generate as generation at 30K images "
                                                        "(both compiled on a GPU), unet-forward eager. RAPM "
                                                        "variants: /blocks.")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Go on with the unfinished run of the same "
                                         "config, GPU, commit and libraries in --out: the stages it finished "
                                         "(kept in <preset>-<device>.partial.json after each stage) are not run "
                                         "again; default: start afresh.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result JSON on stdout.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and exit.")] = False,
) -> None:
    """Time distillation, generation and evaluation against their compute floors (random weights, no download)."""
    import json

    from .perf.config import resolve_bench
    from .perf.report import run_bench, summary

    cfg = run(resolve_bench, preset, scale, stages=stages, out=out, repeats=repeats, warmup=warmup,
              resolution=resolution, device=device, dtype=dtype, threads=threads, peak_tflops=peak_tflops, lora=lora,
              rapm_variants=rapm_variants, traj_batch=traj_batch, gen_batch=gen_batch, vae_variants=vae_variants,
              eval_batch=eval_batch, merge_lora=merge_lora, cfg_batch=cfg_batch, channels_last=channels_last, sdpa=sdpa,
              compile=compile_unet, compile_blocks=compile_blocks)
    if dry_run:
        typer.echo(cfg.to_json())
        return
    argv = ["rapm-bench", "bench"]  # the command line, rebuilt from the parsed options (defaults left out)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value == param.default or value is None or param.name == "resume":
            continue
        if isinstance(value, bool):
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            argv += [param.opts[0], str(value)]
    result = run(run_bench, cfg, argv, None if json_out else (lambda msg: typer.echo(msg, err=True)), resume)
    typer.echo(json.dumps(result, indent=2) if json_out else summary(result))


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def scaling(ctx: typer.Context) -> None:
    """Evaluation and trajectory precompute on 1 vs G GPUs, random-weight SDXL (`python -m rapm_bench.scaling`;
    its flags: `rapm-bench scaling --help`)."""
    from .scaling import main as scaling_main

    scaling_main(list(ctx.args))


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def ablation(ctx: typer.Context) -> None:
    """The tiny-world ablation behind the `tiny` defaults (`python -m rapm_bench.distill.ablation`; its flags:
    `rapm-bench ablation --help`)."""
    from .distill.ablation import main as ablation_main

    ablation_main(list(ctx.args))


def _mount_subapps() -> None:
    """`rapm-bench tiny ...` (build the shapes world) and `rapm-bench data ...` (prepare protocol data)."""
    from .cli_check import check
    from .cli_data import app as data_app
    from .cli_distill import distill
    from .cli_tiny import app as tiny_app

    app.command(help="Distil the teacher into a few-step student with RAPM (rank-1 LoRA, batch 1, no real "
                     "images).")(distill)

    app.command()(check)
    app.add_typer(tiny_app, name="tiny")
    app.add_typer(data_app, name="data")


_mount_subapps()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as e:  # raised outside a command body (e.g. while mounting)
        typer.echo(f"rapm-bench: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
