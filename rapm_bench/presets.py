"""The shipped worlds (`--preset tiny`, `--preset sdxl`): their WorldSpecs, installed as the entry points
`tiny = "rapm_bench.presets:TINY"` and `sdxl = "rapm_bench.presets:SDXL"` of the group `rapm_bench.worlds`
(pyproject.toml; rapm_bench/worlds/registry.py loads a world's spec the first time it is asked for).

Their hooks import what they need when called: the adapters (rapm_bench/worlds/), the bench presets
(rapm_bench/bench.py) and reproduce's plans. Nothing in the package imports this module: the registry
finds it through its entry points, as it would another package's world.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import UserError
from .worlds.registry import Costs, WorldConfig, WorldSpec

if TYPE_CHECKING:
    from .bench import BenchConfig
    from .reproduce import Plan
    from .worlds.base import World


def _load_tiny(cfg: WorldConfig) -> World:
    from pathlib import Path

    from .worlds.base import pick_device, pick_dtype
    from .worlds.tiny import load_tiny_world

    device = pick_device(cfg.device)
    pick_dtype(cfg.precision, device)  # an unknown --precision is an error here too (the tiny world is fp32)
    return load_tiny_world(device=device, assets=Path(cfg.teacher) if cfg.teacher else None)


def _load_sdxl(cfg: WorldConfig) -> World:
    from .worlds.sdxl import SDXLWorld

    return SDXLWorld(cfg.teacher or SDXL.teacher, device=cfg.device, precision=cfg.precision,
                     resolution=cfg.resolution, vae=cfg.vae)


def _shapes_train(num: int, offset: int) -> list[str]:
    """The shapes world's train-split captions [offset, offset + num)."""
    from .worlds.shapes import captions, split_indices

    return captions(split_indices("train", num, offset))


def _shapes_eval(n: int) -> list[str]:
    """The first n captions of the shapes world's eval split."""
    from .worlds.shapes import eval_captions

    return eval_captions(n)


def _bench_preset(key: str) -> Callable[[str], BenchConfig]:
    """The shipped worlds' bench configs: bench.BENCH_PRESETS, `key` at full scale, `key-<scale>` otherwise."""
    def preset(scale: str) -> BenchConfig:
        from .bench import BENCH_PRESETS

        return BENCH_PRESETS[key if scale == "full" else f"{key}-{scale}"]

    return preset


def _tiny_plan(quick: bool, seeds: int, steps: tuple[int, ...] | None, sweep: bool) -> Plan:
    from .reproduce import tiny_plan

    return tiny_plan(quick, seeds, steps, sweep)


def _sdxl_plan(quick: bool, seeds: int, steps: tuple[int, ...] | None, sweep: bool) -> Plan:
    from .reproduce import sdxl_plan

    return sdxl_plan(quick, seeds, steps, sweep)


def _tiny_resolution(resolution: int) -> None:
    if resolution != 32:
        raise UserError(f"the tiny world is 32 px; --resolution {resolution} is not possible")


def _sdxl_resolution(resolution: int) -> None:
    if resolution < 64 or resolution % 64:
        raise UserError(f"--resolution must be a positive multiple of 64 for sdxl, got {resolution}")


TINY = WorldSpec(
    name="tiny",
    description="the embedded shapes world: 3×32×32 pixel space, weights in the package, a CPU, offline",
    load=_load_tiny,
    teacher=None,
    batch_size=64,
    num_images=16,
    default_protocol="tiny",
    training_prompts=_shapes_train,  # the shapes *train* split (the evaluator trains from 5M; eval is apart)
    sample_prompts=_shapes_eval,  # grammar captions of the eval split
    prompts_help="one caption a line",
    distill={},  # DistillConfig's defaults are tiny's (the ablation in results/tiny/rapm.md)
    distill_world={},
    bench_preset=_bench_preset("tiny"),
    bench_rapm_warmup=1,
    check_resolution=_tiny_resolution,
    plan=_tiny_plan,
    # measured by `rapm-bench reproduce` on an idle 2-core CPU (results/tiny/README.md): 256 trajectories ×
    # 16 sub-steps × 2 (CFG) in 75 s; 200 iterations RAPM 79 s, PCM 39 s, DMD2 80 s; 512 images at 4 / 32
    # image-forwards in 18.4 / 133 s.
    costs=Costs(trajectory_forward=75 / (256 * 16 * 2), iteration={"rapm": 0.40, "pcm": 0.20, "dmd2": 0.40},
                image_forward=0.0080, image_overhead=0.0040, trajectory_mb=9 * 3 * 32 * 32 * 4 / 1e6, lora_mb=0.25,
                device="a 2-core CPU"),
)

