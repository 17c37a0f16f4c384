"""One job per run folder and per cache (filelock: an OS `flock`, released when its process dies).

- `hold(folder, what)`: a run folder (`distill`, `generate`, `eval --out`) is held by one job; a second
  job fails at once with one line naming the first one's pid and command (a UserError, exit 2).
- `wait_for(path, what)`: a shared cache entry (a trajectory folder, a reference-statistics file) is filled by
  one job (lock `.<name>.lock` beside it); another waits, with a message, then reuses what the first wrote (the caller checks again inside).

The lock is the `flock` on the lock file, never the pid file beside it:
a job killed with SIGKILL loses its `flock` with its process, so its stale `.lock.json` blocks nothing and
is only read to name a job that holds the lock now. Under `accelerate launch`/`torchrun` only the main
process (RANK 0) takes locks; the others follow it through the launcher's barriers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

LOCK = ".lock"  # the flock'ed file inside a run folder
INFO = ".lock.json"  # pid, command, started: names the holder in the other job's message
LOCK_FILES = (LOCK, INFO)


class FolderInUse(UserError):
    """Another live job holds this run folder."""


def is_lock_file(path: Path) -> bool:
    """Whether a path is one of a run folder's lock files (they are not the run's contents)."""
    name = Path(path).name
    return name in LOCK_FILES or (name.startswith(LOCK + "-") and name.endswith((".lock", ".lock.json")))


def _is_main() -> bool:
    """Whether this is the main process of a launch (or a plain single process)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _command() -> str:
    """This job's command line, as a user typed it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "rapm-bench", "cli.py")):
        argv[0] = "rapm-bench"
    return " ".join(argv) or "python"


def _holder(info: Path) -> str:
    """`pid N (command)` of the job that holds a lock, from its info file, if that pid is alive."""
    try:
        data = json.loads(info.read_text())
        pid = int(data["pid"])
        os.kill(pid, 0)  # a leftover of a killed job names a dead pid: not trusted
    except (OSError, ValueError, KeyError, TypeError):
        return "another job (its pid is not known yet)"
    return f"pid {pid} (`{data.get('command', '?')}`, started {data.get('started', '?')})"


def _write_info(info: Path, what: str) -> None:
    """Record this job as the holder (atomic: a reader sees the whole record or none)."""
    from .files import atomic_write_bytes

    record = {"pid": os.getpid(), "command": _command(), "what": what,
              "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    atomic_write_bytes(info, (json.dumps(record) + "\n").encode())


@contextmanager
def _locked(lock_path: Path, info: Path, what: str, wait: bool, remove: bool = False) -> Iterator[None]:
    """Hold `lock_path` (flock); on contention raise FolderInUse, or wait with a message when `wait`;
    `remove`: delete the lock file before letting go of it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        if not wait:
            raise FolderInUse(f"{what} is in use by {_holder(info)}; wait for that job to end, or choose "
                              "another --out") from None
        print(f"rapm-bench: {what} is being written by {_holder(info)}; waiting for it, then reusing it",
              file=sys.stderr, flush=True)
        lock.acquire(timeout=-1)
    try:
        _write_info(info, what)
        yield
    finally:
        info.unlink(missing_ok=True)
        if remove:
            lock_path.unlink(missing_ok=True)
        lock.release()


def _refuse_if_held(folder: Path, what: str) -> None:
    """Fail at once when a whole-folder job holds `folder` (its `.lock` is taken and it wrote its `.lock.json`;
    another keyed job's brief probe of the same lock writes none)."""
    from filelock import FileLock, Timeout

    if not (folder / LOCK).exists():
        return
    probe = FileLock(str(folder / LOCK), timeout=0, thread_local=False)
    try:
        probe.acquire()
    except Timeout:
        if (folder / INFO).exists():
            raise FolderInUse(f"{what} {folder} is in use by {_holder(folder / INFO)}; wait for that job to end, "
                              "or choose another --out") from None
        return
    probe.release()


@contextmanager
def hold(folder: Path, what: str, key: str | None = None) -> Iterator[None]:
    """Hold a run folder for this job: a second job on it fails at once, naming this one's pid and command.

    `key`: hold only this job's entry of a shared folder (`eval --out`: one result file among many; jobs
    writing other results into the same folder go on side by side). A folder this call created and the job
    left empty is removed again (bad input writes nothing).
    """
    folder = Path(folder)
    if not _is_main() or (folder.exists() and not folder.is_dir()):
        yield  # a file where a folder should be: the caller's own check says so
        return
    if key is not None and folder.is_dir():
        _refuse_if_held(folder, what)  # a whole-folder job (generate, distill) excludes every keyed one
    lock_name = LOCK if key is None else f"{LOCK}-{key}.lock"
    lock_file, info_file = folder / lock_name, folder / (lock_name + ".json" if key else INFO)
    created, new_lock = not folder.exists(), not lock_file.exists()
    folder.mkdir(parents=True, exist_ok=True)
    empty = False
    try:  # a lock file this job made goes with it (a killed job's stays, unlocked, and blocks nothing)
        with _locked(lock_file, info_file, f"{what} {folder}", wait=False, remove=new_lock or key is not None):
            try:
                yield
            finally:  # still holding the lock: nobody else can be writing here
                empty = folder.is_dir() and all(is_lock_file(p) for p in folder.iterdir())
                if empty:
                    lock_file.unlink(missing_ok=True)  # nothing of the job's: leave nothing of the lock
    finally:
        if empty and created:
            try:
                folder.rmdir()
            except OSError:  # another job has started writing into it meanwhile
                pass


@contextmanager
def wait_for(path: Path, what: str) -> Iterator[None]:
    """Hold a cache entry (file or folder; the lock is `.<name>.lock` beside it) while filling it; another job
    waits with a message, then reuses it: check for the finished entry again inside the block."""
    path = Path(path)
    if not _is_main():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path, info = path.with_name(f".{path.name}{LOCK}"), path.with_name(f".{path.name}{INFO}")
    with _locked(lock_path, info, f"{what} {path}", wait=True):
        yield
