"""Provenance: the versions, the commit and the device a result was made with."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch


def versions() -> dict[str, str]:
    """Versions of what can move a score."""
    import diffusers
    import numpy
    import scipy

    from . import __version__

    return {"rapm_bench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__}


def git_commit_state() -> dict[str, Any]:
    """This checkout's commit and whether it has uncommitted changes (None: not known)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def git_commit() -> str | None:
    """The commit of the rapm-bench checkout, if it is one (with `+dirty` when edited)."""
    state = git_commit_state()
    return None if state["commit"] is None else state["commit"] + ("+dirty" if state["dirty"] else "")


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries whose speed is measured (the bench's and the engine's records)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda,
                                  "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None}
    for pkg in ("diffusers", "peft", "open_clip_torch", "torchvision", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, slug (for file names) and memory of the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = {"memory_gib": round(props.total_memory / 2**30, 2), "capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count}
    else:
        name = f"CPU {platform.processor() or platform.machine()}"
        extra = {"cores": os.cpu_count(), "threads": torch.get_num_threads()}
    slug = "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return {"type": device.type, "name": name, "slug": slug, **extra}


def device_name(device: torch.device) -> str:
    """GPU model or CPU description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
