"""One job per run folder and per cache (issue 16, part 3): two subprocesses on each of the four.

A run folder (`distill`, `generate`, `eval --out`): the second job fails at once with one line naming
the first one's pid and command, and the first one's files stay whole. A shared cache (trajectories,
reference statistics): the second job waits with a message, then reuses what the first wrote. A lock
of a job killed with SIGKILL blocks nothing. The first job is made to hold its lock long enough
(a long run, or, for a cache, until the test has seen the second job wait) that the test does not
depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.jobs import assert_nothing_half_written, cli

from rapm_bench.locks import INFO, LOCK, hold

pytestmark = pytest.mark.e2e  # two subprocesses each

TIMEOUT = 300


def start(cmd: list[str], env: dict[str, str], cwd: Path, name: str) -> subprocess.Popen:
    """A background job, its output in cwd/<name>.txt."""
    log = open(cwd / f"{name}.txt", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until(cond, proc: subprocess.Popen, what: str) -> None:
    """Poll until `cond()`; fail if the process ends first."""
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"the first job ended before {what}"
        assert time.monotonic() - t0 < TIMEOUT, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL our own child, by pid."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def refused(cmd: list[str], env: dict[str, str], cwd: Path, holder: subprocess.Popen, *needles: str) -> str:
    """Run a second job: exit 2 at once, one line naming the holder's pid."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rapm-bench: error: "), proc.stderr
    for needle in (f"pid {holder.pid}", "in use by", *needles):
        assert needle in lines[0], (needle, lines[0])
    assert time.monotonic() - t0 < 60, "the second job must fail at once, not wait"
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name == "config.json"}


