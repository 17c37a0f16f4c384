"""Tables and the drift check over result JSONs (no generation needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_check_refuses_a_result_from_another_protocol(tmp_path):
    base = fake_result(tmp_path / "base", "teacher", 4, 12.5, 28.1)
    other = fake_result(tmp_path / "other", "teacher", 4, 12.5, 28.1, protocol_hash="fff000fff000")
    result = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(other)])
    assert result.exit_code == 2
    assert "not comparable" in result.output


@pytest.mark.e2e
def test_bad_result_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["check", "--baseline", str(bad), "--results", str(bad)])
    assert result.exit_code == 2
    assert "not valid JSON" in result.output


@pytest.mark.e2e
def test_plot_writes_pngs(tmp_path):
    """FID vs steps and FID vs CLIP from results (the sample grid needs generation: see test_eval_engine)."""
    fake_result(tmp_path / "res", "teacher", 4, 12.5, 28.1)
    fake_result(tmp_path / "res", "teacher", 50, 3.25, 30.2)
    result = CliRunner().invoke(app, ["plot", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "p"),
                                      "--grid-prompts", "0"])
    assert result.exit_code == 0, result.output
    for name in ("fid_vs_steps.png", "fid_vs_clip.png"):
        assert (tmp_path / "p" / name).stat().st_size > 1000


def _with_intervals(path: Path, kid: float | None) -> Path:
    """Give a fake result the interval fields `rapm-bench eval` writes now (KID too, unless None)."""
    rec = json.loads(path.read_text())
    rec |= {"fid_ci": [rec["fid"] - 0.25, rec["fid"] + 0.25], "clip_score_ci": [rec["clip_score"] - 1,
            rec["clip_score"] + 1], "retrieval_accuracy_ci": [0.75, 0.85],
            "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95, "method": "percentile"}}
    if kid is not None:
        rec["kid"] = {"mean": kid, "std": 0.001, "subsets": 100, "subset_size": 256, "library": "torchmetrics 1.9"}
    path.write_text(json.dumps(rec))
    return path


@pytest.mark.e2e
def test_table_shows_intervals_and_kid_where_results_have_them(tmp_path):
    _with_intervals(fake_result(tmp_path / "res", "teacher", 4, 3.15, 28.1), kid=0.0123)
    fake_result(tmp_path / "res", "teacher", 8, 2.5, 28.5)  # an older result: plain numbers, no KID
    result = CliRunner().invoke(app, ["table", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| FID | KID | CLIP |" in md
    assert "| 3.15 [2.90, 3.40] | 0.0123 ± 0.0010 | 28.10 [27.10, 29.10] | 0.800 [0.750, 0.850] |" in md
    assert "| 2.50 | – | 28.50 | 0.800 |" in md


@pytest.mark.e2e
def test_check_compares_kid_and_skips_baselines_without_it(tmp_path):
    base = _with_intervals(fake_result(tmp_path / "base", "teacher", 4, 12.5, 28.1), kid=0.050)
    near = _with_intervals(fake_result(tmp_path / "near", "teacher", 4, 12.5, 28.1), kid=0.052)
    far = _with_intervals(fake_result(tmp_path / "far", "teacher", 4, 12.5, 28.1), kid=0.070)
    ok = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(near)])
    assert ok.exit_code == 0, ok.output
    assert "| teacher 4-step | kid | 0.0500 | 0.0520 | +0.0020 | 0.005 | ok |" in ok.output
    bad = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(far)])
    assert bad.exit_code == 1 and "| kid |" in bad.output and "DRIFT" in bad.output
    loose = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(far), "--kid-tol", "0.03"])
    assert loose.exit_code == 0, loose.output
    old = fake_result(tmp_path / "old", "teacher", 4, 12.5, 28.1)
    skipped = CliRunner().invoke(app, ["check", "--baseline", str(old), "--results", str(far)])
    assert skipped.exit_code == 0, skipped.output
    assert "| kid |" not in skipped.output and "note: KID not compared for teacher 4-step" in skipped.output


def test_fid_vs_steps_draws_error_bars_from_fid_ci(tmp_path, monkeypatch):
    from rapm_bench.report import plots

    _with_intervals(fake_result(tmp_path / "res", "teacher", 4, 12.5, 28.1), kid=None)
    fake_result(tmp_path / "res", "teacher", 8, 9.0, 28.1)  # no interval: a point without a bar
    drawn = []
    real = plots._pyplot

    def spy():
        plt = real()
        orig = plt.Axes.errorbar
        monkeypatch.setattr(plt.Axes, "errorbar", lambda ax, *a, **k: drawn.append((a, k)) or orig(ax, *a, **k))
        return plt

    monkeypatch.setattr(plots, "_pyplot", spy)
    plots.fid_vs_steps(plots.read_results([tmp_path / "res"]), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    (xs, ys), kwargs = drawn[0]
    assert xs == [4] and ys == [12.5] and kwargs["yerr"] == [[0.25], [0.25]]
