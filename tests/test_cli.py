"""The command line: every command exists with help; bad input gives one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.cli import app

COMMANDS = ["distill", "generate", "eval", "table", "plot", "check", "reproduce", "bench"]


def test_help_lists_all_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "--preset" in result.output


@pytest.mark.parametrize(("name", "flag"), [("scaling", "--gpus"), ("ablation", "--num-images")])
def test_pass_through_commands_show_their_flags(name, flag):
    """`rapm-bench scaling` and `rapm-bench ablation` hand their arguments, --help included, to the module's
    own parser (`python -m rapm_bench.scaling`, `python -m rapm_bench.distill.ablation`)."""
    assert name in CliRunner().invoke(app, ["--help"]).output
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert flag in result.output


def test_scaling_command_passes_bad_input_to_its_parser():
    result = CliRunner().invoke(app, ["scaling", "--gpus", "2", "--small"])
    assert result.exit_code == 2 and "must start at 1" in result.output


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed entry point in a subprocess: what a user sees, traceback or not."""
    return subprocess.run([sys.executable, "-m", "rapm_bench.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("rapm-bench: error:") and needle in lines[0], lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--preset", "sdxl", "--prompts", "{tmp}/two.txt", "--teacher", "{tmp}/no-such-model"], "does not exist"),
        (["--preset", "sdxl", "--prompts", "{tmp}/two.txt", "--teacher", "{tmp}"], "no model_index.json"),
        (["--model", "no-such-model"], "unknown model"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--prompts", "{tmp}/empty.txt"], "holds no captions"),
        (["--prompts", "{tmp}/latin1.txt"], "not UTF-8"),
        (["--prompts", "{tmp}/missing.txt"], "prompt file not found"),
        (["--preset", "nope"], "unknown preset"),
        (["--model", "rapm", "--steps", "2"], "ships 4-step weights only"),
        (["--guidance", "-1"], "--guidance must be between"),
        (["--prompts", "{tmp}/two.txt", "--num-images", "5"], "more than the 2 captions"),
    ],
    ids=["missing-folder", "not-a-pipeline", "unknown-model", "steps-0", "empty-prompts", "non-utf8",
         "missing-prompts", "unknown-preset", "unshipped-steps", "bad-guidance", "too-many-images"],
)
def test_generate_bad_input(tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "two.txt").write_text("a cat\na dog\n")
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_cli("generate", "--out", str(out), *args, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert not out.exists(), "bad input must leave no output folder behind"


@pytest.mark.e2e
def test_out_folder_of_another_run_is_refused(tmp_path, tiny_sdxl):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("not ours")
    proc = run_cli("generate", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--prompts", str(prompts),
                   "--out", str(out), "--device", "cpu", "--steps", "2", cwd=tmp_path)
    assert_one_line_error(proc, "holds another run's files")


def test_dry_run_prints_resolved_config(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--model", "rapm", "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert '"steps": 4' in result.output and '"guidance": 1.0' in result.output
    assert not (tmp_path / "o").exists()
