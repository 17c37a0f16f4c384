"""`rapm-bench bench` (issue #7): time each pipeline stage against its compute floor.

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
at the GPU's peak (table below, or `--peak-tflops`), the ratio floor/time, and the peak
memory. The result JSON (results/bench/<preset>-<device>.json) also holds the GPU, the
versions, the command line and the git commit.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .fastlora import FastLoRA, LoRAWrap  # noqa: F401 (bench.FastLoRA, bench.LoRAWrap: their old home)
from .worlds.base import Cond, NoiseSchedule, UNetWorld, World, pick_device
from .worlds.registry import get_world_spec
from .worlds.sdxl import VAEDecoder

STAGES: tuple[str, ...] = ("matmul", "unet-forward", "rapm-iteration", "trajectories", "generate", "eval-features",
                           "vae-precision", "feature-precision")
SCALES: tuple[str, ...] = ("full", "small")
LORA_IMPLS: tuple[str, ...] = ("plain", "fast", "merged", "peft")  # RAPM variants' LoRA (RapmVariant.lora)
HEADLINE_LORAS: tuple[str, ...] = ("fast", "merged", "peft")  # --lora
EVAL_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
GIB = 2**30

# --- architectures (diffusers / open_clip configs as dicts: nothing is downloaded) ---------------------
SDXL_UNET: dict[str, Any] = {
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.567 B parameters)
    "in_channels": 4, "out_channels": 4, "sample_size": 128, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads: 64 channels each
    "cross_attention_dim": 2048,  # CLIP-L (768) + OpenCLIP bigG (1280) penultimate states
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled bigG (1280) + 6 time ids × 256
    "use_linear_projection": True, "norm_num_groups": 32,
}
SDXL_UNET_SMALL: dict[str, Any] = SDXL_UNET | {
    # the same modules (blocks, depths, shortcuts) with tiny widths: ~0.1 s a pass on one CPU thread
    "sample_size": 16, "block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4),
    "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
SDXL_VAE: dict[str, Any] = {
    # stabilityai/sdxl-vae config.json (83.7 M parameters; the decoder 49.5 M)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SDXL_VAE_SMALL: dict[str, Any] = SDXL_VAE | {"block_out_channels": (32, 32, 32, 32), "sample_size": 128}
CLIP_SMALL: dict[str, Any] = {
    # ViT-g-14's shape (patch 14 at 224 px, mlp ratio 4.3637, 77-token text) with tiny widths
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 4.3637,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_MODEL = "ViT-g-14"  # the DMD2 protocol's CLIP (open_clip ships its config; weights stay random)

# --- peaks: dense bf16 TFLOP/s by GPU name (first substring match wins) ------------------------------
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200", 790.0, "bf16 8192³ matmul measured on an H200 (docs/reference.md, Measured here)"),
    ("H100 PCIe", 756.0, "spec sheet, dense bf16"),
    ("H100 NVL", 835.0, "spec sheet, dense bf16"),
    ("H100", 790.0, "issue #7: H100 SXM bf16 matmul ceiling (spec sheet 989)"),
    ("A100", 312.0, "spec sheet, dense bf16"),
    ("A6000", 154.8, "spec sheet (RTX A6000), dense bf16"),
    ("L40S", 362.0, "spec sheet, dense bf16"),
    ("RTX 4090", 165.2, "spec sheet, dense bf16, fp32 accumulate"),
)


# --- configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Optimisations:
    """Speed-ups that leave results equal within a stated tolerance (tests/test_bench.py)."""

    merge_lora: bool = True  # no-grad passes use W + s·BA merged (generation: fused; RAPM: cached per step)
    cfg_batch: bool = True  # both CFG branches in one UNet call of batch 2B, not two calls of B
    channels_last: bool = False  # NHWC activations and conv weights; off: NCHW was 8 % faster on an H100 (bf16, bs 8)
    sdpa: bool = True  # torch scaled_dot_product_attention (flash / memory-efficient), not the classic processor
    compile: bool = False  # torch.compile the UNet for no-grad passes (unet-forward, trajectories, generate)
    lora: str | None = None  # RAPM headline's LoRA: None = the distill preset's --lora-impl; "merged", "fast"
    #                          (FastLoRA through the low-rank branch) or "peft"


@dataclass(frozen=True)
class ForwardStage:
    """`unet-forward`: plain passes."""

    batches: tuple[int, ...] = (1, 2)  # batch 2 is the CFG pair; it is also timed as two calls of 1


@dataclass(frozen=True)
class RapmStage:
    """`rapm-iteration`: one iteration of the distill preset's objective (N, M, chunk, λ, rank)."""

    variants: tuple[str, ...] = ("plain", "fast", "peft")  # <lora>[/ckpt][/unmerged][/chunkK], lora in LORA_IMPLS
    iterations: int = 20_000  # for the distillation estimate (the paper's 20K)
    trajectories: int = 1000  # likewise (the paper's 1000)


@dataclass(frozen=True)
class TrajectoryStage:
    """`trajectories`: one teacher batch of N×M CFG DDIM sub-steps (the distill preset's w, N, M)."""

    batch: int = 8  # trajectories per teacher batch: UNet calls of batch 2·batch


@dataclass(frozen=True)
class GenerateStage:
    """`generate`: the student recipe, DDIM trailing, guidance 1, then the VAE."""

    batch: int = 4  # images per call
    steps: int = 4
    images: int = 30_000  # for the estimate (coco30k)
    vae_variants: tuple[str, ...] = ("fp32", "tf32", "bf16", "tf32/channels_last", "bf16/channels_last")  # GPU
    vae_channels_last: bool = False  # the protocol precision's layout in the bigger batches (and the headline)
    big_batches: tuple[int, ...] = ()  # more batch sizes, graphs and the protocol's VAE (the last is the headline)


