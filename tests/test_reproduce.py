"""`rapm-bench reproduce`: the plan, a small tiny run end to end (twice: the second reuses everything),
and the SDXL path rehearsed offline with a random-weight pipeline and synthetic COCO."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench import reproduce as rep
from rapm_bench.cli import app

SMALL = {"num_trajectories": 4, "trajectory_batch": 4, "iters": 3, "warmup": 1, "checkpoint_every": 2,
         "log_every": 1, "sample_every": 0, "sample_count": 2}


def small_tiny_plan(objectives: tuple[str, ...], seeds: int = 1) -> rep.Plan:
    """The tiny plan's shape at a CPU-test size: the objectives at 1 step over `seeds` seeds, RAPM at 2 steps."""
    distills = (*(rep.DistillStep(m, m, SMALL | {"slots": 1} | ({"seed": s} if s else {}), s, 1)
                  for s in range(seeds) for m in objectives),
                rep.DistillStep("rapm", "rapm", SMALL | {"slots": 2}, 0, 2))
    return rep.Plan("tiny", distills,
                    (rep.EvalStep("teacher", 1),
                     *(rep.EvalStep(d.model, d.steps, trained=True, seed=d.seed) for d in distills)),
                    num_images=130, grid_prompts=2)


@pytest.mark.e2e
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


def test_seeds_and_steps_extend_the_tiny_plan_only():
    plan = rep.make_plan("tiny", seeds=3)
    assert [d.key for d in plan.distills][:4] == ["rapm-1step", "pcm-1step", "dmd2-1step", "rapm-1step-seed1"]
    assert len({d.key for d in plan.distills}) == 18 and {d.overrides.get("seed", 0) for d in plan.distills} == {0, 1, 2}
    assert sum(e.trained for e in plan.evals) == 18
    cfgs = rep.distill_configs(rep.ReproduceConfig(seeds=3), plan, Path("runs"))
    assert cfgs["pcm-seed2"].seed == 2 and cfgs["pcm-seed2"].out == str(Path("runs") / "pcm-seed2")
    assert cfgs["pcm-seed2"].slots == 4 and cfgs["pcm-1step-seed2"].slots == 1
    assert cfgs["pcm-seed2"].trajectory_seed == cfgs["pcm"].trajectory_seed  # one trajectory cache for all seeds
    sweep = rep.make_plan("tiny", sweep=True)
    assert sorted({d.steps for d in sweep.distills}) == [1, 2, 4, 8]
    assert [e.steps for e in sweep.evals if e.model == "teacher"] == [1, 2, 4, 8, 16, 50]
    assert {d.steps for d in rep.make_plan("tiny", steps=(2,)).distills} == {2}
    for preset, kw, needle in (("tiny", {"seeds": 0}, "at least 1"), ("sdxl", {"seeds": 2}, "tiny preset"),
                               ("sdxl", {"sweep": True}, "tiny preset"), ("tiny", {"steps": (0,)}, "at least 1")):
        with pytest.raises(rep.UserError, match=needle):
            rep.make_plan(preset, **kw)


def test_welch_verdicts():
    """Welch's t over seeds: a clear gap differs, overlapping seeds are within noise, one seed has no test."""
    from rapm_bench.report.comparison import welch

    assert welch([3.0, 3.1, 3.2], [5.0, 5.1, 5.2])["verdict"] == "differs"
    near = welch([3.0, 3.3, 3.1], [3.1, 3.2, 3.0])
    assert near["verdict"].startswith("within seed noise") and "too few seeds" in near["verdict"] and near["p"] > 0.05
    assert welch([3.0], [4.0])["p"] is None and "one seed" in welch([3.0], [4.0])["verdict"]


