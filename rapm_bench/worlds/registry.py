"""The world registry: one `WorldSpec` per world (`--preset`), and the only place that knows which worlds exist.

A world is its adapter (a `World`, base.py) and what every command needs to know about it before or beside
loading it: its default teacher and batch size, its default protocol, its distill and bench presets, where
its prompts come from (training, sample grids, evaluation), its memory advice, and the costs `reproduce`
estimates its plan with. Commands look a world up by name (`get_world_spec`) and ask its spec; none of them
branches on a world's name. An unknown name is a one-line UserError listing the known ones.

Worlds are plug-ins, as models and objectives are (rapm_bench.plugins): an entry point of the group
`rapm_bench.worlds` names a WorldSpec, loaded the first time its world is asked for. The shipped two, `tiny` and
`sdxl`, are rapm_bench/presets.py's. A test or a script adds one at run time with `register_world(WorldSpec(...))`
(it runs before the command does: a test, a script calling `rapm_bench.cli:app`); every command then accepts it
as `--preset` (tests/test_plugins_e2e.py).

This module imports no adapter and no other stage: a spec's `load` and other hooks import theirs (and diffusers)
when called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..plugins import WORLDS_GROUP, plugin_entry_points

if TYPE_CHECKING:
    from .base import World

DEFAULT_WORLD = "tiny"
"""The world a command runs in without --preset."""


@dataclass(frozen=True)
class WorldConfig:
    """Which world to load and how."""

    preset: str = "tiny"  # "tiny" (embedded shapes world, CPU) or "sdxl" (the paper)
    teacher: str | None = None  # hub id or local diffusers folder; None = the preset's teacher
    device: str = "auto"  # "auto" = CUDA when present, else CPU
    precision: str = "auto"  # "auto" = fp16 on a GPU, fp32 on a CPU (VAE always fp32)
    resolution: int | None = None  # image side in pixels; None = the teacher's native size
    vae: str | None = None  # optional fp16-fixed VAE folder (SDXL only)


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
    bench_preset: Callable[[str], Any] | None  # --scale -> the bench config (perf.config.BenchConfig); None: no bench
    bench_scales: tuple[str, ...] = ("full",)  # the --scale values `rapm-bench bench` accepts for this world
    bench_weights: str = "shipped"  # bench times "shipped" weights (`load`) or "random" ones of the SDXL
    #                                 architecture (bench.RandomSDXLWorld: no download)
    bench_rapm_warmup: int = 1  # at most this many untimed RAPM iterations after the FLOP-counting one
    bench_goals: bool = False  # issue 14's speed goals apply (at full scale, on a GPU)
    check_resolution: Callable[[int], None] = lambda resolution: None  # rejects a --resolution (UserError)

    # --- advice and estimates ------------------------------------------------------------------------------
    generate_memory_hint: str = ""  # appended to the out-of-memory advice of `generate` (after --batch-size)
    eval_memory_hint: str = ""  # likewise for `eval`
    plan: Callable[[bool, int, tuple[int, ...] | None, bool], Any] | None = None  # reproduce.Plan:
    #                                                                  (quick, seeds, steps, sweep) -> Plan
    costs: Costs | None = None  # reproduce's estimates
    trained_results: str = ""  # reproduce: results of the students trained here go to <out>/<this> ("": beside
    #                            the rest; sdxl "trained": beside the published LoRAs' rows of the same names)
    large_batch: tuple[int, float] | None = None  # (batch, GiB): the generation batch without --batch-size on a
    #                                               CUDA GPU of at least GiB memory (`default_batch`); else batch_size

    def bench_config(self, scale: str) -> Any:
        """`rapm-bench bench`'s config of this world at `scale`, or a one-line error."""
        if self.bench_preset is None:
            raise UserError(f"preset {self.name!r} has no bench preset")
        if scale not in self.bench_scales:
            others = " or ".join(n for n in world_names() if scale in get_world_spec(n).bench_scales) or "none"
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


_WORLDS: dict[str, WorldSpec] = {}  # registered at run time


def register_world(spec: WorldSpec) -> WorldSpec:
    """Add a world at run time (it replaces a world of the same name); returns it."""
    _WORLDS[spec.name] = spec
    return spec


def unregister_world(name: str) -> None:
    """Remove a world registered at run time (tests; an installed world, such as the shipped two, stays)."""
    if name not in _WORLDS and name in _installed_names():
        raise ValueError(f"world {name!r} is installed (entry point of {WORLDS_GROUP}), not registered at run time")
    _WORLDS.pop(name, None)


def _installed_names() -> tuple[str, ...]:
    """The installed worlds' names (entry points: nothing is loaded), the default world first."""
    names = [ep.name for ep in plugin_entry_points(WORLDS_GROUP)]
    return tuple(sorted(dict.fromkeys(names), key=lambda n: n != DEFAULT_WORLD))


@functools.cache
def _installed(name: str) -> WorldSpec:
    """The installed world `name`, loaded from its entry point (once)."""
    ep = next(ep for ep in plugin_entry_points(WORLDS_GROUP) if ep.name == name)
    spec = ep.load()
    if not isinstance(spec, WorldSpec) or spec.name != name:
        raise TypeError(f"entry point {ep.name} = {ep.value} ({ep.group}) is not the WorldSpec of a world named "
                        f"{name!r}")
    return spec


def world_names() -> tuple[str, ...]:
    """The known worlds: the installed ones (the default first), then those registered at run time."""
    return tuple(dict.fromkeys((*_installed_names(), *_WORLDS)))


def get_world_spec(name: str) -> WorldSpec:
    """The spec of world `name` (registered at run time first, then installed), or a one-line error listing the
    known worlds."""
    if name in _WORLDS:
        return _WORLDS[name]
    if name not in _installed_names():
        raise UserError(f"unknown preset {name!r}; known worlds: {', '.join(world_names())}")
    return _installed(name)
