"""File utilities: atomic writes, their leftovers, file hashes (every stage writes through these)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

TMP_SUFFIX = ".tmp"
"""Temporary files of `atomic_write_bytes` are `.<name>.<random>.tmp` beside their target."""


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read by setting it and back: under a lock, so that threads writing files at once never
    see, or leave behind, the 0 set in between)."""
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that it is either complete or absent, even if the process is killed.

    The bytes go to a temporary file in the same folder, which is then renamed over `path`
    (atomic on POSIX). A SIGKILL can leave the temporary file behind, never a truncated
    `path`; `remove_stale_tmp` clears such leftovers when a job resumes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_stale_tmp(path: Path) -> bool:
    """Whether `path` is a leftover temporary file of `atomic_write_bytes` (a killed writer)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and path.is_file()


def remove_stale_tmp(folder: Path) -> int:
    """Delete the leftover temporary files directly in `folder`; returns how many."""
    stale = [p for p in Path(folder).iterdir() if is_stale_tmp(p)] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where reference statistics, prepared data, trajectories and inductor's kernels live (XDG cache;
    RAPM_BENCH_CACHE overrides)."""
    base = os.environ.get("RAPM_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rapm-bench")
    return Path(base)
