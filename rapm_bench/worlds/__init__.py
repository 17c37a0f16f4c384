"""World adapters; `registry` is the only place that knows which worlds exist (one WorldSpec each).

The adapters' base types (`World`, `Cond`, `NoiseSchedule`: base.py, which imports torch) load on first use, so a
command that checks its `--preset` (the registry) does not import torch before it checks its other options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import WorldConfig, WorldSpec, get_world_spec, register_world, world_names

if TYPE_CHECKING:
    from .base import Cond, NoiseSchedule, World

__all__ = ["Cond", "NoiseSchedule", "World", "WorldSpec", "get_world_spec", "load_world", "register_world",
           "world_names"]


def __getattr__(name: str) -> Any:
    """`Cond`, `NoiseSchedule` and `World` from base.py, imported when first asked for (PEP 562)."""
    if name in ("Cond", "NoiseSchedule", "World"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_world(cfg: WorldConfig) -> World:
    """Build the world a config names (weights from the package, a folder, or the hub cache)."""
    return get_world_spec(cfg.preset).load(cfg)
