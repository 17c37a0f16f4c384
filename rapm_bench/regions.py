"""Regional compilation of a diffusers UNet (issue 14): each ResNet and transformer block through inductor.

An eager SDXL UNet pass spends a large share of its GPU time outside the matrix products: GroupNorm's
statistics and its broadcast affine pass, SiLU, the time embedding's broadcast add, LayerNorm, GEGLU's
gate and the residual adds, each a separate memory-bound kernel (results/bench/profiles: ~80 ms of a
0.47 s iteration in non-vectorised elementwise kernels on an H100). Inductor fuses them. Compiling the
whole UNet took 7.5 minutes on an H200 (docs/reference.md: a PEFT train step, 574 -> 504 ms); compiling each
block instead (`compile_blocks`) compiles one graph per distinct block shape, batch size and grad mode
(SDXL's 87 blocks share two forward functions, so equal shapes share graphs): dynamo's regional compilation.
On an H100 the RAPM iteration went 0.529 -> 0.475 s (results/bench/README.md). Generation compiles wider regions
(`WIDE`: each Transformer2DModel whole, the transformer blocks inside it unrolled into one graph); the engine keeps
`BLOCKS`, whose graphs its gradient passes share with its teacher's trajectories.

LoRA layers stay eager: `fastlora.LoRAWrap.forward` is excluded from dynamo (its cache and its
hand-written backward are host logic), so a block with LoRA layers compiles into the pieces between them.
Every compiled piece keeps the autograd of its ops (AOTAutograd), so gradient passes compile too; CUDA
graphs (`cudagraphs`) capture and replay the compiled kernels like any others.

Images and gradients are not bit-identical to the eager path (fused reductions round differently):
`tests/test_fast_paths.py` checks the compiled blocks against eager on the CPU with dynamo's `aot_eager`
backend (the graph breaks and the autograd plumbing, exact) and, `gpu`, with inductor (within round-off).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

BLOCKS: tuple[str, ...] = ("ResnetBlock2D", "BasicTransformerBlock")  # diffusers' block classes, by name
# generation's regions (no-grad passes): each Transformer2DModel whole, so that its GroupNorm, the layout changes
# around proj_in and proj_out and its residual add, eager around the BasicTransformerBlocks, fuse with them. SDXL's
# batch-16 UNet pass: 240.1 -> 235.6 ms (H100, results/bench/probes/probe_regions.py)
WIDE: tuple[str, ...] = ("ResnetBlock2D", "Transformer2DModel")
REGIONS: tuple[str, ...] = tuple(dict.fromkeys(BLOCKS + WIDE))  # every class a region can be
# dynamo's limits (its defaults: 8 graphs a code object, 256 in all), new and old names: a graph per block shape,
# batch size, grad mode and graph-break piece
LIMITS: dict[tuple[str, str], int] = {("recompile_limit", "cache_size_limit"): 512,
                                      ("accumulated_recompile_limit", "accumulated_cache_size_limit"): 4096}


def _raise_limits() -> None:
    """Raise dynamo's graph limits to `LIMITS` (never lower them)."""
    cfg = torch._dynamo.config
    for names, limit in LIMITS.items():
        name = next((n for n in names if hasattr(cfg, n)), None)
        if name is not None and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def supported() -> bool:
    """Whether this torch compiles blocks as regions: dynamo inlines nn.Modules (on by default from torch 2.5), so
    that blocks of equal shapes share graphs; without it each of SDXL's 87 blocks would compile its own."""
    return bool(getattr(torch._dynamo.config, "inline_inbuilt_nn_modules", False))


def blocks(unet: nn.Module, classes: tuple[str, ...] = BLOCKS) -> list[nn.Module]:
    """The UNet's modules of `classes` (by class name; default its ResNet and transformer blocks), outermost only."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in unet.modules():  # parents come before their children
        if id(m) in inside or type(m).__name__ not in classes:
            continue
        found.append(m)
        inside.update(id(c) for c in m.modules())
    return found


def compile_blocks(unet: nn.Module, backend: str | Callable[..., Any] = "inductor", dynamic: bool | None = False,
                   classes: tuple[str, ...] = BLOCKS) -> int:
    """Compile each of `unet`'s blocks (`blocks(unet, classes)`) in place (static shapes unless `dynamic`); returns how
    many. `uncompile_blocks` undoes it."""
    _raise_limits()
    found = blocks(unet, classes)
    for m in found:
        m.compile(backend=backend, dynamic=dynamic)
    return len(found)


def uncompile_blocks(unet: nn.Module) -> None:
    """Run every block eagerly again (the compiled graphs stay in dynamo's cache for a later `compile_blocks`)."""
    for m in unet.modules():
        if type(m).__name__ in REGIONS:
            m._compiled_call_impl = None


def compiled(unet: nn.Module) -> bool:
    """Whether any of `unet`'s regions (blocks of any `REGIONS` class) runs compiled."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules()
               if type(m).__name__ in REGIONS)


def persist_cache(root: Path | None = None) -> Path:
    """Keep inductor's compiled kernels under `root` (default: rapm-bench's cache, `inductor/`) unless
    TORCHINDUCTOR_CACHE_DIR is set: torch's default lives in the temp folder, which a reboot or a new container
    empties, and a cold compile of the sdxl engine takes minutes where a warm one takes ~45 s. Returns the folder."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        if root is None:
            from .files import default_cache_dir

            root = default_cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root).expanduser().resolve() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def pays(world: Any, passes: int, wanted: bool | None = None) -> bool:
    """Whether generation compiles `world`'s UNet blocks: `wanted` if given (--compile-blocks/--no-compile-blocks),
    else from the world's `compile_blocks_from` UNet passes on (SDXL; the tiny world never unasked); never off a
    CUDA GPU (as the engine) or on a torch that cannot (`supported`)."""
    if world.device.type != "cuda" or not supported():
        return False
    if wanted is not None:
        return wanted
    return world.compile_blocks_from is not None and passes >= world.compile_blocks_from


@contextlib.contextmanager
def blocks_compiled(unet: nn.Module, enabled: bool, classes: tuple[str, ...] = BLOCKS) -> Iterator[int]:
    """Inside the block `unet`'s blocks of `classes` run compiled (`compile_blocks`, inductor's cache kept by
    `persist_cache`); yields how many (0: eager). Regions compiled before the block stay as they were."""
    if not enabled or compiled(unet):
        yield 0
        return
    persist_cache()
    n = compile_blocks(unet, classes=classes)
    try:
        yield n
    finally:
        uncompile_blocks(unet)
