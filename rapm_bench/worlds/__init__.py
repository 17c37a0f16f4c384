"""World adapters; `registry` is the only place that knows which worlds exist (one WorldSpec each)."""

from __future__ import annotations

from ..config import WorldConfig
from .base import Cond, NoiseSchedule, World
from .registry import WorldSpec, get_world_spec, register_world, world_names

__all__ = ["Cond", "NoiseSchedule", "World", "WorldSpec", "get_world_spec", "load_world", "register_world",
           "world_names"]


def load_world(cfg: WorldConfig) -> World:
    """Build the world a config names (weights from the package, a folder, or the hub cache)."""
    return get_world_spec(cfg.preset).load(cfg)
