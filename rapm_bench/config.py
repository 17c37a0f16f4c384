"""Frozen configs with named presets: defaults live here, each with a comment.

CLI options default to None, meaning "take it from the preset or the model spec"; the
resolved config is written to the run folder before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import UserError
from .worlds.registry import WorldConfig, WorldSpec, get_world_spec


def check_at_least(option: str, value: int | None, least: int, why: str = "") -> None:
    """A count option's range check (None = unset, taken from the preset): a one-line UserError below `least`. The
    configs run it when built, so the CLI rejects a count before torch is imported."""
    if value is not None and value < least:
        raise UserError(f"{option} must be at least {least}{why}, got {value}")


def get_preset(name: str) -> WorldSpec:
    """The world a `--preset` names (its WorldSpec: teacher, batch size, ...), or a one-line error listing the
    known ones (rapm_bench/worlds/registry.py)."""
    return get_world_spec(name)


@dataclass(frozen=True)
class GenerateConfig:
    """`rapm-bench generate`: images for captions from one model."""

    world: WorldConfig
    out: str  # output folder: {index:06d}.png, config.json, manifest.json
    model: str = "teacher"  # a name from the baselines registry
    steps: int | None = None  # None = the model's default step count
    guidance: float | None = None  # None = the model's guidance (the teacher: the world's)
    lora: str | None = None  # a LoRA file or folder in any format diffusers reads; overrides the model's
    fuse: bool = False  # merge the LoRA into the UNet before sampling (same images, faster)
    prompts: str | None = None  # UTF-8 text file, one caption a line; None = grammar captions (tiny)
    num_images: int | None = None  # None = one per prompt (or the preset's count for grammar captions)
    seed: int = 0  # image i uses seed + i
    batch_size: int | None = None  # None = the preset's (WorldSpec.default_batch: a large GPU may take more)
    grid: str | None = None  # optional contact-sheet PNG path
    compile_blocks: bool | None = None  # the UNet's blocks compiled (regions.pays): None = on a CUDA GPU from the
    #                                     world's `compile_blocks_from` images × steps (SDXL: 16,384; tiny: never)

    def __post_init__(self) -> None:
        check_at_least("--batch-size", self.batch_size, 1)  # 0 is an error, not the preset's
        check_at_least("--num-images", self.num_images, 1)

    def to_json(self) -> str:
        """Stable JSON of the resolved config (`compile_blocks` only where set, so older folders still resume)."""
        d = asdict(self)
        if d["compile_blocks"] is None:
            del d["compile_blocks"]
        return json.dumps(d, indent=2, sort_keys=True)


def resolve_generate(cfg: GenerateConfig) -> GenerateConfig:
    """Fill every None from the preset and the model spec; validate ranges."""
    from .models import get_model

    preset = get_preset(cfg.world.preset)
    spec = get_model(cfg.model, cfg.lora)  # a LoRA trained here brings its steps and sampler
    steps, guidance = spec.resolve(cfg.steps, cfg.guidance)
    batch = preset.default_batch(cfg.world.device) if cfg.batch_size is None else cfg.batch_size
    world = replace(cfg.world, teacher=cfg.world.teacher or preset.teacher)
    return replace(cfg, world=world, steps=steps, guidance=guidance, batch_size=batch)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict."""
    return asdict(cfg)


@dataclass(frozen=True)
class EvalConfig:
    """`rapm-bench eval`: one model at one step count on one protocol."""

    world: WorldConfig
    model: str = "rapm"  # a registry name, `teacher`, or `lora:PATH`
    lora: str | None = None  # replaces the model's LoRA weights (its sampler, steps and name stay): a fresh run
    steps: int | None = None  # None = the model's default
    guidance: float | None = None  # None = the model's (the teacher: the world's)
    protocol: str | None = None  # None = the preset's default protocol
    num_images: int | None = None  # None = the protocol's number of pairs
    out: str | None = None  # folder for the result JSON; None = results/<preset>
    seed: int = 0  # image i is drawn with seed + i
    batch_size: int | None = None  # None = the preset's (WorldSpec.default_batch: a large GPU may take more)
    data_dir: str | None = None  # prepared protocol data (`rapm-bench data coco`); None = the cache
    inception: str | None = None  # local clean-fid Inception torchscript (coco protocols)
    clip_checkpoint: str | None = None  # local open_clip checkpoint (coco protocols)
    images_out: str | None = None  # also save the generated PNGs here (optional)
    fuse: bool = True  # merge the LoRA before sampling (same images, faster)
    compile_blocks: bool | None = None  # the UNet's blocks compiled (regions.pays): None = on a CUDA GPU from the
    #                                     world's `compile_blocks_from` images × steps of the whole run (every
    #                                     shard decides alike)
    overlap_scoring: bool = True  # score each group between the next group's UNet calls, its kernels on a side
    #                                CUDA stream (eval/overlap.py; same sums); off: after the next group (less memory)

    def __post_init__(self) -> None:
        check_at_least("--batch-size", self.batch_size, 1)  # 0 is an error, not the preset's
        check_at_least("--num-images", self.num_images, 2, " for a covariance")  # 0 is an error, not "all"