@dataclass(frozen=True)
class EvalStage:
    """`eval-features`: FID (Inception) and CLIP (image + text towers) features, inputs already resized."""

    batch: int = 100  # images (and captions) per network call
    precisions: tuple[str, ...] = ("fp32", "tf32", "bf16")  # fp32 = the protocol's (TF32 off); CPU runs fp32 only
    images: int = 30_000  # for the estimate
    precision_images: int = 2_500  # `feature-precision`: images per set (FID needs more than the 2048 dimensions)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run does; written into its result JSON."""

    preset: str = "tiny"  # "tiny" (the embedded world) or "sdxl" (the SDXL architecture, random weights)
    scale: str = "full"  # sdxl only: "small" = the same architecture with tiny widths (CPU tests)
    stages: tuple[str, ...] = STAGES
    out: str = "results/bench"  # folder of <preset>[-small]-<device>.json
    repeats: int = 3  # timed calls per measurement (the median is reported)
    warmup: int = 1  # untimed calls after the FLOP-counting call (which also warms up)
    resolution: int | None = None  # image side in pixels; None = 1024 (sdxl), 128 (small), 32 (tiny)
    device: str = "auto"
    dtype: str = "auto"  # UNet compute dtype; auto = bf16 on CUDA, fp32 on the CPU (tiny world: always fp32)
    peak_tflops: float | None = None  # None = the table's entry for this GPU (CPU: none, ratios null)
    matmul_size: int = 8192  # n of the n³ ceiling product (CPU: at most 1024)
    threads: int | None = None  # CPU threads (torch.set_num_threads); None = torch's default. A shared CPU: 1
    seed: int = 0
    opts: Optimisations = field(default_factory=Optimisations)
    forward: ForwardStage = field(default_factory=ForwardStage)
    rapm: RapmStage = field(default_factory=RapmStage)
    traj: TrajectoryStage = field(default_factory=TrajectoryStage)
    gen: GenerateStage = field(default_factory=GenerateStage)
    eval: EvalStage = field(default_factory=EvalStage)

    def to_json(self) -> str:
        """Stable JSON of the resolved config."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @property
    def name(self) -> str:
        """`tiny`, `sdxl` or `sdxl-small`: the result file's prefix."""
        return self.preset if self.scale == "full" else f"{self.preset}-{self.scale}"


_SDXL_RAPM = RapmStage(variants=("plain/graphs", "merged/graphs", "fast/unmerged/graphs", "fast/graphs",  # fits
                                 "plain", "merged",  # the same without the no-grad fast path
                                 "plain/ckpt/graphs", "merged/ckpt/graphs", "fast/unmerged/ckpt/graphs",  # 24-48 GB
                                 "plain/ckpt", "merged/ckpt", "peft/ckpt"))  # the engine before issue 14
BENCH_PRESETS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(traj=TrajectoryStage(batch=4), gen=GenerateStage(batch=4), eval=EvalStage(batch=64),
                        rapm=RapmStage(iterations=200, trajectories=256)),
    "sdxl": BenchConfig(preset="sdxl", rapm=_SDXL_RAPM, forward=ForwardStage(batches=(1, 2, 8)),
                        gen=GenerateStage(vae_variants=("fp32", "tf32", "bf16"), big_batches=(8, 16))),
    "sdxl-small": BenchConfig(preset="sdxl", scale="small", repeats=1, matmul_size=512, rapm=_SDXL_RAPM,
                              traj=TrajectoryStage(batch=2), gen=GenerateStage(batch=2),
                              eval=EvalStage(batch=2, precision_images=64)),
}


def _csv(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple (None stays None)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if s.strip())


