"""Gradient checkpointing chosen from the GPU's free memory (`grad_checkpointing=None`, issue 14).

Checkpointing recomputes every UNet block in backward: on SDXL it costs ~0.4 s of a 1.3 s
iteration and saves ~30 GiB at 4 slots a pass. It is worth that only where the passes do not
fit. The estimate: the merged-weight copy of FastLoRA (as large as the UNet's frozen target
weights), plus the activations the world says one latent's gradient pass keeps
(`World.grad_activation_gib`), times the latents of a pass (the student's slot chunk, and the
discriminator's fake features on the encoder half), against the free memory with a margin.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..worlds.base import World
from .config import DistillConfig

MARGIN = 0.85  # use at most this share of the free memory (fragmentation, CUDA graphs' pools, cuDNN workspaces)
ENCODER_SHARE = 0.5  # the discriminator's feature pass keeps about half the UNet's activations (down + mid)


def estimate_gib(cfg: DistillConfig, world: World) -> float:
    """GiB the training passes add on top of what is loaded, without checkpointing."""
    per_latent = world.grad_activation_gib()
    gan = cfg.method("rapm").adversarial
    latents = cfg.slot_chunk * (1 + (ENCODER_SHARE if gan else 0.0))
    weights = sum(p.numel() * p.element_size() for p in world.unet.parameters()) / 2**30
    cache = weights if cfg.lora_impl == "merged" else 0.0
    return cache + per_latent * latents


def choose_checkpointing(cfg: DistillConfig, world: World) -> tuple[bool, str]:
    """(checkpointing on?, why) for `grad_checkpointing=None`."""
    if world.device.type != "cuda":
        return False, f"{world.device.type}: memory is not the limit"
    free, total = torch.cuda.mem_get_info(world.device)
    # blocks this process's caching allocator holds but no tensor uses are free to these passes too (a fresh
    # engine has none; the bench, deciding after other variants ran, has many)
    free += torch.cuda.memory_reserved(world.device) - torch.cuda.memory_allocated(world.device)
    need = estimate_gib(cfg, world)
    room = MARGIN * free / 2**30
    on = need > room
    return on, (f"the passes need ~{need:.0f} GiB, {'more' if on else 'less'} than {room:.0f} GiB "
                f"({MARGIN:.0%} of the {free / 2**30:.0f} GiB free of {total / 2**30:.0f})")


def resolve_checkpointing(cfg: DistillConfig, world: World, resume_from: Path | None = None) -> tuple[DistillConfig, str]:
    """`cfg` with `grad_checkpointing` decided: given, a resumed run's own choice, or chosen from free memory."""
    if cfg.grad_checkpointing is not None:
        return cfg, "set"
    old = resume_from / "config.json" if resume_from is not None else None
    if old is not None and old.is_file():
        try:
            prev = DistillConfig.from_json(old.read_text()).grad_checkpointing
        except (KeyError, TypeError, ValueError):
            prev = None
        if prev is not None:  # a run keeps its choice: resuming it must not change how it trains
            return replace(cfg, grad_checkpointing=prev), "as the run in --out chose"
    on, why = choose_checkpointing(cfg, world)
    return replace(cfg, grad_checkpointing=on), why
