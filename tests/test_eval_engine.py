"""`rapm-bench eval` on the tiny world: provenance, warnings, sharding across processes, the CI drift guard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.cli import app

pytestmark = pytest.mark.e2e  # `eval`, `check`, `plot` end to end

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("model", "steps", "guidance", "preset", "protocol", "protocol_hash", "num_images", "fid", "clip_score",
          "seconds", "images_per_second", "device", "versions", "git_commit", "seed", "retrieval_accuracy", "timing")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private reference-statistics cache (computed once from real renders)."""
    return tmp_path_factory.mktemp("cache")


def run_eval(out: Path, cache: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["eval", "--out", str(out), "--data-dir", str(cache), "--device", "cpu",
                                      "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def test_eval_writes_a_result_with_provenance(tmp_path, cache):
    rec = run_eval(tmp_path, cache, "--model", "teacher", "--steps", "1", "--num-images", "136")
    for key in FIELDS:
        assert key in rec, key
    assert rec["protocol"] == "tiny" and rec["num_images"] == 136 and rec["guidance"] == 3.0
    assert rec["fid"] > 0 and 0 < rec["clip_score"] <= 100 and 0 <= rec["retrieval_accuracy"] <= 1
    assert rec["fid_reliable"] is True
    timing = rec["timing"]
    assert timing["processes"] == 1 and timing["load_s"] > 0 and timing["loop_s"] == rec["seconds"] > 0
    assert timing["images_per_s"] == pytest.approx(136 / timing["loop_s"])
    # the loop's first group (64 images) apart, the steady rate of the 72 after it, and its phases
    assert timing["first_group_images"] == 64 and 0 < timing["first_group_s"] < timing["loop_s"]
    assert 0 < timing["tail_s"] < timing["loop_s"] - timing["first_group_s"]  # the last group's scoring, once
    steady_s = timing["loop_s"] - timing["first_group_s"] - timing["tail_s"]
    assert timing["steady_images_per_s"] == pytest.approx(72 / steady_s)
    phases = [timing["generate_s"], timing["score_s"]]  # this thread's; the worker prepared beside generation
    assert phases[0] > 0 and phases[1] > 0 and sum(phases) <= timing["loop_s"]
    # each group but the last scored between the next group's UNet calls once its inputs were ready, else after it
    assert timing["overlap_scoring"] is True and 0 <= timing["groups_scored_beside"] <= 2
    assert 0 < timing["prepare_s"] < timing["loop_s"]
    assert timing["compiled_blocks"] is False  # the CPU
    on_disk = json.loads((tmp_path / "teacher-1step-tiny.json").read_text())
    assert on_disk["fid"] == rec["fid"]


def test_few_images_warn_and_give_a_number_not_nan(tmp_path, cache):
    with pytest.warns(UserWarning, match="unreliable"):
        rec = run_eval(tmp_path, cache, "--model", "teacher", "--steps", "1", "--num-images", "40")
    assert rec["fid_reliable"] is False
    assert rec["fid"] == rec["fid"]  # not NaN


def test_two_processes_give_the_same_scores(tmp_path, cache):
    """torchrun with 2 CPU processes shards by groups of 64 and merges float64 sums exactly."""
    one = run_eval(tmp_path / "one", cache, "--model", "teacher", "--steps", "1", "--num-images", "160")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rapm_bench.cli", "eval",
         "--model", "teacher", "--steps", "1", "--num-images", "160", "--out", str(tmp_path / "two"),
         "--data-dir", str(cache), "--device", "cpu"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "teacher-1step-tiny.json").read_text())
    assert abs(two["fid"] - one["fid"]) <= 1e-6 * one["fid"]
    assert abs(two["clip_score"] - one["clip_score"]) <= 1e-9 * one["clip_score"]
    assert two["retrieval_accuracy"] == one["retrieval_accuracy"]
    for key in ("fid_ci", "clip_score_ci", "retrieval_accuracy_ci"):  # per-image rows placed exactly
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    assert two["kid"]["mean"] == pytest.approx(one["kid"]["mean"], rel=1e-9)
    assert two["timing"]["processes"] == 2 and one["timing"]["processes"] == 1


def test_eval_bad_input(tmp_path, cache):
    for args, needle in [(["--model", "teacher", "--num-images", "999999"], "more than the"),
                         (["--model", "nope"], "unknown model"),
                         (["--model", "rapm", "--steps", "3"], "ships 4-step"),
                         (["--protocol", "nope"], "unknown protocol")]:
        result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "o"), "--data-dir", str(cache), *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output
        assert not (tmp_path / "o").exists()


CI_BASELINES = ROOT / "results" / "tiny" / "ci"


def test_ci_baseline_folder_is_the_files_checked_one_by_one():
    """`check --baseline results/tiny/ci` reads exactly the files the test below reruns one at a time."""
    from rapm_bench.report.results import read_results

    from_folder = sorted(json.dumps(r, sort_keys=True) for r in read_results([CI_BASELINES]))
    from_files = sorted(json.dumps(r, sort_keys=True) for r in read_results(sorted(CI_BASELINES.glob("*.json"))))
    assert from_folder == from_files and len(from_files) >= 2


@pytest.mark.parametrize("baseline", sorted(p.name for p in CI_BASELINES.glob("*.json")))
def test_committed_ci_baselines_still_hold(baseline):
    """The CI drift guard: rerun each committed tiny baseline on the CPU within tolerance (one test a file: the
    two 256-image reruns took ~170 s in one test on 2 idle cores)."""
    result = CliRunner().invoke(app, ["check", "--baseline", str(CI_BASELINES / baseline), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "DRIFT" not in result.output and "| ok |" in result.output


def test_plot_sample_grid_from_real_results(tmp_path, cache):
    """The side-by-side grid regenerates each evaluated model on the same captions and seeds."""
    run_eval(tmp_path, cache, "--model", "teacher", "--steps", "1", "--num-images", "130")
    result = CliRunner().invoke(app, ["plot", "--results", str(tmp_path), "--out", str(tmp_path / "p"),
                                      "--grid-prompts", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "samples.png").stat().st_size > 1000
