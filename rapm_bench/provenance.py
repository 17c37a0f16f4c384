"""Provenance: the versions, the commit and the device a result was made with."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    """Versions of what can move a score."""
    import diffusers
    import numpy
    import scipy

    from . import __version__

    return {"rapm_bench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__}


def git_commit() -> str | None:
    """The commit of the rapm-bench checkout, if it is one (with `+dirty` when edited)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def device_name(device: torch.device) -> str:
    """GPU model or CPU description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