@pytest.mark.e2e
def test_tiny_reproduce_runs_then_reuses_everything(tmp_path, monkeypatch):
    """Two methods at two training seeds and 1 step, RAPM at 2 steps: the table (seed 0), the comparison per step
    count with Welch verdicts, per-step sample grids, then a rerun that runs nothing."""
    monkeypatch.setattr(rep, "make_plan", lambda preset, quick=False, seeds=1, steps=None, sweep=False:
                        small_tiny_plan(("rapm", "pcm"), seeds))
    cfg = rep.ReproduceConfig(out=str(tmp_path / "res"), runs=str(tmp_path / "runs"), device="cpu", seeds=2)
    first = rep.reproduce(cfg, echo=lambda *_: None)
    assert first["ran"] == ["distill rapm-1step", "distill pcm-1step", "distill rapm-1step-seed1",
                            "distill pcm-1step-seed1", "distill rapm-2step", "eval teacher 1", "eval rapm 1", "eval pcm 1",
                            "eval rapm-seed1 1", "eval pcm-seed1 1", "eval rapm 2"]
    res = tmp_path / "res"
    for name in ("table.md", "table.csv", "fid_vs_steps.png", "fid_vs_clip.png", "samples.png", "comparison.md",
                 "comparison.png", "samples-1step.png", "samples-2step.png", "rapm-1step-tiny.json",
                 "rapm-2step-tiny.json", "teacher-1step-tiny.json"):
        assert (res / name).is_file(), name
    rec = json.loads((res / "rapm-1step-tiny.json").read_text())
    assert rec["lora"]["path"].endswith("runs/rapm-1step/lora.safetensors")  # the LoRA trained here
    assert rec["steps"] == 1 and json.loads((res / "rapm-2step-tiny.json").read_text())["steps"] == 2
    table = (res / "table.md").read_text()
    assert "| rapm | 1 |" in table and "| rapm | 2 |" in table and "| teacher | 1 |" in table
    seed1 = json.loads((res / "seeds" / "seed1" / "pcm-1step-tiny.json").read_text())
    assert seed1["lora"]["path"].endswith("runs/pcm-1step-seed1/lora.safetensors")
    comp = json.loads((res / "comparison.json").read_text())
    assert set(comp["by_steps"]) == {"1", "2"} and comp["num_images"] == 130 and comp["seeds"] == 2
    one = comp["by_steps"]["1"]
    assert set(one["methods"]) == {"rapm", "pcm"} and set(comp["by_steps"]["2"]["methods"]) == {"rapm"}
    pcm = one["methods"]["pcm"]
    assert [r["seed"] for r in pcm["runs"]] == [0, 1] and pcm["runs"][1]["fid"] == seed1["fid"]
    fids = [r["fid"] for r in pcm["runs"]]
    assert pcm["fid"]["mean"] == pytest.approx(sum(fids) / 2) and pcm["fid"]["sd"] == pytest.approx(abs(fids[0] - fids[1]) / 2 ** 0.5)
    assert fids[0] != fids[1]  # another training seed trains another student
    pairs = {(p["a"], p["b"], p["metric"]) for p in one["pairs"]}
    assert ("rapm", "pcm", "fid") in pairs and all(p["p"] is not None for p in one["pairs"] if p["metric"] == "fid")
    md = (res / "comparison.md").read_text()
    assert "## 1 step" in md and "| pcm | 2 |" in md and "rapm vs pcm | FID" in md and "Welch" in md
    assert "seed1" not in (res / "table.md").read_text()  # the table holds seed 0's rows only
    assert rep.reproduce(cfg, echo=lambda *_: None)["ran"] == []
    assert json.loads((res / "rapm-1step-tiny.json").read_text())["created"] == rec["created"]
    before = (res / "comparison.md").read_bytes()  # a one-seed run reuses seed 0 and keeps the K-seed comparison
    assert rep.reproduce(replace(cfg, seeds=1), echo=lambda *_: None)["ran"] == []
    assert (res / "comparison.md").read_bytes() == before


@pytest.mark.e2e
def test_sdxl_reproduce_rehearsed_offline(tmp_path, monkeypatch, tiny_sdxl, prepared_coco,
                                          clip_checkpoint, rehearsal_protocol):
    inception, cache = prepared_coco
    prompts = tmp_path / "train_captions.txt"
    prompts.write_text("a dog on a beach\na bowl of soup\n")
    small = {"num_trajectories": 2, "trajectory_batch": 2, "substeps": 2, "iters": 2, "warmup": 0, "lr": 0.05,
             "precision": "fp32", "cache_dir": str(tmp_path / "traj"), "sample_every": 0, "checkpoint_every": 1}
    plan = rep.Plan("sdxl", (rep.DistillStep("rapm", "rapm", small),),
                    (rep.EvalStep("rapm", 4, trained=True), rep.EvalStep("teacher", 2)),
                    num_images=12, grid_prompts=0, protocol=rehearsal_protocol)
    monkeypatch.setattr(rep, "make_plan", lambda preset, quick=False, seeds=1, steps=None, sweep=False: plan)
    args = ["reproduce", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--prompts", str(prompts),
            "--data-dir", str(cache), "--inception", str(inception), "--clip-checkpoint", str(clip_checkpoint),
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
