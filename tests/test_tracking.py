"""`distill --log-with` (issue 16, part 2): the JSONL scalars and sample grids through accelerate's trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.distill import distill_app
from typer.testing import CliRunner

from rapm_bench.distill.config import DistillConfig, resolve_distill


def short_args(teacher: Path, tmp_path: Path) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--device", "cpu", "--out", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--num-trajectories", "4", "--trajectory-batch", "2", "--M", "1", "--slots",
            "2", "--iters", "6", "--checkpoint-every", "3", "--sample-every", "3", "--warmup", "2"]


@pytest.mark.e2e
def test_tensorboard_gets_every_jsonl_scalar_once_per_log_step_and_the_sample_grids(teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rapm_bench.distill.engine import distill

    cfg = resolve_distill("tiny", teacher=str(teacher), device="cpu", out=str(tmp_path / "run"),
                          cache_dir=str(tmp_path / "cache"), num_trajectories=4, trajectory_batch=2, substeps=1,
                          slots=2, iters=6, checkpoint_every=3, log_every=2, sample_every=3, sample_count=2,
                          warmup=2, log_with="tensorboard")
    distill(cfg, progress=False)
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    folders = {p.parent for p in (run / "logs" / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run / "logs" / "tensorboard" / "run"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert folders and run / "logs" / "tensorboard" / "run" in folders
    tags = set(acc.Tags()["scalars"])
    keys = {k for r in rows for k in r if k != "step"}
    assert {"g_loss", "d_loss"} <= keys and keys <= tags, (keys, tags)
    for key in keys:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows if key in r], key  # one per log step
        want = [r[key] for r in rows if key in r]
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6, abs=1e-6), key
    images = acc.Images("samples")
    assert [e.step for e in images] == [0, 3, 6]  # every sample grid the run folder holds
    assert len(list((run / "samples").glob("step_*.png"))) == 3


@pytest.mark.e2e
@pytest.mark.parametrize("tracker, available", [("wandb", "is_wandb_available"), ("mlflow", "is_mlflow_available"),
                                                ("tensorboard", "is_tensorboard_available")])
def test_missing_tracker_package_is_one_line_naming_the_pip_command(teacher, tmp_path, monkeypatch, tracker,
                                                                     available):
    """The package of --log-with is absent: exit 2, one line with `pip install NAME`, nothing written."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, available, lambda: False)
    r = CliRunner().invoke(distill_app(), [*short_args(teacher, tmp_path), "--log-with", tracker])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"pip install {tracker}" in lines[0], r.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.e2e
def test_unknown_tracker_is_one_line(teacher, tmp_path):
    r = CliRunner().invoke(distill_app(), [*short_args(teacher, tmp_path), "--log-with", "neptune"])
    assert r.exit_code == 2 and "--log-with must be one of tensorboard, wandb, mlflow" in r.output
    assert not (tmp_path / "run").exists()


def test_old_run_folders_without_log_with_still_load_and_resume(tmp_path):
    """config.json of a run written before --log-with existed: it loads, and equals today's default config."""
    cfg = resolve_distill("tiny", out=str(tmp_path / "run"))
    old = json.loads(cfg.to_json())
    del old["log_with"]
    assert DistillConfig.from_json(json.dumps(old)) == cfg
    from dataclasses import replace

    from rapm_bench.distill.engine import open_run

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    open_run(tmp_path / "run", replace(cfg, log_with="tensorboard"), resume=True)  # adding --log-with is allowed
