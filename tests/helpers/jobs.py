"""Running `python -m rapm_bench` as a subprocess, and checking what a killed job left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rapm_bench.generate import is_stale_tmp, png_ok

TIMEOUT = 600


def cli(*args: str) -> list[str]:
    """The argv of `python -m rapm_bench ARGS` under this interpreter."""
    return [sys.executable, "-m", "rapm_bench", *args]


def run_to_end(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = TIMEOUT) -> None:
    """Run `cmd` to the end; it must exit 0."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_nothing_half_written(*folders: Path) -> list[Path]:
    """Every file is complete (decodes, parses, loads); returns the atomic writer's leftover temporaries."""
    import numpy as np
    from safetensors.torch import load_file

    leftovers = []
    for folder in folders:
        for p in sorted(folder.rglob("*")) if folder.exists() else []:
            if not p.is_file() or p.name.startswith("log-"):
                continue
            if is_stale_tmp(p):
                leftovers.append(p)
            elif p.suffix == ".png":
                assert png_ok(p), f"{p} is a truncated or corrupt PNG"
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                for line in p.read_text().splitlines():
                    json.loads(line)
                assert not p.read_text() or p.read_text().endswith("\n"), f"{p} ends in a partial line"
            elif p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".npz":
                with np.load(p) as z:
                    [z[k] for k in z.files]
    return leftovers