SDXL = WorldSpec(
    name="sdxl",
    description="Stable Diffusion XL base 1.0 (the paper's setting): a GPU, weights from the hub or a folder",
    load=_load_sdxl,
    teacher="stabilityai/stable-diffusion-xl-base-1.0",
    batch_size=4,  # 24-48 GB cards: batch 4 peaks at 16.1 GiB in generation (TF32 decode)
    # 80 GB cards: batch 16 peaks at 50.7 GiB and runs 0.111 s an image against 0.123 at batch 4 (the decode: 51 ms an
    # image against 62; one H100, results/bench/sdxl-generate-2026-12-06e-nvidia-h100-80gb-hbm3.json, probes/
    # probe_groupnorm-h100.json); eval adds Inception and ViT-g-14 beside it (its 768-image run at batch 16 fitted)
    large_batch=(16, 70.0),
    num_images=0,
    default_protocol="coco30k",
    training_prompts=None,  # COCO-2014 *train* captions (disjoint from the val-based protocols)
    sample_prompts=None,  # generate: a prompt file; distill's sample grids: the first training prompts
    prompts_help="COCO-2014 train captions (captions_train2014.json) or a text file, one caption a line",
    distill={
        "out": "runs/distill/sdxl",
        "num_trajectories": 1000,  # the paper's overhead: 1000 teacher trajectories
        "guidance": None,  # the world's default CFG (SDXL 5.0)
        "prompts": None,  # required: COCO-2014 *train* captions (disjoint from the val-based protocols)
        "trajectory_batch": 8,
        "store_dtype": "fp16",
        "grad_checkpointing": None,  # auto from the free memory (distill/memory.py): off on an H100/H200, on for 24-48 GB
        "slot_chunk": 4,  # the 4 slots in one batch-4 pass: 3× faster than 1 slot per pass, 22.9 GiB with checkpointing
        "lora_impl": "merged",  # H200, every graph, compiled blocks: the engine 0.470 s an iteration, the bench 0.458 s
        #                         (results/bench/{engine-,}sdxl-nvidia-h200.json); earlier, checkpointed: "fast"
        #                         0.87 s, peft 2.47 s
        "disc_hidden": 256,
        "iters": 20_000,  # the paper's 20K iterations
        "lr": 1e-4,  # 1e-3 suits the 4M-param tiny UNet; SDXL LoRAs train at ~1e-4
        "disc_lr": 1e-4,
        "warmup": 200,
        "checkpoint_every": 500,
        "log_every": 50,
        "sample_every": 1000,
        "sample_count": 4,
        "save_dtype": "fp16",  # ~6 MB rank-1 file, like the published one
    },
    distill_world={"precision": "bf16"},  # frozen weights bf16, LoRA fp32 (docs/design.md §8)
    bench_preset=_bench_preset("sdxl"),
    bench_scales=("full", "small"),  # small: the same architecture with tiny widths (CPU tests)
    bench_weights="random",
    bench_rapm_warmup=0,  # an iteration takes seconds: the FLOP-counting call warms up
    bench_goals=True,
    check_resolution=_sdxl_resolution,
    generate_memory_hint="; on SDXL also --precision fp16 or a smaller --resolution",
    eval_memory_hint="; on SDXL also --precision fp16",  # the protocol fixes the resolution
    plan=_sdxl_plan,
    trained_results="trained",
    # one H100 (results/bench/README.md, issue 14's fourth and fifth sessions): 1000 trajectories in 475 s (32
    # image-forwards each, blocks compiled); the engine's RAPM iteration 0.473 s (merged, 4 slots a pass, graphs,
    # blocks; PCM/DMD2 on PEFT layers: guesses); generation 0.111 s an image at batch 16 = 4 UNet passes of 15 ms
    # (as in the trajectories) + the TF32 decode's 51 ms (probes/probe_groupnorm-h100.json); eval's own work beyond
    # generation ~8 ms an image (Inception and ViT-g-14 in TF32).
    costs=Costs(trajectory_forward=0.0148, iteration={"rapm": 0.473, "pcm": 2.0, "dmd2": 4.0},
                image_forward=0.0150, image_overhead=0.059, trajectory_mb=9 * 4 * 128 * 128 * 2 / 1e6, lora_mb=6.0,
                device="one H100"),
)
