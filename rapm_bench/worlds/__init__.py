"""World adapters: `load_world` is the only place that knows which worlds exist."""

from __future__ import annotations

from ..config import WorldConfig, get_preset
from .base import Cond, NoiseSchedule, World, pick_device, pick_dtype

__all__ = ["Cond", "NoiseSchedule", "World", "load_world"]


def load_world(cfg: WorldConfig) -> World:
    """Build the world a config names (weights from the package, a folder, or the hub cache)."""
    preset = get_preset(cfg.preset)
    if preset.name == "sdxl":
        from .sdxl import SDXLWorld

        return SDXLWorld(cfg.teacher or preset.teacher, device=cfg.device, precision=cfg.precision,
                         resolution=cfg.resolution, vae=cfg.vae)
    from pathlib import Path

    from .tiny import load_tiny_world

    device = pick_device(cfg.device)
    pick_dtype(cfg.precision, device)  # an unknown --precision is an error here too (the tiny world is fp32)
    return load_tiny_world(device=device, assets=Path(cfg.teacher) if cfg.teacher else None)
