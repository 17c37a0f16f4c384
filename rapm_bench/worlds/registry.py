"""The world registry: one `WorldSpec` per world (`--preset`), and the only place that knows which worlds exist.

A world is its adapter (a `World`, base.py) and what every command needs to know about it before or beside
loading it: its default teacher and batch size, its default protocol, its distill and bench presets, where
its prompts come from (training, sample grids, evaluation), its memory advice, and the costs `reproduce`
estimates its plan with. Commands look a world up by name (`get_world_spec`) and ask its spec; none of them
branches on a world's name. An unknown name is a one-line UserError listing the known ones.

This module imports no adapter: `load` and the other hooks import theirs (and diffusers) when called.
A new world is one `register_world(WorldSpec(...))` (docs/design.md, "A world"), here or from any code that
runs before the command does (a test, a script calling `rapm_bench.cli:app`): every command then accepts it as
`--preset` (tests/test_plugins_e2e.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..bench import BenchConfig
    from ..config import WorldConfig
    from ..reproduce import Plan
    from .base import World

DEFAULT_WORLD = "tiny"
"""The world a command runs in without --preset."""


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work, measured (tiny: a 2-core CPU, results/tiny/rapm.md) or derived (SDXL:
    one H100/H200 from docs/reference.md's measured timings, eager bf16): `reproduce`'s estimates."""

    trajectory_forward: float  # one teacher image-forward inside the batched trajectory precompute
    iteration: dict[str, float]  # one training iteration per objective
    image_forward: float  # one image-forward while generating for an evaluation (batched)
    image_overhead: float  # per image: decode, features, CLIP
    trajectory_mb: float  # disk per trajectory
    lora_mb: float
    device: str = "a 2-core CPU"  # what the estimates are for ("~2 h on one H100")


@dataclass(frozen=True)
class WorldSpec:
    """Everything the package knows about one world, by name."""

    name: str  # the --preset value
    description: str  # one line
    load: Callable[[WorldConfig], World]  # the world a config names (imports its adapter when called)

    # --- defaults of generate and eval --------------------------------------------------------------
    teacher: str | None  # default --teacher (hub id or folder); None = weights shipped in the package
    batch_size: int  # images per generation batch
    num_images: int  # images `generate` makes without a prompt file (from `sample_prompts`; 0: none)
    default_protocol: str  # the protocol `eval` and `reproduce` use without --protocol (eval/protocols.py)

    # --- prompt sources (evaluation captions come from the protocol) -------------------------------------
    training_prompts: Callable[[int, int], list[str]] | None  # (K, offset) -> distillation captions; None:
    #                                                           the world has none of its own (--prompts FILE)
    sample_prompts: Callable[[int], list[str]] | None  # n captions for `generate` and distill's sample grids
    #                                                    without a prompt file; None: --prompts FILE
    prompts_help: str  # what --prompts FILE should hold, for the error when it is missing

    # --- presets ---------------------------------------------------------------------------------------
    distill: Mapping[str, Any]  # DistillConfig fields that differ from its defaults (the defaults are tiny's)
    distill_world: Mapping[str, Any]  # WorldConfig fields of the distill preset beside `preset`
    bench_preset: Callable[[str], BenchConfig] | None  # --scale -> the bench config; None: no bench
    bench_scales: tuple[str, ...] = ("full",)  # the --scale values `rapm-bench bench` accepts for this world
    bench_weights: str = "shipped"  # bench times "shipped" weights (`load`) or "random" ones of the SDXL
    #                                 architecture (bench.RandomSDXLWorld: no download)
    bench_rapm_warmup: int = 1  # at most this many untimed RAPM iterations after the FLOP-counting one
    bench_goals: bool = False  # issue 14's speed goals apply (at full scale, on a GPU)
    check_resolution: Callable[[int], None] = lambda resolution: None  # rejects a --resolution (UserError)

    # --- advice and estimates ------------------------------------------------------------------------------
    generate_memory_hint: str = ""  # appended to the out-of-memory advice of `generate` (after --batch-size)
    eval_memory_hint: str = ""  # likewise for `eval`
    plan: Callable[[bool, int, tuple[int, ...] | None, bool], Plan] | None = None  # reproduce's plan:
    #                                                                  (quick, seeds, steps, sweep) -> Plan
    costs: Costs | None = None  # reproduce's estimates
    trained_results: str = ""  # reproduce: results of the students trained here go to <out>/<this> ("": beside
    #                            the rest; sdxl "trained": beside the published LoRAs' rows of the same names)
    large_batch: tuple[int, float] | None = None  # (batch, GiB): the generation batch without --batch-size on a
    #                                               CUDA GPU of at least GiB memory (`default_batch`); else batch_size

    def bench_config(self, scale: str) -> BenchConfig:
        """`rapm-bench bench`'s config of this world at `scale`, or a one-line error."""
        if self.bench_preset is None:
            raise UserError(f"preset {self.name!r} has no bench preset")
        if scale not in self.bench_scales:
            others = " or ".join(n for n, w in _WORLDS.items() if scale in w.bench_scales) or "none"
            raise UserError(f"--scale {scale} is for --preset {others} (the {self.name} world benches at --scale "
                            f"{' or '.join(self.bench_scales)} only)")
        return self.bench_preset(scale)

    def default_batch(self, device: str | None) -> int:
        """The generation batch without --batch-size: `large_batch`'s on a CUDA GPU with at least its memory in
        all (the card's size, not what is free now: a resumed run batches as the first did), else `batch_size`."""
        if self.large_batch is None:
            return self.batch_size
        import torch

        from .base import pick_device

        dev = pick_device(device)
        if dev.type != "cuda":
            return self.batch_size
        batch, gib = self.large_batch
        return batch if torch.cuda.get_device_properties(dev).total_memory >= gib * 2**30 else self.batch_size

    def preset_flag(self) -> str:
        """The `--preset` option naming this world in a printed command ("" for the default world)."""
        return "" if self.name == DEFAULT_WORLD else f" --preset {self.name}"


