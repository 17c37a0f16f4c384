"""Tables and the drift check over result JSONs (no generation needed)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from rapm_bench.cli import app


def fake_result(folder: Path, model: str, steps: int, fid: float, clip: float, protocol_hash: str = "abc123def456",
                name: str | None = None) -> Path:
    """A result record shaped like `rapm-bench eval`'s output."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"model": model, "steps": steps, "guidance": 1.0, "preset": "tiny", "protocol": "tiny",
           "protocol_hash": protocol_hash, "num_images": 256, "fid": fid, "clip_score": clip,
           "retrieval_accuracy": 0.8, "images_per_second": 100.0, "device": "cpu", "seed": 0}
    path = folder / (name or f"{model}-{steps}step-tiny.json")
    path.write_text(json.dumps(rec))
    return path


def test_table_writes_three_formats_with_reported_rows_for_sdxl(tmp_path):
    fake_result(tmp_path / "res", "teacher", 4, 12.5, 28.1)
    fake_result(tmp_path / "res", "teacher", 50, 3.25, 30.2)
    result = CliRunner().invoke(app, ["table", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| measured | teacher | 4 |" in md and "12.50" in md and "3.25" in md
    assert (tmp_path / "t" / "table.csv").read_text().startswith("source,model,steps")
    assert r"\toprule" in (tmp_path / "t" / "table.tex").read_text()
    assert "reported" not in md  # tiny has no published numbers
    fake = tmp_path / "sdxl"
    fake.mkdir()
    p = fake_result(fake, "rapm", 4, 20.0, 30.0)
    rec = json.loads(p.read_text()) | {"preset": "sdxl", "protocol": "coco30k"}
    p.write_text(json.dumps(rec))
    result = CliRunner().invoke(app, ["table", "--preset", "sdxl", "--results", str(fake), "--out", str(fake)])
    assert result.exit_code == 0, result.output
    assert "reported: RAPM README" in result.output and "19.21" in result.output and "22.84" in result.output


def test_check_passes_within_tolerance_and_fails_past_it(tmp_path):
    base = fake_result(tmp_path / "base", "teacher", 4, 12.5, 28.1)
    near = fake_result(tmp_path / "near", "teacher", 4, 12.7, 28.0)
    far = fake_result(tmp_path / "far", "teacher", 4, 14.0, 28.1)
    ok = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(near)])
    assert ok.exit_code == 0, ok.output
    assert "| teacher 4-step | fid | 12.5000 | 12.7000 | +0.2000 | 0.5 | ok |" in ok.output
    bad = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(far)])
    assert bad.exit_code == 1
    assert "DRIFT" in bad.output
    tight = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(near), "--fid-tol", "0.1"])
    assert tight.exit_code == 1


def test_check_refuses_a_result_from_another_protocol(tmp_path):
    base = fake_result(tmp_path / "base", "teacher", 4, 12.5, 28.1)
    other = fake_result(tmp_path / "other", "teacher", 4, 12.5, 28.1, protocol_hash="fff000fff000")
    result = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(other)])
    assert result.exit_code == 2
    assert "not comparable" in result.output


def test_bad_result_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["check", "--baseline", str(bad), "--results", str(bad)])
    assert result.exit_code == 2
    assert "not valid JSON" in result.output


def test_plot_writes_pngs(tmp_path):
    """FID vs steps and FID vs CLIP from results (the sample grid needs generation: see test_eval_engine)."""
    fake_result(tmp_path / "res", "teacher", 4, 12.5, 28.1)
    fake_result(tmp_path / "res", "teacher", 50, 3.25, 30.2)
    result = CliRunner().invoke(app, ["plot", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "p"),
                                      "--grid-prompts", "0"])
    assert result.exit_code == 0, result.output
    for name in ("fid_vs_steps.png", "fid_vs_clip.png"):
        assert (tmp_path / "p" / name).stat().st_size > 1000
