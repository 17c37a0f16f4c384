"""The SDXL evaluation path end to end, offline: synthetic COCO, random-weight SDXL, stand-in extractors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.cli import app

pytestmark = pytest.mark.e2e  # `data coco` then `eval` on the SDXL path


def test_data_then_eval_on_the_sdxl_path(tmp_path, tiny_sdxl, prepared_coco, clip_checkpoint,
                                        rehearsal_protocol):
    inception, cache = prepared_coco
    with pytest.warns(UserWarning, match="unreliable"):  # 12 images, 2048-d features
        result = CliRunner().invoke(app, [
            "eval", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--model", "teacher", "--steps", "2",
            "--protocol", rehearsal_protocol, "--data-dir", str(cache), "--inception", str(inception),
            "--clip-checkpoint", str(clip_checkpoint), "--device", "cpu", "--out", str(tmp_path / "res"), "--json"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.output[result.output.index("{"):])
    assert rec["protocol"] == rehearsal_protocol and rec["num_images"] == 12 and rec["preset"] == "sdxl"
    assert rec["fid"] == rec["fid"] and rec["fid"] > 0 and rec["fid_reliable"] is False
    assert -100 <= rec["clip_score"] <= 100 and rec["retrieval_accuracy"] is None
    assert rec["guidance"] == 5.0 and rec["world"]["resolution"] == 32
    assert Path(rec["path"]).is_file()


def test_eval_without_prepared_data_says_what_to_run(tmp_path, tiny_sdxl):
    result = CliRunner().invoke(app, ["eval", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--model", "teacher",
                                      "--data-dir", str(tmp_path), "--out", str(tmp_path / "res")])
    assert result.exit_code == 2
    assert "rapm-bench data coco" in result.output
    assert not (tmp_path / "res").exists()
