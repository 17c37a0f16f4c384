"""`rapm-bench bench`'s configuration: the stages' dataclasses, the presets, resolving and validating options,
the RAPM variants' spelling."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..errors import UserError
from ..precision import COMPUTE_PRECISIONS
from ..worlds.registry import get_world_spec

STAGES: tuple[str, ...] = ("matmul", "unet-forward", "rapm-iteration", "trajectories", "generate", "eval-features",
                           "vae-precision", "feature-precision")
SCALES: tuple[str, ...] = ("full", "small")
LORA_IMPLS: tuple[str, ...] = ("plain", "fast", "merged", "peft")  # RAPM variants' LoRA (RapmVariant.lora)
HEADLINE_LORAS: tuple[str, ...] = ("fast", "merged", "peft")  # --lora
EVAL_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


# --- configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Optimisations:
    """Speed-ups that leave results equal within a stated tolerance (tests/test_bench.py)."""

    merge_lora: bool = True  # no-grad passes use W + s·BA merged (generation: fused; RAPM: cached per step)
    cfg_batch: bool = True  # both CFG branches in one UNet call of batch 2B, not two calls of B
    channels_last: bool = False  # NHWC activations and conv weights; off: NCHW was 8 % faster on an H100 (bf16, bs 8)
    sdpa: bool = True  # torch scaled_dot_product_attention (flash / memory-efficient), not the classic processor
    compile: bool = False  # torch.compile the UNet for no-grad passes (unet-forward, trajectories, generate)
    compile_blocks: bool | None = None  # each UNet block compiled (rapm_bench.regions) for the no-grad stages; None:
    #                                     as the product (`trajectories` as the distill engine, `generate` as generation
    #                                     of the estimate's images: compiled on a GPU; unet-forward eager). RAPM variants
    #                                     say it with `/blocks`
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
    vae_variants: tuple[str, ...] = ("fp32", "tf32/eager", "tf32", "bf16", "tf32/channels_last",
                                     "bf16/channels_last")  # GPU; TF32/bf16 compiled unless "/eager"; TF32's
    #                   attention as matrix products unless "/sdpa", on fp16 tensor cores unless "/tf32attn"; its
    #                   convolutions in fp16 as the decoder's default (all), none with "/tf32conv", the normalised
    #                   ones with "/bounded" (perf.worlds.set_vae_variant)
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


_SDXL_RAPM = RapmStage(variants=("plain/graphs/gradgraphs/blocks", "merged/graphs/gradgraphs/blocks",  # the engine
                                 "plain/graphs/gradgraphs", "merged/graphs/gradgraphs",  # blocks eager
                                 "plain/ckpt/graphs", "merged/ckpt/graphs",  # 24-48 GB cards
                                 "plain/ckpt", "merged/ckpt"))  # the engine before issue 14 (more: --rapm-variants)
BENCH_PRESETS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(traj=TrajectoryStage(batch=4), gen=GenerateStage(batch=4), eval=EvalStage(batch=64),
                        rapm=RapmStage(iterations=200, trajectories=256)),
    "sdxl": BenchConfig(preset="sdxl", rapm=_SDXL_RAPM, forward=ForwardStage(batches=(1, 2, 8)),
                        gen=GenerateStage(vae_variants=("fp32", "tf32/eager/sdpa", "tf32/sdpa/tf32conv", "tf32/tf32conv",
                                                        "tf32/bounded", "tf32/tf32attn", "tf32", "bf16"),
                                          big_batches=(16,))),
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

    Flat keys `merge_lora`, `cfg_batch`, `channels_last`, `sdpa`, `compile`, `compile_blocks`, `lora` go to
    `opts`; `rapm_variants`, `traj_batch`, `gen_batch`, `vae_variants`, `eval_batch` to their stages.
    """
    world = get_world_spec(preset)
    if scale not in SCALES:
        raise UserError(f"unknown --scale {scale!r}; use one of {', '.join(SCALES)}")
    cfg = world.bench_config(scale)
    given = {k: v for k, v in overrides.items() if v is not None}
    opts = replace(cfg.opts, **{k: given.pop(k) for k in list(given) if k in Optimisations.__dataclass_fields__})
    stage_keys = {"rapm_variants": ("rapm", "variants"), "traj_batch": ("traj", "batch"),
                  "gen_batch": ("gen", "batch"), "eval_batch": ("eval", "batch"),
                  "vae_variants": ("gen", "vae_variants")}
    for key, (stage, name) in stage_keys.items():
        if key in given:
            value = _csv(given.pop(key)) if name.endswith("variants") else given.pop(key)
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
    for v in cfg.gen.vae_variants:
        parse_vae_variant(v)
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
    grad_graphs: bool = False  # the engine's `fast_grad`: gradient passes from CUDA graphs (merged or plain, no ckpt)
    blocks: bool = False  # each UNet block compiled, LoRA layers eager (rapm_bench.regions)

    @property
    def name(self) -> str:
        """The variant's spelling, e.g. `fast/ckpt/chunk4`."""
        return (self.lora + ("/ckpt" if self.ckpt else "") + ("" if self.merged or self.lora != "fast" else "/unmerged")
                + ("" if self.chunk is None else f"/chunk{self.chunk}") + ("/graphs" if self.graphs else "")
                + ("/gradgraphs" if self.grad_graphs else "") + ("/blocks" if self.blocks else ""))


