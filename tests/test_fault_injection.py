"""Interruption (issue 8, part 1): SIGKILL at seeded random points, then the same command again.

Each job runs as a subprocess on the CPU with a small random-weight tiny-world teacher: the
uninterrupted run is the reference; a second run is killed with SIGKILL (no cleanup code
runs) a seeded random time after a trigger file appears; right after the kill every file
the job left must be complete (PNGs decode, JSON and JSONL parse, safetensors and .npz load;
only `.<name>.<random>.tmp` leftovers of the atomic writer may exist); then the same command
runs to the end and its output must equal the reference: LoRA and checkpoint tensors
`torch.equal`, PNG bytes, scores.

Default run: one seed per job (generate, eval, distill, trajectory precompute). `slow`: three
more seeds per job, some killed twice in a row, plus a corrupted PNG and a corrupted
manifest-recorded image in generate.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.jobs import TIMEOUT, assert_nothing_half_written, cli, run_to_end

pytestmark = pytest.mark.e2e  # each job is a subprocess, killed and rerun

# --- running, killing --------------------------------------------------------------------------------
Ready = Callable[[], bool]


def exists(path: Path) -> Ready:
    return path.exists


def run_watched(cmd: list[str], env: dict[str, str], cwd: Path, ready: Ready | None) -> float:
    """Run to the end; returns the seconds from `ready()` first holding (or from the start) to the exit."""
    log = cwd / f"log-{time.monotonic_ns()}.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    start = t0 = time.monotonic()
    seen = ready is None
    while proc.poll() is None:
        if not seen and ready():
            seen, t0 = True, time.monotonic()
        time.sleep(0.01)
        if time.monotonic() - start > TIMEOUT:
            proc.kill()
    assert proc.wait() == 0, log.read_text()[-3000:]
    assert seen, "the trigger never happened"
    return time.monotonic() - t0


def run_killed(cmd: list[str], env: dict[str, str], cwd: Path, ready: Ready | None, delay: float) -> bool:
    """Start, wait until `ready()` (if given), wait `delay` s more, SIGKILL; True if it was still running."""
    with open(cwd / f"log-killed-{time.monotonic_ns()}.txt", "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        start = time.monotonic()
        while ready is not None and not ready() and proc.poll() is None:
            time.sleep(0.01)
            assert time.monotonic() - start < TIMEOUT
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)  # our own child, by pid
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_first(cmd: list[str], env: dict[str, str], cwd: Path, ready: Ready | None, delay: float,
               outputs: list[Path], unfinished: Ready | None = None) -> None:
    """`run_killed` until a kill lands (and leaves `unfinished()` true, if given): a job that ended first
    (the machine got faster) is wiped and rerun with a third of the delay, so timing cannot make the test
    vacuous or flaky."""
    import shutil

    for _ in range(4):
        if run_killed(cmd, env, cwd, ready, delay) and (unfinished is None or unfinished()):
            return
        for path in outputs:
            shutil.rmtree(path, ignore_errors=True)
        delay /= 3
    pytest.fail("the job always ended before the kill: nothing was tested")


def png_bytes_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_equal_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors of {b.name} differ, e.g. {differ[:3]}"


# --- generate ------------------------------------------------------------------------------------
def generate_cmd(teacher: Path, out: Path) -> list[str]:
    return cli("generate", "--teacher", str(teacher), "--device", "cpu", "--num-images", "12", "--batch-size", "3",
               "--steps", "2", "--seed", "5", "--out", str(out))


@pytest.fixture(scope="module")
def generate_ref(teacher, env, tmp_path_factory) -> tuple[Path, float]:
    work = tmp_path_factory.mktemp("generate-ref")
    seconds = run_watched(generate_cmd(teacher, work / "out"), env, work, exists(work / "out" / "000000.png"))
    return work / "out", seconds


def check_generate(teacher, env, tmp_path, ref, seed: int, kills: int = 1, corrupt: bool = False) -> None:
    ref_out, after_trigger = ref
    rng = random.Random(seed)
    out = tmp_path / "out"
    cmd = generate_cmd(teacher, out)
    kill_first(cmd, env, tmp_path, exists(out / "000000.png"), rng.uniform(0.0, 0.8) * after_trigger, [out])
    assert_nothing_half_written(out)
    for _ in range(kills - 1):  # kill the resumed run too, anywhere (it may also end first)
        run_killed(cmd, env, tmp_path, None, 3.0 + rng.uniform(0.0, 0.8) * after_trigger)
        assert_nothing_half_written(out)
    if corrupt:  # damage that a kill cannot make, but a disk or a user can
        pngs = sorted(out.glob("*.png"))
        if pngs:
            pngs[0].write_bytes(pngs[0].read_bytes()[:40])  # truncated
            pngs[-1].write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    run_to_end(cmd, env, tmp_path)
    assert not assert_nothing_half_written(out), "a resumed run must clear the killed run's temporaries"
    assert png_bytes_of(out) == png_bytes_of(ref_out)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((ref_out / "manifest.json").read_text())


def test_generate_killed_and_resumed(teacher, env, tmp_path, generate_ref):
    check_generate(teacher, env, tmp_path, generate_ref, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generate_killed_and_resumed_seeds(teacher, env, tmp_path, generate_ref, seed):
    check_generate(teacher, env, tmp_path, generate_ref, seed, kills=1 + seed % 2, corrupt=True)


@pytest.mark.slow
def test_generate_replaced_image_is_regenerated(teacher, env, tmp_path, generate_ref):
    """The manifest is the source of truth: an image that decodes but is not the one it recorded is redone."""
    import shutil

    ref_out, _ = generate_ref
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    config = json.loads((out / "config.json").read_text()) | {"out": str(out)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "000004.png").write_bytes((out / "000007.png").read_bytes())  # a valid PNG, the wrong image
    run_to_end(generate_cmd(teacher, out), env, tmp_path)
    assert png_bytes_of(out) == png_bytes_of(ref_out)


# --- eval ----------------------------------------------------------------------------------------
def eval_cmd(teacher: Path, work: Path, tag: str) -> list[str]:
    return cli("eval", "--teacher", str(teacher), "--model", "teacher", "--steps", "2", "--num-images", "70",
               "--batch-size", "16", "--device", "cpu", "--out", str(work / f"results-{tag}"),
               "--data-dir", str(work / f"data-{tag}"), "--save-images", str(work / f"images-{tag}"))


SCORES = ("fid", "clip_score", "retrieval_accuracy", "num_images", "protocol_hash", "fid_reliable")


@pytest.fixture(scope="module")
def eval_ref(teacher, env, tmp_path_factory) -> tuple[Path, float]:
    work = tmp_path_factory.mktemp("eval-ref")
    seconds = run_watched(eval_cmd(teacher, work, "ref"), env, work, None)
    return work, seconds


def check_eval(teacher, env, tmp_path, ref, seed: int, kills: int = 1) -> None:
    ref_work, total = ref
    rng = random.Random(seed)
    cmd = eval_cmd(teacher, tmp_path, "cut")  # its own data dir: the reference statistics are built, and killed
    outputs = [tmp_path / f"{d}-cut" for d in ("results", "data", "images")]
    kill_first(cmd, env, tmp_path, None, rng.uniform(0.3, 0.85) * total, outputs)
    assert_nothing_half_written(*outputs)
    for _ in range(kills - 1):
        run_killed(cmd, env, tmp_path, None, rng.uniform(0.3, 0.85) * total)
        assert_nothing_half_written(*outputs)
    run_to_end(cmd, env, tmp_path)
    name = "teacher-2step-tiny.json"
    got = json.loads((tmp_path / "results-cut" / name).read_text())
    want = json.loads((ref_work / "results-ref" / name).read_text())
    assert {k: got[k] for k in SCORES} == {k: want[k] for k in SCORES}
    assert png_bytes_of(tmp_path / "images-cut") == png_bytes_of(ref_work / "images-ref")


def test_eval_killed_and_rerun(teacher, env, tmp_path, eval_ref):
    check_eval(teacher, env, tmp_path, eval_ref, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_eval_killed_and_rerun_seeds(teacher, env, tmp_path, eval_ref, seed):
    check_eval(teacher, env, tmp_path, eval_ref, seed, kills=1 + seed % 2)


# --- distill ---------------------------------------------------------------------------------------
def distill_cmd(teacher: Path, work: Path, tag: str) -> list[str]:
    return cli("distill", "--teacher", str(teacher), "--device", "cpu", "--out", str(work / f"run-{tag}"),
               "--cache-dir", str(work / f"trajectories-{tag}"), "--num-trajectories", "4", "--M", "1",
               "--slots", "2", "--iters", "5", "--checkpoint-every", "1", "--sample-every", "0", "--warmup", "2")


@pytest.fixture(scope="module")
def distill_ref(teacher, env, tmp_path_factory) -> tuple[Path, float]:
    work = tmp_path_factory.mktemp("distill-ref")
    seconds = run_watched(distill_cmd(teacher, work, "ref"), env, work,
                          exists(work / "run-ref" / "checkpoint.safetensors"))
    return work / "run-ref", seconds


def check_distill(teacher, env, tmp_path, ref, seed: int, kills: int = 1) -> None:
    ref_run, after_trigger = ref
    rng = random.Random(seed)
    run = tmp_path / "run-cut"
    cmd = distill_cmd(teacher, tmp_path, "cut")
    outputs = [run, tmp_path / "trajectories-cut"]
    kill_first(cmd, env, tmp_path, exists(run / "checkpoint.safetensors"), rng.uniform(0.0, 0.8) * after_trigger,
               outputs)
    assert_nothing_half_written(*outputs)
    for _ in range(kills - 1):  # a second kill anywhere in the resumed run (it may also end first)
        run_killed(cmd, env, tmp_path, None, 4.0 + rng.uniform(0.0, 0.8) * after_trigger)
        assert_nothing_half_written(*outputs)
    run_to_end(cmd, env, tmp_path)
    assert_equal_tensors(ref_run / "lora.safetensors", run / "lora.safetensors")
    assert_equal_tensors(ref_run / "checkpoint.safetensors", run / "checkpoint.safetensors")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iters"] == 5 and summary["lora"]["sha256"] == json.loads(
        (ref_run / "summary.json").read_text())["lora"]["sha256"]


def test_distill_killed_and_resumed(teacher, env, tmp_path, distill_ref):
    check_distill(teacher, env, tmp_path, distill_ref, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_distill_killed_and_resumed_seeds(teacher, env, tmp_path, distill_ref, seed):
    check_distill(teacher, env, tmp_path, distill_ref, seed, kills=1 + seed % 2)


# --- teacher trajectory precompute (6 shards of one trajectory each, 40 CFG teacher steps per shard) ---
TRAJECTORIES = """
import sys
from pathlib import Path
from rapm_bench.distill.trajectories import load_or_build, make_spec, training_prompts
from rapm_bench.worlds.tiny import load_tiny_world
world = load_tiny_world("cpu", Path(sys.argv[1]))
prompts = training_prompts("tiny", 6, None)
spec = make_spec(world, prompts, 0, 3.0, 4, 10, "fp32", 1)  # N = 4 slots, M = 10 sub-steps, 1 per shard
load_or_build(world, prompts, spec, Path(sys.argv[2]), progress=False)
"""


def trajectories_cmd(teacher: Path, root: Path) -> list[str]:
    return [sys.executable, "-c", TRAJECTORIES, str(teacher), str(root)]


def shards(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(root.glob("*/shard_*.safetensors"))}


@pytest.fixture(scope="module")
def trajectories_ref(teacher, env, tmp_path_factory) -> tuple[Path, float]:
    work = tmp_path_factory.mktemp("trajectories-ref")
    root = work / "cache"
    run_watched(trajectories_cmd(teacher, root), env, work, None)
    times = sorted(p.stat().st_mtime for p in shards(root).values())
    return root, times[-1] - times[0]  # from the first shard to the last


def check_trajectories(teacher, env, tmp_path, ref, seed: int) -> None:
    ref_root, span = ref
    rng = random.Random(seed)
    root = tmp_path / "cache"
    cmd = trajectories_cmd(teacher, root)
    kill_first(cmd, env, tmp_path, lambda: bool(shards(root)), rng.uniform(0.05, 0.8) * span, [root],
               unfinished=lambda: len(shards(root)) < 6)
    assert 1 <= len(shards(root)) < 6
    assert_nothing_half_written(root)
    run_to_end(cmd, env, tmp_path)
    got, want = shards(root), shards(ref_root)
    assert got.keys() == want.keys() and len(got) == 6
    for name in want:
        assert_equal_tensors(want[name], got[name])


def test_trajectories_killed_and_resumed(teacher, env, tmp_path, trajectories_ref):
    check_trajectories(teacher, env, tmp_path, trajectories_ref, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_trajectories_killed_and_resumed_seeds(teacher, env, tmp_path, trajectories_ref, seed):
    check_trajectories(teacher, env, tmp_path, trajectories_ref, seed)