# --- run folders ----------------------------------------------------------------------------------------
def test_second_distill_on_a_run_folder_fails_at_once_and_a_killed_holder_blocks_nothing(teacher, env, tmp_path):
    run = tmp_path / "run"
    cmd = cli("distill", "--teacher", str(teacher), "--device", "cpu", "--out", str(run), "--cache-dir",
              str(tmp_path / "trajectories"), "--num-trajectories", "4", "--M", "1", "--slots", "2", "--iters",
              "100000", "--checkpoint-every", "2", "--sample-every", "0", "--warmup", "2")
    first = start(cmd, env, tmp_path, "first")
    try:
        wait_until(lambda: (run / "checkpoint.safetensors").is_file(), first, "its first checkpoint")
        before = snapshot(run)
        line = refused(cmd, env, tmp_path, first, "distill", str(run))
        assert "--out" in line
        assert first.poll() is None, "the first job must go on"
        assert snapshot(run) == before
    finally:
        kill(first)
    assert_nothing_half_written(run)  # the first job's files are whole (it was killed, not the second job's work)
    # The killed job's .lock stays behind (and maybe its .lock.json): a rerun is not blocked by them.
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        step = int(f.metadata()["step"])
    proc = subprocess.run([*cmd[:cmd.index("--iters") + 1], str(step), *cmd[cmd.index("--iters") + 2:], "--resume"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["iters"] == step
    assert not (run / INFO).exists(), "a job that ended removes its pid record"


def test_second_generate_or_eval_on_an_output_folder_fails_at_once(teacher, env, tmp_path):
    out = tmp_path / "out"
    gen = cli("generate", "--teacher", str(teacher), "--device", "cpu", "--num-images", "100000", "--batch-size",
              "2", "--steps", "2", "--out", str(out))
    first = start(gen, env, tmp_path, "first")
    try:
        wait_until(lambda: (out / "000000.png").is_file(), first, "its first image")
        before = snapshot(out)
        refused(gen, env, tmp_path, first, "generate", str(out))
        ev = cli("eval", "--teacher", str(teacher), "--model", "teacher", "--steps", "2", "--num-images", "8",
                 "--device", "cpu", "--out", str(out), "--data-dir", str(tmp_path / "data"))
        refused(ev, env, tmp_path, first, "generate", str(out))
        assert first.poll() is None and snapshot(out) == before
        assert not (out / "teacher-2step-tiny.json").exists() and not (tmp_path / "data").exists()
    finally:
        kill(first)
    assert_nothing_half_written(out)
    with hold(out, "output folder"):  # the killed job's lock is gone with its process
        pass


def test_a_killed_holder_is_not_named_and_does_not_block(tmp_path):
    """SIGKILL while holding: the OS drops the flock; its leftover .lock.json is not trusted on its own."""
    folder = tmp_path / "f"
    code = ("import sys, time; from pathlib import Path; from rapm_bench.locks import hold\n"
            "with hold(Path(sys.argv[1]), 'run folder'):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert json.loads((folder / INFO).read_text())["pid"] == proc.pid
    finally:
        kill(proc)
    assert (folder / LOCK).exists() and (folder / INFO).exists()  # left behind by the kill
    with hold(folder, "run folder"):
        assert json.loads((folder / INFO).read_text())["pid"] == os.getpid()
    assert not any(folder.iterdir()) or not folder.exists()


def test_evaluations_hold_their_own_result_in_a_shared_results_folder(tmp_path):
    """`eval --out` holds one result (a keyed lock): another evaluation writes beside it, the same one is refused,
    and a folder a whole-folder job (generate, distill) holds refuses every evaluation."""
    from rapm_bench.locks import FolderInUse

    folder = tmp_path / "results"
    code = ("import sys, time; from pathlib import Path; from rapm_bench.locks import hold\n"
            "with hold(Path(sys.argv[1]), 'results folder', sys.argv[2] or None):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), "a"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with hold(folder, "results folder", "b"):  # another evaluation: side by side
            pass
        with pytest.raises(FolderInUse, match=f"pid {proc.pid}"):
            with hold(folder, "results folder", "a"):
                pass
    finally:
        kill(proc)
    whole = subprocess.Popen([sys.executable, "-c", code, str(folder), ""], stdout=subprocess.PIPE, text=True)
    try:
        assert whole.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"pid {whole.pid}"):
            with hold(folder, "results folder", "b"):
                pass
    finally:
        kill(whole)


# --- shared caches ----------------------------------------------------------------------------------------
TRAJECTORIES = """
import sys, time
from pathlib import Path
import rapm_bench.distill.trajectories as T
from rapm_bench.worlds.tiny import load_tiny_world
fill = T._fill
def slow_fill(*args, **kwargs):
    print("filling", flush=True)
    release, t0 = sys.argv[3], time.monotonic()  # hold the lock until the test has seen the second job wait
    while release and not Path(release).exists() and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    return fill(*args, **kwargs)
T._fill = slow_fill
world = load_tiny_world("cpu", Path(sys.argv[1]))
prompts = T.training_prompts("tiny", 4, None)
spec = T.make_spec(world, prompts, 0, 3.0, 2, 2, "fp32", 1)
trajs = T.load_or_build(world, prompts, spec, Path(sys.argv[2]), progress=False)
print("done", len(trajs), flush=True)
"""

REFERENCE = """
import sys, time
from pathlib import Path
import torch
import rapm_bench.eval.reference as E
from rapm_bench.eval.protocols import get_protocol
from rapm_bench.eval.scorers import load_scorer
build = E._build_tiny_reference
def slow_build(*args, **kwargs):
    print("building", flush=True)
    release, t0 = sys.argv[2], time.monotonic()  # hold the lock until the test has seen the second job wait
    while release and not Path(release).exists() and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    return build(*args, **kwargs)
E._build_tiny_reference = slow_build
protocol = get_protocol("tiny")
stats = E.reference_stats(protocol, load_scorer(protocol, torch.device("cpu")), Path(sys.argv[1]))
print("done", stats.count, flush=True)
"""


def inodes(files: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in files}


def check_cache(first_cmd: list[str], second_cmd: list[str], env: dict[str, str], cwd: Path, held, outputs,
                first_word: str | None) -> None:
    """The first job fills the cache (slowly); the second waits with a message, then reuses every file."""
    first = start(first_cmd + [str(cwd / "release")], env, cwd, "first")
    second = None
    try:
        wait_until(held, first, "it held the cache lock")
        with open(cwd / "second.out", "w") as so, open(cwd / "second.err", "w") as se:
            second = subprocess.Popen(second_cmd + [""], cwd=cwd, env=env, stdout=so, stderr=se)
        wait_until(lambda: "waiting" in (cwd / "second.err").read_text() or second.poll() is not None, first,
                   "the second job waited")
        (cwd / "release").touch()  # now the first job fills the cache and lets go
        assert first.wait(timeout=TIMEOUT) == 0, (cwd / "first.txt").read_text()[-3000:]
        written = inodes(outputs())
        assert written
        second.wait(timeout=TIMEOUT)
        out, err = (cwd / "second.out").read_text(), (cwd / "second.err").read_text()
        assert second.returncode == 0, err[-3000:]
    finally:
        kill(first)
        if second is not None:
            kill(second)
    waiting = [ln for ln in err.splitlines() if "waiting" in ln]
    assert len(waiting) == 1 and f"pid {first.pid}" in waiting[0] and "reusing" in waiting[0], err
    assert "done" in out and (first_word is None or first_word not in out), "the second job computed it again"
    assert inodes(outputs()) == written, "the second job rewrote the first job's files"


def test_second_job_on_a_trajectory_cache_waits_then_reuses(teacher, env, tmp_path):
    root = tmp_path / "cache"
    first = [sys.executable, "-c", TRAJECTORIES, str(teacher), str(root)]
    second = [sys.executable, "-c", TRAJECTORIES, str(teacher), str(root)]
    check_cache(first, second, env, tmp_path, lambda: any(root.glob(f".*{INFO}")),
                lambda: sorted(root.glob("*/shard_*.safetensors")), None)  # (its _fill also loads: no word)
    assert len(list(root.glob("*/shard_*.safetensors"))) == 4


def test_second_job_on_reference_statistics_waits_then_reuses(env, tmp_path):
    data = tmp_path / "data"
    first = [sys.executable, "-c", REFERENCE, str(data)]
    second = [sys.executable, "-c", REFERENCE, str(data)]
    check_cache(first, second, env, tmp_path, lambda: any(data.rglob(f".*{INFO}")),
                lambda: sorted(p for p in data.rglob("*") if p.is_file() and not p.name.startswith(".")),
                "building")