VARIANT_FLAGS = ("ckpt", "unmerged", "merged", "graphs", "gradgraphs", "blocks")


VAE_FLAGS = ("channels_last", "eager", "sdpa", "tf32attn", "tf32conv", "bounded", "halfall")


def parse_vae_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """`<precision>[/channels_last][/eager][/sdpa|/tf32attn][/tf32conv|/bounded|/halfall]` -> (precision, flags)
    (perf.worlds.set_vae_variant applies it)."""
    precision, *flags = text.split("/")
    if (precision not in COMPUTE_PRECISIONS or any(f not in VAE_FLAGS for f in flags) or len(set(flags)) < len(flags)
            or {"sdpa", "tf32attn"} <= set(flags) or len({"tf32conv", "bounded", "halfall"} & set(flags)) > 1):
        raise UserError(f"bad VAE variant {text!r}: use <precision>[/channels_last][/eager][/sdpa|/tf32attn]"
                        f"[/tf32conv|/bounded|/halfall] with precision one of {', '.join(COMPUTE_PRECISIONS)}")
    return precision, tuple(flags)


def parse_variant(text: str, merge_default: bool = True) -> RapmVariant:
    """`<lora>[/ckpt][/unmerged][/chunkK][/graphs][/gradgraphs][/blocks]` -> RapmVariant (`merged` runs every pass
    merged)."""
    lora, *flags = text.split("/")
    chunks = [int(f[5:]) for f in flags if re.fullmatch(r"chunk[1-9]\d*", f)]
    if lora not in LORA_IMPLS or any(f not in VARIANT_FLAGS
                                     and not re.fullmatch(r"chunk[1-9]\d*", f) for f in flags) or len(chunks) > 1:
        raise UserError(f"bad RAPM variant {text!r}: use <lora>[/ckpt][/unmerged][/chunkK][/graphs][/gradgraphs]"
                        f"[/blocks] "
                        f"with lora one of {', '.join(LORA_IMPLS)}")
    if "gradgraphs" in flags and (lora not in ("merged", "plain") or "ckpt" in flags):
        raise UserError(f"bad RAPM variant {text!r}: gradgraphs needs lora merged or plain, without ckpt (the "
                        "engine's --fast-grad)")
    if "blocks" in flags and (lora == "peft" or "ckpt" in flags):
        raise UserError(f"bad RAPM variant {text!r}: blocks needs lora plain, fast or merged, without ckpt (the "
                        "engine's --compile-blocks)")
    if lora == "merged" and "unmerged" in flags:
        raise UserError(f"bad RAPM variant {text!r}: `merged` runs every pass through merged weights; "
                        "for no-grad passes through the low-rank branch use fast/unmerged")
    merged = lora == "merged" or ("unmerged" not in flags and ("merged" in flags or merge_default))
    return RapmVariant(lora, "ckpt" in flags, merged, chunks[0] if chunks else None, "graphs" in flags,
                       "gradgraphs" in flags, "blocks" in flags)
