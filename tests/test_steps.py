"""Students at N = 1, 2 steps: one engine trains each objective for N, the LoRA records N and its sampler,
`eval --model lora:PATH` samples it at N and refuses another N in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.distill import tiny_cfg
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.distill.schedule import trailing_timesteps
from rapm_bench.models import read_trained_record


@pytest.fixture(scope="module")
def students(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """Seconds-long 1- and 2-step distillations of every objective on the random tiny teacher."""
    from rapm_bench.distill.engine import distill

    root = tmp_path_factory.mktemp("steps")
    out = {}
    for objective in ("rapm", "pcm", "dmd2"):
        for n in (1, 2):
            cfg = tiny_cfg(teacher, root / f"{objective}-{n}", objective=objective, slots=n, iters=3,
                           checkpoint_every=3, cache_dir=str(root / "cache"))
            summary = distill(cfg, progress=False)
            assert summary is not None and summary["sampler"]["steps"] == n
            out[(objective, n)] = Path(summary["lora"]["path"])
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("objective", ["rapm", "pcm", "dmd2"])
@pytest.mark.parametrize("n", [1, 2])
def test_lora_records_its_steps_and_sampler(students, objective, n):
    """The safetensors header says N, the objective and its sampler (DMD2: LCM at the trailing boundaries)."""
    record = read_trained_record(students[(objective, n)])
    assert record is not None and record["steps"] == n and record["objective"] == objective
    if objective == "dmd2":
        assert record["sampler"]["scheduler"] == "lcm" and record["sampler"]["timesteps"] == trailing_timesteps(n)
        assert record["guidance"] == 0.0
    else:
        assert record["sampler"]["scheduler"] == "ddim" and record["guidance"] == 1.0
    if n == 1:
        assert trailing_timesteps(1) == [999]  # DMD2's 1-step generator: t = 999 only


def _eval(args: list[str], teacher: Path, out: Path) -> tuple[int, str]:
    """`rapm-bench eval` on the random teacher with 8 images; (exit code, output)."""
    result = CliRunner().invoke(app, ["eval", "--teacher", str(teacher), "--device", "cpu", "--num-images", "8",
                                      "--out", str(out), *args])
    return result.exit_code, result.output


@pytest.mark.e2e
@pytest.mark.parametrize("objective", ["rapm", "dmd2"])
def test_eval_samples_a_lora_at_its_steps(students, teacher, tmp_path, objective):
    """`eval --model lora:PATH` takes N and the sampler from the file; `--model dmd2 --lora` at N = 1 too."""
    lora = students[(objective, 1)]
    code, output = _eval(["--model", f"lora:{lora}", "--json"], teacher, tmp_path / "a")
    assert code == 0, output
    result = json.loads(output[output.index("{"):])
    assert result["steps"] == 1
    assert result["sampler"]["scheduler"] == ("lcm" if objective == "dmd2" else "ddim")
    if objective == "dmd2":
        code, output = _eval(["--model", "dmd2", "--lora", str(lora), "--steps", "1"], teacher, tmp_path / "b")
        assert code == 0, output
        assert (tmp_path / "b" / "dmd2-1step-tiny.json").is_file()


@pytest.mark.e2e
def test_eval_refuses_another_step_count(students, teacher, tmp_path):
    """A LoRA trained for 2 steps sampled at 4: one line naming both, exit 2, nothing written."""
    lora = students[("pcm", 2)]
    for args in (["--model", f"lora:{lora}", "--steps", "4"], ["--model", "pcm", "--lora", str(lora), "--steps", "4"]):
        code, output = _eval(args, teacher, tmp_path / "x")
        assert code == 2, output
        assert "trained for 2-step sampling" in output and "--steps 2" in output
        assert len(output.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()


def test_distill_steps_bad_input(tmp_path):
    """--steps 0, a step count with fewer timesteps per slot than --M, and --steps/--slots disagreeing."""
    for args, match in ((["--steps", "0"], "--steps must be at least 1"),
                        (["--steps", "300", "--M", "4"], "--steps 300 leaves 3 timesteps per slot"),
                        (["--steps", "2", "--slots", "4"], "disagree")):
        result = CliRunner().invoke(app, ["distill", "--dry-run", "--out", str(tmp_path / "r"), *args])
        assert result.exit_code == 2 and match in result.output, result.output
    result = CliRunner().invoke(app, ["distill", "--dry-run", "--steps", "2"])
    assert result.exit_code == 0 and json.loads(result.output)["slots"] == 2
