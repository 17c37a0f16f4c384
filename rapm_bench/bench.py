"""`rapm-bench bench` (issue #7): time each pipeline stage against its compute floor.

This module re-exports the names of their home, the `rapm_bench.perf` package (issue 15, item 5):
perf.config (options, presets), perf.measure (timing, FLOPs, peaks), perf.sdxl (the random-weight SDXL
builder), perf.worlds, perf.stages and perf.stages_eval (the stages), perf.report (the run, its JSON and
summary); the versions, commit and device come from rapm_bench.provenance.

Stages, run on the SDXL architecture with random weights (no download; `--scale small`
keeps the architecture with tiny widths for CPU tests) or on the embedded tiny world:

- `matmul`: a bf16 n³ matrix product, the measured ceiling beside the table's peak.
- `unet-forward`: plain UNet passes, batch 1 and the CFG pair (batch 2 vs two calls).
- `rapm-iteration`: one RAPM iteration (batch 1), the engine's own `RAPMLoss`, with the
  engine's PEFT LoRA, with `fastlora.FastLoRA` (gradient passes through the low-rank branch,
  `fast`, or through merged weights, `merged`), and with no LoRA at all (the same passes,
  gradients to the input), with and without gradient checkpointing.
- `trajectories`: one batch of teacher trajectories (`teacher_trajectories`, CFG DDIM).
- `generate`: 4 steps, guidance 1, VAE decode (`generate_batch`), LoRA merged or not.
- `eval-features`: Inception-v3 and ViT-g-14 CLIP (image and text towers) features.

Every measurement has its FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on
one call, the median of `repeats` timed calls after warm-up (CUDA synchronised), its floor
at the GPU's peak (perf.measure.PEAK_TFLOPS, or `--peak-tflops`), the ratio floor/time, and the peak
memory. The result JSON (results/bench/<preset>-<device>.json) also holds the GPU, the
versions, the command line and the git commit.
"""

from __future__ import annotations

from .fastlora import FastLoRA, LoRAWrap  # noqa: F401 (bench.FastLoRA, bench.LoRAWrap: their old home)
from .perf.config import (
    BENCH_PRESETS,
    EVAL_PRECISIONS,
    HEADLINE_LORAS,
    LORA_IMPLS,
    SCALES,
    STAGES,
    BenchConfig,
    EvalStage,
    ForwardStage,
    GenerateStage,
    Optimisations,
    RapmStage,
    RapmVariant,
    TrajectoryStage,
    parse_vae_variant,
    parse_variant,
    resolve_bench,
    validate,
)
from .perf.measure import GIB, PEAK_TFLOPS, Measurement, count_flops, free_memory, measure, peak_for, sync
from .perf.report import (
    GOALS,
    STAGE_FUNCS,
    Goal,
    estimates,
    goal_values,
    result_path,
    run_bench,
    stage_lines,
    summary,
)
from .perf.sdxl import SDXL_UNET, SDXL_UNET_SMALL, SDXL_VAE, SDXL_VAE_SMALL
from .perf.stages import (
    Bench,
    RapmSetup,
    _random_lora_b,
    headline_row,
    rapm_iteration,
    rapm_setup,
    stage_generate,
    stage_matmul,
    stage_rapm_iteration,
    stage_trajectories,
    stage_unet_forward,
)
from .perf.stages_eval import (
    CLIP_MODEL,
    CLIP_SMALL,
    build_clip,
    build_inception,
    calibrate_batchnorm,
    stage_eval_features,
    stage_feature_precision,
    stage_vae_precision,
    uint8_difference,
)
from .perf.worlds import (
    RandomSDXLWorld,
    TunedWorld,
    build_sdxl_unet,
    build_sdxl_vae,
    build_world,
    compiled_unet,
    compute_dtype,
    set_channels_last,
    set_sdpa,
)
from .provenance import device_info, git_commit_state, library_versions

versions = library_versions  # bench.versions, bench.git_commit: their old names
git_commit = git_commit_state

__all__ = [
    "BENCH_PRESETS", "Bench", "BenchConfig", "CLIP_MODEL", "CLIP_SMALL", "EVAL_PRECISIONS", "EvalStage", "FastLoRA",
    "ForwardStage", "GIB", "GOALS", "GenerateStage", "Goal", "HEADLINE_LORAS", "LORA_IMPLS", "LoRAWrap",
    "Measurement", "Optimisations", "PEAK_TFLOPS", "RandomSDXLWorld", "RapmSetup", "RapmStage", "RapmVariant",
    "SCALES", "SDXL_UNET", "SDXL_UNET_SMALL", "SDXL_VAE", "SDXL_VAE_SMALL", "STAGES", "STAGE_FUNCS",
    "TrajectoryStage", "TunedWorld", "_random_lora_b", "build_clip", "build_inception", "build_sdxl_unet",
    "build_sdxl_vae", "build_world", "calibrate_batchnorm", "compiled_unet", "compute_dtype", "count_flops",
    "device_info", "estimates", "free_memory", "goal_values", "headline_row", "measure", "parse_vae_variant",
    "parse_variant", "peak_for", "rapm_iteration", "rapm_setup", "resolve_bench", "result_path", "run_bench",
    "set_channels_last", "set_sdpa", "stage_eval_features", "stage_feature_precision", "stage_generate",
    "stage_lines", "stage_matmul", "stage_rapm_iteration", "stage_trajectories", "stage_unet_forward",
    "stage_vae_precision", "summary", "sync", "uint8_difference", "validate", "versions", "git_commit",
]
