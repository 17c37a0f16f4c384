"""`rapm-bench reproduce`: the plan, a small tiny run end to end (twice: the second reuses everything),
and the SDXL path rehearsed offline with a random-weight pipeline and synthetic COCO."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_clip_score import checkpoint as checkpoint  # noqa: F401 - a fixture
from test_coco import coco as coco  # noqa: F401 - a fixture
from test_sdxl_eval_rehearsal import prepared_coco as prepared_coco  # noqa: F401 - a fixture
from test_sdxl_eval_rehearsal import rehearsal_protocol as rehearsal_protocol  # noqa: F401 - a fixture
from typer.testing import CliRunner

from rapm_bench import reproduce as rep
from rapm_bench.cli import app

SMALL = {"num_trajectories": 4, "trajectory_batch": 4, "iters": 3, "warmup": 1, "checkpoint_every": 2,
         "log_every": 1, "sample_every": 0, "sample_count": 2}


def small_tiny_plan(objectives: tuple[str, ...], seeds: int = 1) -> rep.Plan:
    """The tiny plan's shape at a CPU-test size."""
    return rep.Plan("tiny", tuple(rep.DistillStep(m, m, SMALL | ({"seed": s} if s else {}), s)
                                  for s in range(seeds) for m in objectives),
                    (rep.EvalStep("teacher", 1),
                     *(rep.EvalStep(m, 4, trained=True, seed=s) for s in range(seeds) for m in objectives)),
                    num_images=130, grid_prompts=2)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rapm_bench", "reproduce", "--dry-run", "--out",
                             str(tmp_path / "res"), "--runs", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for needle in ("distill rapm", "distill pcm", "distill dmd2", "eval teacher 16-step", "eval dmd2 4-step",
                   "estimated total"):
        assert needle in result.stdout
    assert not (tmp_path / "res").exists() and not (tmp_path / "runs").exists()


def test_the_default_tiny_plan_fits_the_cpu_budget():
    """The README promises about 10 minutes on 2 CPU cores: the plan's own estimate must agree."""
    plan = rep.make_plan("tiny")
    cfgs = rep.distill_configs(rep.ReproduceConfig(), plan, Path("runs"))
    total = sum(s for _, s, _ in rep.estimate(plan, cfgs, plan.num_images or 0))
    assert 5 * 60 < total < 13 * 60
    assert {d.objective for d in plan.distills} == {"rapm", "pcm", "dmd2"}
    assert len({cfgs[m].iters for m in cfgs}) == 1  # the equal-budget comparison


def test_seeds_extend_the_tiny_plan_only():
    plan = rep.make_plan("tiny", seeds=3)
    assert [d.key for d in plan.distills][:4] == ["rapm", "pcm", "dmd2", "rapm-seed1"]
    assert len({d.key for d in plan.distills}) == 9 and {d.overrides.get("seed", 0) for d in plan.distills} == {0, 1, 2}
    assert sum(e.trained for e in plan.evals) == 9
    cfgs = rep.distill_configs(rep.ReproduceConfig(seeds=3), plan, Path("runs"))
    assert cfgs["pcm-seed2"].seed == 2 and cfgs["pcm-seed2"].out == str(Path("runs") / "pcm-seed2")
    assert cfgs["pcm-seed2"].trajectory_seed == cfgs["pcm"].trajectory_seed  # one trajectory cache for all seeds
    for preset, seeds, needle in (("tiny", 0, "at least 1"), ("sdxl", 2, "tiny preset")):
        with pytest.raises(rep.UserError, match=needle):
            rep.make_plan(preset, seeds=seeds)


