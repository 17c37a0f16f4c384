"""Training checkpoints as one safetensors file (no pickles): weights, optimiser states, RNG, step.

Optimiser states are flattened to `opt.<name>.<param index>.<field>` tensors; their
param groups go to the JSON metadata. The file is written atomically, so the last good
checkpoint survives a crash or a NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.safetensors"


def flatten_optimizer(opt: torch.optim.Optimizer, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """An optimiser's per-parameter state as flat tensors, and its param groups as JSON."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"opt.{name}.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, json.dumps(sd["param_groups"])


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: str, name: str) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`: a state dict for `load_state_dict`."""
    prefix = f"opt.{name}."
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[field] = value
    return {"state": state, "param_groups": json.loads(groups)}


def save_checkpoint(
    path: Path, step: int, modules: dict[str, dict[str, torch.Tensor]], optimizers: dict[str, torch.optim.Optimizer],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write weights (`<module>.<key>`), optimiser states, the torch RNG state and the step, atomically."""
    from safetensors.torch import save

    from ..files import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"step": str(step), "extra": json.dumps(extra or {})}
    for mod, state in modules.items():
        tensors |= {f"{mod}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    for name, opt in optimizers.items():
        flat, groups = flatten_optimizer(opt, name)
        tensors |= flat
        meta[f"groups.{name}"] = groups
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
    """(step, tensors, metadata) of a checkpoint file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    return int(meta["step"]), tensors, meta


def module_state(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """The `<module>.` tensors of a checkpoint, prefix removed."""
    prefix = module + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
