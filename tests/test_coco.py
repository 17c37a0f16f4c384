"""COCO pairs and reference statistics on a synthetic captions_val2014.json with a few small JPEGs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.coco import N_IMAGES, coco_file_name
from PIL import Image

from rapm_bench.errors import UserError
from rapm_bench.eval.coco import (
    build_pairs,
    features_path,
    load_pairs,
    load_reference_features,
    load_reference_stats,
    pairs_path,
    prepare_coco,
    stats_path,
)
from rapm_bench.eval.features import eval_preprocess
from rapm_bench.eval.fid import FeatureStats
from rapm_bench.eval.protocols import get_protocol


def _proto(name: str, n: int):
    return dataclasses.replace(get_protocol(name), num_pairs=n)


class MeanPool:
    """A deterministic 48-d feature extractor: 4×4 average pooling of the float image."""

    name, dim, weights_sha256 = "meanpool", 48, "0123456789abcdef"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def test_coco30k_pairs_deterministic_one_caption_per_image(coco: tuple[Path, Path]) -> None:
    ann, _ = coco
    pairs = build_pairs(ann, _proto("coco30k", 12))
    assert pairs == build_pairs(ann, _proto("coco30k", 12))
    assert len(pairs) == 12 and len({p.image_id for p in pairs}) == 12
    data = json.loads(ann.read_text())
    captions = {}
    for a in data["annotations"]:
        captions.setdefault(a["image_id"], set()).add(" ".join(a["caption"].split()))
    for p in pairs:
        assert p.file_name == coco_file_name(p.image_id) and p.caption in captions[p.image_id]
    assert build_pairs(ann, _proto("coco30k", 5)) == pairs[:5]  # the first K pairs are the same for any N
    reseeded = build_pairs(ann, dataclasses.replace(_proto("coco30k", 12), caption_seed=7))
    assert [p.image_id for p in reseeded] != [p.image_id for p in pairs]
    assert build_pairs(ann.parent.parent, _proto("coco30k", 12)) == pairs  # the folder holding the file works too


def test_dmd2_pairs_equal_the_pandas_recipe(coco: tuple[Path, Path]) -> None:
    import pandas as pd

    ann, _ = coco
    # DMD2's main/sdxl/data_process.py, as docs/reference.md describes it (global seed, N = 10 here)
    data = json.load(open(ann))
    np.random.seed(123)
    df = pd.DataFrame(data["images"])
    df = df.merge(pd.DataFrame(data["annotations"]), how="left", left_on="id", right_on="image_id")
    df = df[["file_name", "caption"]]
    df = df.sample(frac=1)
    df = df.drop_duplicates(subset="file_name")
    df_sample = df.sample(10)
    expected = list(zip(df_sample["file_name"], df_sample["caption"], strict=True))

    pairs = build_pairs(ann, _proto("dmd2-coco10k", 10))
    assert [(p.file_name, p.caption) for p in pairs] == expected
    assert all(p.file_name == coco_file_name(p.image_id) for p in pairs)
    assert pairs[0].caption.endswith(" \n")  # DMD2 keeps captions untouched


@pytest.mark.e2e
def test_prepare_coco_writes_pairs_and_stats_then_reuses(coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, img_dir = coco
    protocol = dataclasses.replace(_proto("dmd2-coco10k", 10), eval_resolution=32)
    cache = tmp_path / "cache"
    extractor = MeanPool()
    out = prepare_coco(ann, img_dir, protocol, cache, extractor, batch_size=4, progress=False)
    assert out == stats_path(cache, protocol, extractor.weights_sha256)
    assert protocol.hash() in out.name and "0123456789ab" in out.name
    pairs = load_pairs(pairs_path(cache, protocol))
    assert pairs == build_pairs(ann, protocol)
    meta = json.loads(pairs_path(cache, protocol).read_text())
    assert meta["protocol_hash"] == protocol.hash() and meta["protocol"]["num_pairs"] == 10

    # the statistics equal a direct computation on the same eval images
    expected = FeatureStats()
    for p in pairs:
        with Image.open(img_dir / p.file_name) as im:
            arr = np.array(im.convert("RGB"))
        image = eval_preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous(), protocol)
        assert image.shape == (1, 3, 32, 32)
        expected.update(MeanPool()(image))
    got = load_reference_stats(out)
    assert got.count == 10
    np.testing.assert_allclose(got.mean(), expected.mean(), rtol=1e-12)
    np.testing.assert_allclose(got.cov(), expected.cov(), rtol=1e-9, atol=1e-9)
    with np.load(out) as z:
        np.testing.assert_allclose(z["mu"], expected.mean(), rtol=1e-12)
        np.testing.assert_allclose(z["sigma"], expected.cov(), rtol=1e-9, atol=1e-9)
        assert int(z["count"]) == 10

    feats = load_reference_features(features_path(cache, protocol, extractor.weights_sha256))
    assert feats.dtype == torch.float32 and feats.shape == (10, got.dim)  # per-image, for KID
    np.testing.assert_allclose(feats.double().mean(0).numpy(), expected.mean(), rtol=1e-6)

    calls = extractor.calls
    assert prepare_coco(ann, img_dir, protocol, cache, extractor, progress=False) == out
    assert extractor.calls == calls  # cache reused
    features_path(cache, protocol, extractor.weights_sha256).unlink()  # a cache made before KID: rebuilt
    assert prepare_coco(ann, img_dir, protocol, cache, extractor, progress=False) == out
    assert extractor.calls > calls and features_path(cache, protocol, extractor.weights_sha256).is_file()
    assert not list(cache.glob(".*.tmp"))


def _nothing_written(cache: Path) -> bool:
    return not cache.exists() or not any(cache.iterdir())


def test_missing_annotations(tmp_path: Path, coco: tuple[Path, Path]) -> None:
    _, img_dir = coco
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"^captions_val2014.json not found at .*nope.json: download "
                                         r"annotations_trainval2014.zip from the COCO website .*--annotations"):
        prepare_coco(tmp_path / "nope.json", img_dir, _proto("coco30k", 5), cache, MeanPool(), progress=False)
    assert _nothing_written(cache)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"images": [', "is not valid JSON"),
        ('{"images": []}', "is not a COCO captions file"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}',
         "malformed caption entry .*an instances file"),
        ('{"images": [{"id": "x"}], "annotations": []}', "malformed image entry"),
    ],
)
def test_malformed_annotations(tmp_path: Path, coco: tuple[Path, Path], content: str, message: str) -> None:
    _, img_dir = coco
    bad = tmp_path / "captions_val2014.json"
    bad.write_text(content)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=message):
        prepare_coco(bad, img_dir, _proto("coco30k", 5), cache, MeanPool(), progress=False)
    assert _nothing_written(cache)


def test_too_few_images_for_the_protocol(coco: tuple[Path, Path]) -> None:
    ann, _ = coco
    with pytest.raises(UserError, match="holds 16 captioned images, protocol coco30k needs 30000"):
        build_pairs(ann, get_protocol("coco30k"))


def test_missing_images(coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, img_dir = coco
    protocol = _proto("coco30k", N_IMAGES)
    pairs = build_pairs(ann, protocol)
    for p in pairs[3:5]:
        (img_dir / p.file_name).unlink()
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=rf"^2 images the caption list names are missing from {img_dir}, "
                                         rf"e.g. {pairs[3].file_name}: download val2014.zip"):
        prepare_coco(ann, img_dir, protocol, cache, MeanPool(), progress=False)
    assert _nothing_written(cache)
    with pytest.raises(UserError, match="val2014 images folder not found"):
        prepare_coco(ann, tmp_path / "nowhere", protocol, cache, MeanPool(), progress=False)


def test_unreadable_image(coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, img_dir = coco
    protocol = _proto("coco30k", N_IMAGES)
    victim = build_pairs(ann, protocol)[-1].file_name
    (img_dir / victim).write_bytes(b"\xff\xd8 not a jpeg")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=f"unreadable image .*{victim}"):
        prepare_coco(ann, img_dir, protocol, cache, MeanPool(), batch_size=4, progress=False)
    assert _nothing_written(cache)


def test_non_coco_protocol_refused(coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, img_dir = coco
    with pytest.raises(UserError, match="protocol tiny does not use COCO captions"):
        prepare_coco(ann, img_dir, get_protocol("tiny"), tmp_path, MeanPool(), progress=False)


@pytest.mark.e2e
def test_cli_data_coco(coco: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rapm_bench import cli_data
    from rapm_bench.eval import features

    ann, img_dir = coco
    runner = CliRunner()
    help_text = runner.invoke(cli_data.app, ["coco", "--help"]).output
    for option in ("--annotations", "--images", "--protocol", "--cache-dir", "--inception", "--batch-size", "--device"):
        assert option in help_text
    result = runner.invoke(cli_data.app, ["coco", "--annotations", str(ann), "--images", str(img_dir),
                                          "--inception", str(tmp_path / "missing.pt")])
    assert isinstance(result.exception, UserError) and "Inception weights not found" in str(result.exception)

    monkeypatch.setattr(features, "load_extractor", lambda *a, **k: MeanPool())
    monkeypatch.setattr("rapm_bench.eval.protocols.PROTOCOLS", {"coco30k": _proto("coco30k", 8)})
    result = runner.invoke(cli_data.app, ["coco", "--annotations", str(ann), "--images", str(img_dir),
                                          "--cache-dir", str(tmp_path / "c"), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert "reference statistics:" in result.output and "reference features (KID):" in result.output
    assert len(list((tmp_path / "c").iterdir())) == 3  # pairs, statistics, per-image features