def test_tiny_reproduce_runs_then_reuses_everything(tmp_path, monkeypatch):
    """Two methods at two training seeds: the table (seed 0), the equal-budget comparison, then a rerun that
    runs nothing."""
    monkeypatch.setattr(rep, "make_plan", lambda preset, quick=False, seeds=1: small_tiny_plan(("rapm", "pcm"), seeds))
    cfg = rep.ReproduceConfig(out=str(tmp_path / "res"), runs=str(tmp_path / "runs"), device="cpu", seeds=2)
    first = rep.reproduce(cfg, echo=lambda *_: None)
    assert first["ran"] == ["distill rapm", "distill pcm", "distill rapm-seed1", "distill pcm-seed1", "eval teacher 1",
                            "eval rapm 4", "eval pcm 4", "eval rapm-seed1 4", "eval pcm-seed1 4"]
    res = tmp_path / "res"
    for name in ("table.md", "table.csv", "fid_vs_steps.png", "fid_vs_clip.png", "samples.png", "comparison.md",
                 "rapm-4step-tiny.json", "teacher-1step-tiny.json"):
        assert (res / name).is_file(), name
    rec = json.loads((res / "rapm-4step-tiny.json").read_text())
    assert rec["lora"]["path"].endswith("runs/rapm/lora.safetensors")  # the LoRA trained here, not the shipped one
    table = (res / "table.md").read_text()
    assert "| rapm | 4 |" in table and "| teacher | 1 |" in table
    seed1 = json.loads((res / "seeds" / "seed1" / "pcm-4step-tiny.json").read_text())
    assert seed1["lora"]["path"].endswith("runs/pcm-seed1/lora.safetensors")
    comp = json.loads((res / "comparison.json").read_text())
    assert set(comp["methods"]) == {"rapm", "pcm"} and comp["num_images"] == 130
    pcm = comp["methods"]["pcm"]
    assert [r["seed"] for r in pcm["runs"]] == [0, 1] and pcm["runs"][1]["fid"] == seed1["fid"]
    fids = [r["fid"] for r in pcm["runs"]]
    assert pcm["fid"]["mean"] == pytest.approx(sum(fids) / 2) and pcm["fid"]["sd"] == pytest.approx(abs(fids[0] - fids[1]) / 2 ** 0.5)
    assert fids[0] != fids[1]  # another training seed trains another student
    md = (res / "comparison.md").read_text()
    assert "| pcm (4-step) | 3 | 2 |" in md and "| rapm (4-step) | 3 | 2 |" in md
    assert "seed1" not in (res / "table.md").read_text()  # the table holds seed 0's rows only
    assert rep.reproduce(cfg, echo=lambda *_: None)["ran"] == []
    assert json.loads((res / "rapm-4step-tiny.json").read_text())["created"] == rec["created"]
    before = (res / "comparison.md").read_bytes()  # a one-seed run reuses seed 0 and keeps the K-seed comparison
    assert rep.reproduce(replace(cfg, seeds=1), echo=lambda *_: None)["ran"] == []
    assert (res / "comparison.md").read_bytes() == before


def test_sdxl_reproduce_rehearsed_offline(tmp_path, monkeypatch, tiny_sdxl, prepared_coco, checkpoint,  # noqa: F811
                                          rehearsal_protocol):  # noqa: F811
    inception, cache = prepared_coco
    prompts = tmp_path / "train_captions.txt"
    prompts.write_text("a dog on a beach\na bowl of soup\n")
    small = {"num_trajectories": 2, "trajectory_batch": 2, "substeps": 2, "iters": 2, "warmup": 0, "lr": 0.05,
             "precision": "fp32", "cache_dir": str(tmp_path / "traj"), "sample_every": 0, "checkpoint_every": 1}
    plan = rep.Plan("sdxl", (rep.DistillStep("rapm", "rapm", small),),
                    (rep.EvalStep("rapm", 4, trained=True), rep.EvalStep("teacher", 2)),
                    num_images=12, grid_prompts=0, protocol=rehearsal_protocol)
    monkeypatch.setattr(rep, "make_plan", lambda preset, quick=False, seeds=1: plan)
    args = ["reproduce", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--prompts", str(prompts),
            "--data-dir", str(cache), "--inception", str(inception), "--clip-checkpoint", str(checkpoint),
            "--device", "cpu", "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    with pytest.warns(UserWarning, match="unreliable"):  # 12 images, 2048-d features
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "res" / "trained" / f"rapm-4step-{rehearsal_protocol}.json").read_text())
    assert ours["preset"] == "sdxl" and ours["num_images"] == 12
    assert ours["lora"]["path"].endswith("runs/rapm/lora.safetensors")
    assert (tmp_path / "res" / f"teacher-2step-{rehearsal_protocol}.json").is_file()
    table = (tmp_path / "res" / "table.md").read_text()
    assert "reported: RAPM README" in table and "| rapm | 4 |" in table
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 steps run" in again.output