_WORLDS: dict[str, WorldSpec] = {}


def register_world(spec: WorldSpec) -> WorldSpec:
    """Add a world (it replaces a world of the same name); returns it."""
    _WORLDS[spec.name] = spec
    return spec


def unregister_world(name: str) -> None:
    """Remove a world registered at run time (tests; a shipped world cannot be removed)."""
    if name in (DEFAULT_WORLD, "sdxl"):
        raise ValueError(f"world {name!r} is shipped with the package")
    _WORLDS.pop(name, None)


def world_names() -> tuple[str, ...]:
    """The known worlds, in registration order."""
    return tuple(_WORLDS)


def get_world_spec(name: str) -> WorldSpec:
    """The spec of world `name`, or a one-line error listing the known worlds."""
    if name not in _WORLDS:
        raise UserError(f"unknown preset {name!r}; known worlds: {', '.join(_WORLDS)}")
    return _WORLDS[name]


# --- the shipped worlds ---------------------------------------------------------------------------------
def _load_tiny(cfg: WorldConfig) -> World:
    from pathlib import Path

    from .base import pick_device, pick_dtype
    from .tiny import load_tiny_world

    device = pick_device(cfg.device)
    pick_dtype(cfg.precision, device)  # an unknown --precision is an error here too (the tiny world is fp32)
    return load_tiny_world(device=device, assets=Path(cfg.teacher) if cfg.teacher else None)


def _load_sdxl(cfg: WorldConfig) -> World:
    from .sdxl import SDXLWorld

    return SDXLWorld(cfg.teacher or SDXL.teacher, device=cfg.device, precision=cfg.precision,
                     resolution=cfg.resolution, vae=cfg.vae)


def _shapes_train(num: int, offset: int) -> list[str]:
    """The shapes world's train-split captions [offset, offset + num)."""
    from .shapes import captions, split_indices

    return captions(split_indices("train", num, offset))


def _shapes_eval(n: int) -> list[str]:
    """The first n captions of the shapes world's eval split."""
    from .shapes import eval_captions

    return eval_captions(n)


def _bench_preset(key: str) -> Callable[[str], BenchConfig]:
    """The shipped worlds' bench configs: bench.BENCH_PRESETS, `key` at full scale, `key-<scale>` otherwise."""
    def preset(scale: str) -> BenchConfig:
        from ..bench import BENCH_PRESETS

        return BENCH_PRESETS[key if scale == "full" else f"{key}-{scale}"]

    return preset


def _tiny_plan(quick: bool, seeds: int, steps: tuple[int, ...] | None, sweep: bool) -> Plan:
    from ..reproduce import tiny_plan

    return tiny_plan(quick, seeds, steps, sweep)


def _sdxl_plan(quick: bool, seeds: int, steps: tuple[int, ...] | None, sweep: bool) -> Plan:
    from ..reproduce import sdxl_plan

    return sdxl_plan(quick, seeds, steps, sweep)


def _tiny_resolution(resolution: int) -> None:
    if resolution != 32:
        raise UserError(f"the tiny world is 32 px; --resolution {resolution} is not possible")


def _sdxl_resolution(resolution: int) -> None:
    if resolution < 64 or resolution % 64:
        raise UserError(f"--resolution must be a positive multiple of 64 for sdxl, got {resolution}")


TINY = register_world(WorldSpec(
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
))

SDXL = register_world(WorldSpec(
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
))