def resolve_bench(preset: str = "tiny", scale: str = "full", **overrides: Any) -> BenchConfig:
    """The preset's config with overrides (None = keep the preset's), validated.

    Flat keys `merge_lora`, `cfg_batch`, `channels_last`, `sdpa`, `compile`, `lora` go to
    `opts`; `rapm_variants`, `traj_batch`, `gen_batch`, `eval_batch` to their stages.
    """
    world = get_world_spec(preset)
    if scale not in SCALES:
        raise UserError(f"unknown --scale {scale!r}; use one of {', '.join(SCALES)}")
    cfg = world.bench_config(scale)
    given = {k: v for k, v in overrides.items() if v is not None}
    opts = replace(cfg.opts, **{k: given.pop(k) for k in list(given) if k in Optimisations.__dataclass_fields__})
    stage_keys = {"rapm_variants": ("rapm", "variants"), "traj_batch": ("traj", "batch"),
                  "gen_batch": ("gen", "batch"), "eval_batch": ("eval", "batch")}
    for key, (stage, name) in stage_keys.items():
        if key in given:
            value = _csv(given.pop(key)) if name == "variants" else given.pop(key)
            cfg = replace(cfg, **{stage: replace(getattr(cfg, stage), **{name: value})})
    if "stages" in given:
        given["stages"] = _csv(given["stages"])
    unknown = set(given) - set(BenchConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown bench config fields: {sorted(unknown)}")
    cfg = replace(cfg, opts=opts, **given)
    validate(cfg)
    return cfg


def validate(cfg: BenchConfig) -> None:
    """Reject what the bench cannot run, naming the option."""
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad or not cfg.stages:
        raise UserError(f"unknown stage {bad[0]!r}; use any of {', '.join(STAGES)}" if bad else "--stages is empty")
    for name, value in (("--repeats", cfg.repeats), ("--traj-batch", cfg.traj.batch), ("--gen-batch", cfg.gen.batch),
                        ("--eval-batch", cfg.eval.batch), ("--matmul-size", cfg.matmul_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if cfg.warmup < 0:
        raise UserError(f"--warmup must be at least 0, got {cfg.warmup}")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be positive, got {cfg.peak_tflops}")
    if cfg.opts.lora is not None and cfg.opts.lora not in HEADLINE_LORAS:
        raise UserError(f"--lora must be {', '.join(HEADLINE_LORAS[:-1])} or {HEADLINE_LORAS[-1]}, "
                        f"got {cfg.opts.lora!r}")
    for v in cfg.rapm.variants:
        parse_variant(v)
    for p in cfg.eval.precisions:
        if p not in EVAL_PRECISIONS:
            raise UserError(f"unknown eval precision {p!r}; use any of {', '.join(EVAL_PRECISIONS)}")
    if cfg.resolution is not None:
        get_world_spec(cfg.preset).check_resolution(cfg.resolution)
    device = cfg.device
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")


@dataclass(frozen=True)
class RapmVariant:
    """One way of running the RAPM iteration."""

    lora: str  # "plain" (no LoRA: gradients to the input), "fast", "merged" (FastLoRA modes) or "peft"
    ckpt: bool  # gradient checkpointing
    merged: bool  # FastLoRA: no-grad passes through merged weights (always so for "merged")
    chunk: int | None = None  # slots per student forward (`slot_chunk`); None = the distill preset's
    graphs: bool = False  # the engine's `fast_nograd`: no-grad passes from CUDA graphs, first jumps merged (GPU)

    @property
    def name(self) -> str:
        """The variant's spelling, e.g. `fast/ckpt/chunk4`."""
        return (self.lora + ("/ckpt" if self.ckpt else "") + ("" if self.merged or self.lora != "fast" else "/unmerged")
                + ("" if self.chunk is None else f"/chunk{self.chunk}") + ("/graphs" if self.graphs else ""))


def parse_variant(text: str, merge_default: bool = True) -> RapmVariant:
    """`<lora>[/ckpt][/unmerged][/chunkK][/graphs]` -> RapmVariant (`merged` runs every pass merged)."""
    lora, *flags = text.split("/")
    chunks = [int(f[5:]) for f in flags if re.fullmatch(r"chunk[1-9]\d*", f)]
    if lora not in LORA_IMPLS or any(f not in ("ckpt", "unmerged", "merged", "graphs") and not re.fullmatch(
            r"chunk[1-9]\d*", f) for f in flags) or len(chunks) > 1:
        raise UserError(f"bad RAPM variant {text!r}: use <lora>[/ckpt][/unmerged][/chunkK][/graphs] with lora one "
                        f"of {', '.join(LORA_IMPLS)}")
    if lora == "merged" and "unmerged" in flags:
        raise UserError(f"bad RAPM variant {text!r}: `merged` runs every pass through merged weights; "
                        "for no-grad passes through the low-rank branch use fast/unmerged")
    merged = lora == "merged" or ("unmerged" not in flags and ("merged" in flags or merge_default))
    return RapmVariant(lora, "ckpt" in flags, merged, chunks[0] if chunks else None, "graphs" in flags)


# --- measuring -------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU attention kernels FlopCounterMode does not know (same maths as on CUDA)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    table: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_flop_count(q, k, v)

        def bwd(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_backward_flop_count(g, q, k, v)

        table[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return table


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by FlopCounterMode (matmuls, convolutions, attention; not elementwise).

    nn.MultiheadAttention's fused inference path is switched off while counting (its
    projections would go uncounted); the arithmetic is the same.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .cudagraphs import eager

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter, eager():
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Measurement:
    """Timed calls of one variant of a stage."""

    name: str
    unit: str  # what a call produces: "image", "iteration", "trajectory", ...
    units: int  # how many per call
    seconds: tuple[float, ...]  # each timed call
    flops: int | None  # counted FLOPs of one call
    peak_memory_gib: float | None  # torch.cuda.max_memory_allocated during the timed calls
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.seconds)

    def row(self, peak_tflops: float | None) -> dict[str, Any]:
        """JSON row: time, throughput, counted FLOPs, achieved TFLOP/s, floor at the peak, ratio, memory."""
        t = self.median
        floor = None if peak_tflops is None or self.flops is None else self.flops / (peak_tflops * 1e12)
        return {
            "name": self.name, "unit": self.unit, "units_per_call": self.units,
            "seconds": t, "seconds_all": list(self.seconds),
            "seconds_per_unit": t / self.units, "throughput_per_s": self.units / t,
            "flops_per_call": self.flops, "flops_per_unit": None if self.flops is None else self.flops / self.units,
            "tflops_achieved": None if self.flops is None else self.flops / t / 1e12,
            "floor_seconds": floor, "ratio": None if floor is None else floor / t,
            "peak_memory_gib": self.peak_memory_gib, **self.extra,
        }


def measure(
    name: str, fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int, unit: str, units: int,
    count: bool = True, **extra: Any,
) -> Measurement:
    """Count one call's FLOPs (that call warms up too; `count=False` skips it), run `warmup` more, time `repeats`."""
    flops = count_flops(fn) if count else None
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return Measurement(name, unit, units, tuple(times), flops, None if peak is None else round(peak, 3), dict(extra))


def free_memory(device: torch.device) -> None:
    """Return cached blocks so the next measurement's peak starts clean."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- worlds ------------------------------------------------------------------------------------------------
def _sdxl_pooled_dim(unet_cfg: dict[str, Any]) -> int:
    """Width of the pooled text embedding a text_time UNet expects."""
    return unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]


def build_sdxl_unet(small: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight SDXL-architecture UNet, initialised on `device` (fast on a GPU)."""
    import diffusers
    from diffusers import UNet2DConditionModel

    diffusers.utils.logging.set_verbosity_error()  # no "modules kept in float32: []" notice on .to(dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET_SMALL if small else SDXL_UNET))
    return unet.to(dtype).eval().requires_grad_(False)


def build_sdxl_vae(small: bool, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-weight SDXL-architecture VAE, fp32 (the SDXL VAE's precision policy)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    with torch.device(device):
        vae = AutoencoderKL(**(SDXL_VAE_SMALL if small else SDXL_VAE))
    return vae.float().eval().requires_grad_(False)


class RandomSDXLWorld(UNetWorld):
    """The SDXL world's UNet call, schedule and VAE decode on random weights; random text conditioning.

    The text encoders are not run: per prompt they cost ~0.2 % of one RAPM iteration.
    """

    name = "sdxl"
    default_guidance = 5.0
    noise_schedule = NoiseSchedule()  # SDXL: scaled_linear 0.00085-0.012, eps

    def __init__(self, small: bool, device: torch.device, dtype: torch.dtype, resolution: int | None = None,
                 seed: int = 0) -> None:
        self.small, self.device, self.dtype = small, device, dtype
        self.unet_config = SDXL_UNET_SMALL if small else SDXL_UNET
        self.unet = build_sdxl_unet(small, device, dtype, seed)
        self.vae = build_sdxl_vae(small, device, seed)
        self.decoder = VAEDecoder(self.vae)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._resolution = resolution or self.unet_config["sample_size"] * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self._resolution // self.vae_scale
        return (self.unet_config["in_channels"], side, side)

    @property
    def image_size(self) -> int:
        return self._resolution

    def grad_activation_gib(self) -> float:
        from .worlds.sdxl import activation_gib

        return activation_gib(self._resolution) * (0.01 if self.small else 1.0)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Seeded random embeddings of SDXL's shapes (77 tokens × cross_attention_dim, pooled, time ids)."""
        width, pooled = self.unet_config["cross_attention_dim"], _sdxl_pooled_dim(self.unet_config)
        gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(77, width, generator=g) for g in gens])
        text = torch.stack([torch.randn(pooled, generator=g) for g in gens])
        side = self._resolution
        ids = torch.tensor([[side, side, 0, 0, side, side]] * len(prompts))
        return {k: v.to(self.device, self.dtype) for k, v in
                (("prompt_embeds", embeds), ("text_embeds", text), ("time_ids", ids))}

    @torch.no_grad()
    def negative_cond(self, cond: Cond) -> Cond:
        """SDXL base's zeroed embeddings for the empty prompt (force_zeros_for_empty_prompt)."""
        return {"prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
                "text_embeds": torch.zeros_like(cond["text_embeds"]), "time_ids": cond["time_ids"]}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The SDXL world's UNet call: half precision inside, fp32 out."""
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=cond["prompt_embeds"],
                        added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
                        return_dict=False)[0]
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images on the CPU: SDXLWorld's decoder."""
        return self.decoder(latents)

    def set_vae_precision(self, precision: str, channels_last: bool | None = None) -> None:
        super().set_vae_precision(precision)
        self.decoder.precision = precision
        if channels_last is not None:
            self.decoder.channels_last = channels_last

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"teacher": "random weights, SDXL architecture" + (" (small)" if self.small else ""),
                                     "resolution": self._resolution, "dtype": str(self.dtype).removeprefix("torch.")}


class TunedWorld(World):
    """Any world with the bench's switches: channels_last inputs, CFG pairs split into two calls."""

    def __init__(self, inner: World, opts: Optimisations) -> None:
        self.inner, self.opts = inner, opts
        self.name, self.noise_schedule, self.device = inner.name, inner.noise_schedule, inner.device
        self.default_guidance = inner.default_guidance
        self.calls_per_batch = 1  # 2 = a CFG pair as two UNet calls (the trajectories stage sets it)

    @property
    def unet(self) -> nn.Module:  # type: ignore[override]
        return self.inner.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.inner.latent_shape

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.inner.alphas_cumprod

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self.inner.encode_prompts(prompts)

    def negative_cond(self, cond: Cond) -> Cond:
        return self.inner.negative_cond(cond)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = self.calls_per_batch
        if n == 1 or x.shape[0] % n:
            return self.inner.predict(x, t, cond)
        t = torch.as_tensor(t, device=x.device)
        ts = t.chunk(n) if t.ndim else [t] * n
        parts = zip(x.chunk(n), ts, *(v.chunk(n) for v in cond.values()), strict=True)
        return torch.cat([self.inner.predict(p[0], p[1], dict(zip(cond, p[2:], strict=True))) for p in parts])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)

    def grad_activation_gib(self) -> float:
        return self.inner.grad_activation_gib()

    def set_vae_precision(self, precision: str, channels_last: bool | None = None) -> None:
        self.inner.set_vae_precision(precision, channels_last)

    def load_lora(self, path: Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        self.inner.load_lora(path, adapter_name, scale)

    def fuse_lora(self) -> None:
        self.inner.fuse_lora()

    def unload_lora(self) -> None:
        self.inner.unload_lora()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() | {"bench_opts": asdict(self.opts)}


def set_sdpa(module: nn.Module, sdpa: bool) -> None:
    """torch SDPA attention processors (True) or diffusers' classic matmul-softmax-matmul ones."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def set_channels_last(module: nn.Module, on: bool) -> None:
    """Convolution weights in NHWC (True) or NCHW."""
    module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


@contextlib.contextmanager
def compiled_unet(world: TunedWorld, enabled: bool) -> Iterator[None]:
    """`torch.compile` the world's UNet for the duration (no-grad stages only)."""
    if not enabled:
        yield
        return
    inner = world.inner
    plain = inner.unet
    inner.unet = torch.compile(plain)
    try:
        yield
    finally:
        inner.unet = plain


def compute_dtype(cfg: BenchConfig, device: torch.device) -> torch.dtype:
    """The UNet's dtype: bf16 on a GPU, fp32 on the CPU, unless --dtype says otherwise."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return names[cfg.dtype]


def build_world(cfg: BenchConfig, device: torch.device) -> TunedWorld:
    """The preset's world with the bench's optimisations applied."""
    if get_world_spec(cfg.preset).bench_weights == "shipped":
        from .config import WorldConfig

        inner: World = get_world_spec(cfg.preset).load(WorldConfig(preset=cfg.preset, device=str(device)))
        inner.unet.requires_grad_(False)
    else:
        inner = RandomSDXLWorld(cfg.scale == "small", device, compute_dtype(cfg, device), cfg.resolution, cfg.seed)
        set_sdpa(inner.vae, cfg.opts.sdpa)  # type: ignore[attr-defined]
    set_sdpa(inner.unet, cfg.opts.sdpa)
    if cfg.opts.channels_last:
        set_channels_last(inner.unet, True)
    return TunedWorld(inner, cfg.opts)


# --- the run context ---------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every stage needs: the config, device, peak and (lazily) the world."""

    cfg: BenchConfig
    device: torch.device
    peak_tflops: float | None
    _world: TunedWorld | None = None

    @property
    def world(self) -> TunedWorld:
        """The preset's world, built on first use."""
        if self._world is None:
            self._world = build_world(self.cfg, self.device)
        return self._world

    def measure(self, name: str, fn: Callable[[], Any], unit: str, units: int, warmup: int | None = None,
                min_repeats: int = 1, **extra: Any) -> Measurement:
        """`measure` with this run's device, repeats (at least `min_repeats`) and warm-up."""
        free_memory(self.device)
        warm = self.cfg.warmup if warmup is None else warmup
        return measure(name, fn, self.device, max(self.cfg.repeats, min_repeats), warm, unit, units, **extra)

    def distill_config(self) -> Any:
        """The distill preset whose iteration is benchmarked."""
        from .distill.config import distill_preset

        return distill_preset(self.cfg.preset)

    def stage(self, ms: list[Measurement], headline: str | None, **extra: Any) -> dict[str, Any]:
        """A stage's JSON: its measurements' rows and which one is the headline."""
        return {"variants": [m.row(self.peak_tflops) for m in ms], "headline": headline, **extra}


def headline_row(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's headline measurement row."""
    return next((r for r in stage["variants"] if r["name"] == stage["headline"]), None)


# --- stages ------------------------------------------------------------------------------------------------
def stage_matmul(b: Bench) -> dict[str, Any]:
    """bf16 n³ matrix product (fp32 on the CPU): the measured ceiling beside the table's peak."""
    n = b.cfg.matmul_size if b.device.type == "cuda" else min(b.cfg.matmul_size, 1024)
    dtype = torch.bfloat16 if b.device.type == "cuda" else torch.float32
    gen = torch.Generator(b.device).manual_seed(b.cfg.seed)
    x = torch.randn(n, n, device=b.device, dtype=dtype, generator=gen)
    y = torch.randn(n, n, device=b.device, dtype=dtype, generator=gen)
    m = b.measure(f"{n}^3 {str(dtype).removeprefix('torch.')}", lambda: x @ y, "product", 1, min_repeats=10)
    return b.stage([m], m.name)


def _unet_inputs(world: TunedWorld, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """Latents, timesteps and conditioning for one UNet call."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *world.latent_shape), generator=gen).to(world.device)
    t = torch.full((batch,), 499, device=world.device)
    return x, t, world.encode_prompts([f"bench prompt {i}" for i in range(batch)])


def stage_unet_forward(b: Bench) -> dict[str, Any]:
    """Plain no-grad UNet passes: each batch size, the CFG pair as two calls, and the optimisations undone."""
    w, opts = b.world, b.cfg.opts
    ms: list[Measurement] = []

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> Callable[[], Any]:
        return torch.no_grad()(lambda: w.predict(x, t, cond))

    def timed(name: str, fn: Callable[[], Any], batch: int) -> Measurement:
        return b.measure(name, fn, "image", batch, min_repeats=10)  # cheap calls: 10 timed calls at least

    with compiled_unet(w, opts.compile):
        for batch in b.cfg.forward.batches:
            ms.append(timed(f"batch {batch}", run(*_unet_inputs(w, batch, b.cfg.seed)), batch))
    x, t, cond = _unet_inputs(w, 2, b.cfg.seed)
    w.calls_per_batch = 2
    ms.append(timed("batch 2 as two calls (no CFG batching)", run(x, t, cond), 2))
    w.calls_per_batch = 1
    big = max(b.cfg.forward.batches)  # the other switches where the GPU, not the launch queue, is the limit
    x, t, cond = _unet_inputs(w, big, b.cfg.seed)
    unet = w.unet
    set_sdpa(unet, not opts.sdpa)
    ms.append(timed(f"batch {big}, sdpa {'off' if opts.sdpa else 'on'}", run(x, t, cond), big))
    set_sdpa(unet, opts.sdpa)
    set_channels_last(unet, not opts.channels_last)
    w.opts = replace(opts, channels_last=not opts.channels_last)
    ms.append(timed(f"batch {big}, channels_last {'off' if opts.channels_last else 'on'}", run(x, t, cond), big))
    set_channels_last(unet, opts.channels_last)
    w.opts = opts
    return b.stage(ms, f"batch {b.cfg.forward.batches[0]}")


@dataclass
class RapmSetup:
    """One RAPM iteration's moving parts (engine.distill phases 2 and 4)."""

    loss_fn: Any
    params: list[nn.Parameter]
    head_params: list[nn.Parameter]
    optimizers: list[torch.optim.Optimizer]
    z_tilde: torch.Tensor
    z_delta: torch.Tensor
    prompt: str
    chunk: int
    grad_clip: float
    seed: int
    cleanup: Callable[[], None]


def rapm_setup(world: TunedWorld, dcfg: Any, variant: RapmVariant, seed: int) -> RapmSetup:
    """Student (LoRA or none), discriminator heads, loss and optimisers as `engine.distill` builds them."""
    from .distill.discriminator import EncoderFeatures, build_heads, feature_channels
    from .distill.engine import ADAPTER
    from .distill.objectives import fast_nograd
    from .distill.rapm import LossWeights, RAPMLoss
    from .distill.schedule import SlotSchedule
    from .lora import attach_lora

    unet, device = world.unet, world.device
    if variant.ckpt:
        unet.enable_gradient_checkpointing()
    cleanups: list[Callable[[], None]] = [unet.disable_gradient_checkpointing] if variant.ckpt else []
    student: Callable[..., torch.Tensor] = world.predict
    if variant.lora == "peft":
        params = attach_lora(unet, dcfg.rank, dcfg.lora_targets, ADAPTER, dcfg.seed)
        cleanups.append(unet.unload_lora)
    elif variant.lora in ("fast", "merged"):  # FastLoRA; "merged": gradient passes through W + s·B·A too
        lora = FastLoRA(unet, dcfg.rank, dcfg.lora_targets, dcfg.seed, merge_nograd=variant.merged,
                        mode="merged" if variant.lora == "merged" else "unmerged")
        params = lora.parameters()
        cleanups.append(lora.remove)
    else:  # no LoRA: the same passes with the gradient going to the student's input (a scalar gain)
        gain = torch.ones((), device=device, requires_grad=True)
        params = [gain]

        def student(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            return world.predict(x * gain, t, cond)

    sched = SlotSchedule(world.alphas_cumprod, dcfg.slots, dcfg.substeps)
    rc = dcfg.method("rapm")  # RAPM's settings (distill/rapm_config.py)
    weights = LossWeights(rc.lambda_abs, rc.lambda_rel, rc.lambda_reg, rc.distance, rc.huber_c)
    features = EncoderFeatures(world) if rc.adversarial else None
    heads_abs = heads_rel = None
    head_params: list[nn.Parameter] = []
    if features is not None:
        channels = feature_channels(features, world.encode_prompts(["bench prompt"]))
        heads_abs, heads_rel = build_heads(channels, dcfg.disc_hidden, dcfg.seed, device)
        head_params = [*heads_abs.parameters(), *heads_rel.parameters()]
    loss_fn = RAPMLoss(student, sched, world.noise_schedule.prediction_type, weights, features, heads_abs, heads_rel)
    if variant.graphs:
        fast_nograd(loss_fn, world)
    optimizers = [torch.optim.AdamW(params, lr=dcfg.lr, betas=dcfg.betas, weight_decay=dcfg.weight_decay)]
    if head_params:
        optimizers.append(torch.optim.AdamW(head_params, lr=dcfg.disc_lr, betas=dcfg.betas, weight_decay=0.0))
    gen = torch.Generator().manual_seed(seed)
    shape = world.latent_shape
    z_tilde = torch.randn((dcfg.slots + 1, *shape), generator=gen).to(device)
    z_delta = torch.randn((dcfg.slots, *shape), generator=gen).to(device)

    def cleanup() -> None:
        for fn in reversed(cleanups):
            fn()

    return RapmSetup(loss_fn, params, head_params, optimizers, z_tilde, z_delta, "bench prompt",
                     variant.chunk or dcfg.slot_chunk, dcfg.grad_clip, dcfg.seed, cleanup)


def rapm_iteration(world: TunedWorld, s: RapmSetup, step: int) -> None:
    """One iteration as `engine.distill` step 4 runs it: roll-out, chunked backward, clip, update."""
    from .distill.engine import derived_seed

    gen = torch.Generator(world.device).manual_seed(derived_seed(s.seed, "step", step))
    cond = world.encode_prompts([s.prompt])
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    for terms in s.loss_fn.chunks(s.z_tilde, s.z_delta, cond, gen, s.chunk):
        if terms.g_loss is not None:
            terms.g_loss.backward(inputs=s.params)
        if terms.d_loss is not None:
            terms.d_loss.backward(inputs=s.head_params)
    torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip if s.grad_clip > 0 else math.inf)
    for opt in s.optimizers:
        opt.step()


def stage_rapm_iteration(b: Bench) -> dict[str, Any]:
    """One RAPM iteration per variant; each LoRA variant's time over the plain one with the same checkpointing."""
    dcfg, opts = b.distill_config(), b.cfg.opts
    variants = [parse_variant(v, opts.merge_lora) for v in b.cfg.rapm.variants]
    ms: list[Measurement] = []
    for v in variants:
        s = rapm_setup(b.world, dcfg, v, b.cfg.seed)
        try:
            steps = iter(range(10**9))
            ms.append(b.measure(v.name, lambda s=s, it=steps: rapm_iteration(b.world, s, next(it)), "iteration", 1,
                                warmup=min(b.cfg.warmup, 1 if v.graphs else get_world_spec(b.cfg.preset).bench_rapm_warmup),
                                # the counted call warms up, but eagerly: graphs are captured in the warm-up
                                lora=v.lora, grad_checkpointing=v.ckpt, graphs=v.graphs,
                                merged_nograd=v.merged and v.lora in ("fast", "merged"),
                                merged_grad=v.lora == "merged",
                                slot_chunk=s.chunk,
                                lora_params=sum(p.numel() for p in s.params) if v.lora != "plain" else 0))
        finally:
            s.cleanup()
            del s
    def same(m: Measurement) -> tuple[Any, ...]:
        return m.extra["grad_checkpointing"], m.extra["slot_chunk"], m.extra["graphs"]

    plain = {same(m): m.median for m in ms if m.extra["lora"] == "plain"}
    for m in ms:  # over the plain variant with the same checkpointing, chunking and no-grad path
        base = plain.get(same(m))
        m.extra["vs_plain"] = None if base is None else m.median / base
    ckpt = dcfg.grad_checkpointing
    if ckpt is None:  # auto: what the engine would choose on this device
        from .distill.memory import choose_checkpointing

        ckpt = choose_checkpointing(dcfg, b.world)[0]
    graphs = bool(dcfg.fast_nograd) and b.device.type == "cuda"
    impl = opts.lora or dcfg.lora_impl
    want = RapmVariant(impl, ckpt, impl == "merged" or (impl == "fast" and opts.lora is not None and opts.merge_lora),
                       graphs=graphs)  # the engine's "fast" runs its no-grad passes through the low-rank branch too
    names = [m.name for m in ms]
    headline = want.name if want.name in names else next((n for n in names if not n.startswith("plain")), names[0])
    flat = dcfg.flat()  # config.json's names: RAPM's fields unprefixed
    return b.stage(ms, headline, objective={k: flat[k] for k in (
        "slots", "substeps", "slot_chunk", "rank", "distance", "lambda_abs", "lambda_rel", "lambda_reg",
        "disc_hidden", "grad_checkpointing", "fast_nograd")}, engine_grad_checkpointing=ckpt)


def stage_trajectories(b: Bench) -> dict[str, Any]:
    """One batch of teacher trajectories (`teacher_trajectories`): N·M CFG DDIM sub-steps."""
    from .distill.schedule import SlotSchedule
    from .distill.trajectories import teacher_trajectories
    from .sampling import cfg_denoiser

    dcfg, w, batch = b.distill_config(), b.world, b.cfg.traj.batch
    guidance = w.default_guidance if dcfg.guidance is None else dcfg.guidance
    sched = SlotSchedule(w.alphas_cumprod, dcfg.slots, dcfg.substeps)
    prompts = [f"bench prompt {i}" for i in range(batch)]
    seeds = range(b.cfg.seed, b.cfg.seed + batch)
    calls = dcfg.slots * dcfg.substeps  # CFG UNet calls per trajectory batch
    x, t, cond = _unet_inputs(w, batch, b.cfg.seed)
    step = cfg_denoiser(w, cond, guidance)
    ms = []
    w.calls_per_batch = 1 if b.cfg.opts.cfg_batch else 2
    try:
        with compiled_unet(w, b.cfg.opts.compile), torch.no_grad():
            step_flops = count_flops(lambda: step(x, t[0]))
            m = b.measure("cfg batched" if b.cfg.opts.cfg_batch else "cfg two calls",
                          lambda: teacher_trajectories(w, prompts, seeds, guidance, sched), "trajectory", batch,
                          warmup=0, count=False)  # the counted CFG step warmed the UNet up
    finally:
        w.calls_per_batch = 1
    ms.append(replace(m, flops=step_flops * calls))
    return b.stage(ms, ms[0].name, guidance=guidance, slots=dcfg.slots, substeps=dcfg.substeps,
                   unet_calls_per_batch=calls * (1 if b.cfg.opts.cfg_batch else 2), unet_batch=2 * batch)


def _random_lora_b(unet: nn.Module, seed: int, std: float = 0.02) -> None:
    """Give a freshly attached LoRA non-zero B weights (attach_lora starts at B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * std)


def stage_generate(b: Bench) -> dict[str, Any]:
    """The student recipe (`generate_batch`: DDIM trailing, 4 steps, guidance 1, decode): LoRA merged or not, the
    UNet eager or from CUDA graphs, the VAE in each precision, and a bigger batch."""
    from .cudagraphs import graphed_predict
    from .distill.engine import ADAPTER
    from .eval.protocols import default_protocol
    from .generate import generate_batch
    from .lora import attach_lora
    from .sampling import DDIM_TRAILING

    cfg, w, dcfg = b.cfg, b.world, b.distill_config()
    protocol_vae = default_protocol(cfg.preset).vae_precision
    cuda = b.device.type == "cuda"

    def runner(batch: int) -> Callable[[], torch.Tensor]:
        prompts = [f"bench prompt {i}" for i in range(batch)]
        seeds = list(range(cfg.seed, cfg.seed + batch))
        return lambda: generate_batch(w, prompts, seeds, DDIM_TRAILING, cfg.gen.steps, 1.0)

    run, n = runner(cfg.gen.batch), cfg.gen.batch
    ms = []
    w.set_vae_precision("fp32", channels_last=False)
    with compiled_unet(w, cfg.opts.compile):
        ms.append(b.measure("teacher weights, no LoRA", run, "image", n))
    attach_lora(w.unet, dcfg.rank, dcfg.lora_targets, ADAPTER, dcfg.seed)
    _random_lora_b(w.unet, cfg.seed)
    try:
        ms.append(b.measure("LoRA unmerged (peft)", run, "image", n))
        w.unet.fuse_lora()
        with compiled_unet(w, cfg.opts.compile):
            ms.append(b.measure("LoRA merged", run, "image", n))
        if cuda:
            with graphed_predict(w):
                for vae in cfg.gen.vae_variants:
                    precision, _, layout = vae.partition("/")
                    w.set_vae_precision(precision, channels_last=layout == "channels_last")
                    ms.append(b.measure(f"LoRA merged, graphs, VAE {vae}", run, "image", n, warmup=1))
                w.set_vae_precision(protocol_vae, channels_last=cfg.gen.vae_channels_last)
                for big in cfg.gen.big_batches:
                    ms.append(b.measure(f"LoRA merged, graphs, VAE {protocol_vae}, batch {big}", runner(big),
                                        "image", big, warmup=1))
        w.unet.unfuse_lora()
    finally:
        w.unet.unload_lora()
        w.set_vae_precision("fp32", channels_last=False)
    names = [m.name for m in ms]
    layout = "/channels_last" if cfg.gen.vae_channels_last else ""
    best = [f"LoRA merged, graphs, VAE {protocol_vae}, batch {big}" for big in cfg.gen.big_batches[-1:]]
    headline = next((x for x in [*best, f"LoRA merged, graphs, VAE {protocol_vae}{layout}"] if x in names),
                    "LoRA merged" if cfg.opts.merge_lora else "LoRA unmerged (peft)")
    return b.stage(ms, headline, steps=cfg.gen.steps, guidance=1.0, resolution=w.image_size,
                   protocol_vae_precision=protocol_vae)


def _decode_latents(world: TunedWorld, n: int, seed: int) -> torch.Tensor:
    """Latents that decode to varied images: random, at the VAE's scale (the decoder divides by the factor)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *world.latent_shape), generator=gen).to(world.device)


def uint8_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference of two uint8 image batches, and the share of values that differ."""
    d = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return {"max": int(d.max()), "mean": float(d.float().mean()), "changed_share": float((d > 0).float().mean())}


def stage_vae_precision(b: Bench) -> dict[str, Any]:
    """VAE decode per precision and layout: time per image and the uint8 difference to fp32 (TF32 off)."""
    w, cfg = b.world, b.cfg
    if not hasattr(w.inner, "decoder"):
        return b.stage([], None, note="this world has no VAE (the tiny world decodes by identity)")
    n = cfg.gen.batch
    latents = _decode_latents(w, n, cfg.seed)
    variants = [v for v in cfg.gen.vae_variants if b.device.type == "cuda" or v == "fp32"]
    ms, diffs = [], {}
    reference: torch.Tensor | None = None
    try:
        for vae in ["fp32", *[v for v in variants if v != "fp32"]]:
            precision, _, layout = vae.partition("/")
            w.set_vae_precision(precision, channels_last=layout == "channels_last")
            images = w.decode(latents)
            if reference is None:
                reference = images
            diffs[vae] = uint8_difference(images, reference)
            ms.append(b.measure(f"decode {vae}", lambda: w.decode(latents), "image", n, precision=precision,
                                channels_last=layout == "channels_last", **{f"uint8_{k}": v for k, v in diffs[vae].items()}))
        inside = float(((reference > 0) & (reference < 255)).float().mean()) if reference is not None else None
    finally:
        w.set_vae_precision("fp32", channels_last=False)
    return b.stage(ms, None, images=n, unsaturated_share=inside, differences_vs_fp32=diffs,
                   inputs="random N(0, 1) latents through the random-weight SDXL VAE")


def stage_feature_precision(b: Bench) -> dict[str, Any]:
    """FID and CLIP score computed with TF32 and bf16 feature networks against the same in fp32 (TF32 off)."""
    from .eval.fid import FeatureStats, fid_from_stats
    from .precision import compute

    cfg, device = b.cfg, b.device
    gen = torch.Generator().manual_seed(cfg.seed)
    precisions = [p for p in cfg.eval.precisions if device.type == "cuda" or p == "fp32"]
    n = cfg.eval.precision_images
    out: dict[str, Any] = {}
    if get_world_spec(cfg.preset).bench_weights == "shipped" or device.type == "cuda":  # the tiny evaluator: shapes
        from .eval.tiny_evaluator import load_tiny_evaluator
        from .worlds.shapes import captions, render_images

        ev = load_tiny_evaluator(device)
        real = render_images(range(n))
        fake = render_images(range(n, 2 * n)).roll(1, dims=-1)  # another set, shifted by a pixel
        text = captions(range(n, 2 * n))
        out["tiny-evaluator"] = _precision_rows(
            precisions, device,
            features=lambda x: ev.image_features(x), real=real, fake=fake,
            clip=lambda: ev.clip_score(fake, text).mean().item() * 100, compute=compute,
            stats=(FeatureStats, fid_from_stats))
    if get_world_spec(cfg.preset).bench_weights == "random":  # SDXL: Inception and ViT-g-14, random weights
        small = cfg.scale == "small"
        inception, clip = build_inception(device), build_clip(small, device)
        size = clip.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        real = torch.randint(0, 256, (n, 3, 299, 299), generator=gen, dtype=torch.uint8)
        fake = torch.nn.functional.avg_pool2d(real.float(), 5, 1, 2).round().to(torch.uint8)  # blurred: FID > 0
        calibrate_batchnorm(inception, (real[:32].to(device).float() - 128) / 128)
        x_clip = torch.randn((min(n, cfg.eval.batch * 4), 3, size, size), generator=gen)
        tokens = torch.randint(0, 49408, (x_clip.shape[0], 77), generator=gen)

        def inception_features(x: torch.Tensor) -> torch.Tensor:
            parts = [inception((c.to(device).float() - 128) / 128).float() for c in x.split(cfg.eval.batch)]
            return torch.cat(parts)

        def clip_score() -> float:
            img = torch.cat([clip.encode_image(c.to(device)).float() for c in x_clip.split(cfg.eval.batch)])
            txt = torch.cat([clip.encode_text(c.to(device)).float() for c in tokens.split(cfg.eval.batch)])
            cos = torch.nn.functional.cosine_similarity(img, txt)
            return float(cos.clamp(min=0).mean() * 100)

        out["inception+clip"] = _precision_rows(precisions, device, features=inception_features, real=real,
                                                fake=fake, clip=clip_score, compute=compute,
                                                stats=(FeatureStats, fid_from_stats))
        del inception, clip
        free_memory(device)
    return b.stage([], None, images=n, networks=out,
                   note="random-weight Inception-v3 and ViT-g-14 (random inputs), and the shipped tiny evaluator "
                        "(shapes renders); each precision's FID and CLIP score beside the fp32 (TF32 off) one")


def _precision_rows(precisions: list[str], device: torch.device, features: Callable[[torch.Tensor], torch.Tensor],
                    real: torch.Tensor, fake: torch.Tensor, clip: Callable[[], float], compute: Any,
                    stats: Any) -> dict[str, Any]:
    """FID(real, fake) and a CLIP score per precision; relative changes against fp32."""
    feature_stats, fid_from_stats = stats
    rows: dict[str, Any] = {}
    for p in precisions:
        with torch.no_grad(), compute(p, device):
            a, c = feature_stats(), feature_stats()
            a.update(features(real).double().cpu())
            c.update(features(fake).double().cpu())
            rows[p] = {"fid": fid_from_stats(a, c), "clip": clip()}
    base = rows.get("fp32")
    for r in rows.values():
        if base is not None:
            r["fid_rel_change"] = abs(r["fid"] - base["fid"]) / max(abs(base["fid"]), 1e-12)
            r["clip_abs_change"] = abs(r["clip"] - base["clip"])
    return rows


def build_inception(device: torch.device) -> nn.Module:
    """torchvision's Inception-v3 (clean-fid's architecture), random weights, pool3 features (2048)."""
    from torchvision.models import inception_v3

    with torch.device(device):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    net.fc = nn.Identity()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm statistics from one batch, so random weights give O(1) features (default init: ~1e-8)."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
    net.train()
    net(x)
    net.eval()


def build_clip(small: bool, device: torch.device) -> nn.Module:
    """open_clip ViT-g-14 from the config open_clip ships (or its small-width twin), random weights."""
    import open_clip

    cfg = CLIP_SMALL if small else open_clip.get_model_config(CLIP_MODEL)
    with torch.device(device):
        model = open_clip.CLIP(**cfg)
    return model.eval().requires_grad_(False)


def stage_eval_features(b: Bench) -> dict[str, Any]:
    """Feature extraction of one batch per network and precision; inputs already at the network's size."""
    from .precision import compute

    cfg, device = b.cfg, b.device
    n = cfg.eval.batch
    gen = torch.Generator().manual_seed(cfg.seed)
    from .eval.protocols import default_protocol

    if default_protocol(cfg.preset).fid_extractor == "tiny-evaluator":  # the world's protocol's networks
        from .eval.tiny_evaluator import load_tiny_evaluator
        from .worlds.shapes import eval_captions

        ev = load_tiny_evaluator(device)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        captions = eval_captions(n)
        ms = [b.measure("fid features", lambda: ev.image_features(images), "image", n),
              b.measure("clip text", lambda: ev.text_embeddings(captions), "caption", n)]
        return b.stage(ms, None, network="tiny evaluator (FID features = its image tower)")
    small = cfg.scale == "small"
    nets = {"inception": build_inception(device), "clip": build_clip(small, device)}
    size = nets["clip"].visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    x_inc = (torch.rand((n, 3, 299, 299), generator=gen) * 255).to(device)
    x_clip = torch.randn((n, 3, size, size), generator=gen).to(device)
    tokens = torch.randint(0, 49408, (n, 77), generator=gen).to(device)
    precisions = [p for p in cfg.eval.precisions if device.type == "cuda" or p == "fp32"]
    calls: dict[str, Callable[[], Any]] = {
        "inception": lambda: nets["inception"]((x_inc - 128) / 128),  # InceptionV3W's input scaling
        "clip-image": lambda: nets["clip"].encode_image(x_clip),
        "clip-text": lambda: nets["clip"].encode_text(tokens),
    }
    ms = []
    try:
        for p in precisions:
            for net_name, fn in calls.items():
                def call(fn: Callable[[], Any] = fn, p: str = p) -> Any:
                    with torch.no_grad(), compute(p, device):
                        return fn()

                ms.append(b.measure(f"{net_name}/{p}", call, "image" if net_name != "clip-text" else "caption", n,
                                    network=net_name, precision=p))
    finally:
        nets.clear()
        free_memory(device)
    return b.stage(ms, None, clip_model=("small " if small else "") + CLIP_MODEL,
                   inputs="random tensors at 299 px (Inception) and 224 px (CLIP): resizing not timed")


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


# --- provenance ------------------------------------------------------------------------------------------------
def peak_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak TFLOP/s of this device and where the number comes from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: no peak; ratios are null, achieved TFLOP/s only"
    name = torch.cuda.get_device_name(device)
    for key, tflops, source in PEAK_TFLOPS:
        if key in name:
            return tflops, source
    return None, f"{name} is not in the peak table: pass --peak-tflops"


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, slug and memory of the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = {"memory_gib": round(props.total_memory / GIB, 2), "capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count}
    else:
        import os

        name = f"CPU {platform.processor() or platform.machine()}"
        extra = {"cores": os.cpu_count(), "threads": torch.get_num_threads()}
    slug = "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return {"type": device.type, "name": name, "slug": slug, **extra}


def versions() -> dict[str, str | None]:
    """Versions of Python and the libraries whose speed is measured."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda,
                                  "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None}
    for pkg in ("diffusers", "peft", "open_clip_torch", "torchvision", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> dict[str, Any]:
    """This checkout's commit and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def result_path(cfg: BenchConfig, slug: str) -> Path:
    """results/bench/<preset>[-small]-<device>.json."""
    return Path(cfg.out) / f"{cfg.name}-{slug}.json"


# --- the command ---------------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, argv: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
              ) -> dict[str, Any]:
    """`rapm-bench bench`: run the stages, write the result JSON atomically, return it."""
    validate(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_stages(cfg, argv, progress)
    finally:
        torch.set_num_threads(threads)


def _run_stages(cfg: BenchConfig, argv: Sequence[str] | None, progress: Callable[[str], None] | None,
                ) -> dict[str, Any]:
    """The body of `run_bench`, with the thread count set."""
    from .files import atomic_write_bytes

    device = pick_device(cfg.device)
    peak, peak_source = peak_for(device, cfg.peak_tflops)
    info = device_info(device)
    b = Bench(cfg, device, peak)
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}
    for name in [s for s in STAGES if s in cfg.stages]:
        if progress:
            progress(f"{name} ...")
        t_stage = time.perf_counter()
        stages[name] = STAGE_FUNCS[name](b) | {"stage_seconds": round(time.perf_counter() - t_stage, 2)}
        if progress:
            progress("\n".join(stage_lines(name, stages[name])))
    est = estimates(cfg, stages)
    applies = get_world_spec(cfg.preset).bench_goals and cfg.scale == "full" and device.type == "cuda"
    from .eval.protocols import default_protocol

    values = goal_values(stages, est, default_protocol(cfg.preset).feature_precision)
    result = {
        "schema": 1, "preset": cfg.name, "device": info | {"peak_tflops": peak, "peak_source": peak_source},
        "world": b.world.describe() if b._world is not None else None,
        "stages": stages, "estimates": est, "goals": [g.check(values[g.name], applies) for g in GOALS],
        "versions": versions(), "git": git_commit(),
        "command": shlex.join(argv) if argv is not None else shlex.join(sys.argv),
        "seconds_total": round(time.perf_counter() - t0, 2), "config": asdict(cfg),
    }
    path = result_path(cfg, info["slug"])
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
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
