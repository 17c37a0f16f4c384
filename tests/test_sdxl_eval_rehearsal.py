"""The SDXL evaluation path end to end, offline: synthetic COCO, random-weight SDXL, stand-in extractors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_clip_score import MODEL
from test_clip_score import checkpoint as checkpoint  # noqa: F401 - a fixture
from test_coco import coco as coco  # noqa: F401 - a fixture
from test_fid_agreement import _FakeTorchscriptInception
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.eval import protocols


@pytest.fixture()
def rehearsal_protocol(monkeypatch: pytest.MonkeyPatch) -> str:
    """coco30k at 12 pairs, 32-px generation, with the small test CLIP in ViT-g-14's place."""
    proto = dataclasses.replace(protocols.get_protocol("coco30k"), name="coco-rehearsal", num_pairs=12,
                                generation_resolution=32, clip_model=MODEL, clip_pretrained=None)
    monkeypatch.setitem(protocols.PROTOCOLS, proto.name, proto)
    return proto.name


@pytest.fixture()
def prepared_coco(tmp_path: Path, coco: tuple[Path, Path], rehearsal_protocol: str) -> tuple[Path, Path]:  # noqa: F811
    """(stand-in Inception file, data cache) after `rapm-bench data coco` on the synthetic COCO set."""
    annotations, images = coco
    torch.manual_seed(0)
    inception = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeTorchscriptInception()).save(str(inception))
    cache = tmp_path / "cache"
    prep = CliRunner().invoke(app, ["data", "coco", "--protocol", rehearsal_protocol, "--annotations",
                                    str(annotations), "--images", str(images), "--cache-dir", str(cache),
                                    "--inception", str(inception), "--device", "cpu"])
    assert prep.exit_code == 0, prep.output
    return inception, cache


def test_data_then_eval_on_the_sdxl_path(tmp_path, tiny_sdxl, prepared_coco, checkpoint,  # noqa: F811
                                        rehearsal_protocol):
    inception, cache = prepared_coco
    with pytest.warns(UserWarning, match="unreliable"):  # 12 images, 2048-d features
        result = CliRunner().invoke(app, [
            "eval", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--model", "teacher", "--steps", "2",
            "--protocol", rehearsal_protocol, "--data-dir", str(cache), "--inception", str(inception),
            "--clip-checkpoint", str(checkpoint), "--device", "cpu", "--out", str(tmp_path / "res"), "--json"])
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
