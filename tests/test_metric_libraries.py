"""A second library recomputes our scores from the same features; bootstrap intervals and KID (docs/design.md §6).

- FID: ours (clean-fid's sqrtm on float64 statistics) equals torchmetrics' `FrechetInceptionDistance`
  fed the identical float64 features through a pass-through module, and our fast eigvalsh
  path (the bootstrap's) equals clean-fid's own `frechet_distance` at the point estimate.
  Tolerance: relative 1e-8 with an absolute floor of 1e-8 (three different square roots of
  one float64 product; measured differences are ~1e-11, at 1 and 2 BLAS threads alike).
- KID: torchmetrics' `KernelInceptionDistance` equals a direct unbiased MMD² with the cubic
  polynomial kernel when one subset spans both whole sets.
- Intervals: narrow as n grows, cover the full-set value, do not depend on batch size, and
  the per-image rows placed by shards sum to the single-process tensors exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.errors import UserError
from rapm_bench.eval import intervals
from rapm_bench.eval.fid import FeatureStats, fid_from_stats

RTOL, ATOL = 1e-8, 1e-8


def _gaussian(n: int, dim: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Correlated Gaussian features (float32), one fixed mixing matrix for all sets."""
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(123), dtype=torch.float64) / dim**0.5
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((x * scale + shift) @ mix + 3.0).float()


def _stats(x: torch.Tensor) -> FeatureStats:
    s = FeatureStats(x.shape[1])
    s.update(x)
    return s


def _ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _stats(x)
    return torch.from_numpy(s.mean()), torch.from_numpy(s.cov())


def test_our_fid_equals_torchmetrics_fid_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _gaussian(600, 64, 0), _gaussian(500, 64, 1, scale=1.2, shift=0.1)
    ours = fid_from_stats(_stats(fake), _stats(real))
    metric = FrechetInceptionDistance(feature=intervals.PassThrough(64), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    theirs = metric.compute()
    assert theirs.dtype == torch.float64
    assert ours == pytest.approx(float(theirs), rel=RTOL, abs=ATOL)
    same = FrechetInceptionDistance(feature=intervals.PassThrough(64), sync_on_compute=False)
    same.update(real.double(), real=True)
    same.update(real.double(), real=False)
    assert abs(float(same.compute())) < 1e-6  # FID(x, x) ≈ 0


def test_fast_eigvalsh_fid_equals_clean_fid_at_the_point_estimate():
    from cleanfid.fid import frechet_distance

    for n, dim in ((512, 128), (300, 256)):
        real, fake = _gaussian(2 * n, dim, 2), _gaussian(n, dim, 3, scale=1.1, shift=0.05)
        mu_r, cov_r = _ref(real)
        x = fake.double().numpy()
        clean = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r.numpy(), cov_r.numpy())
        assert intervals.fid_point(fake, mu_r, cov_r) == pytest.approx(clean, rel=RTOL, abs=ATOL)


def _mmd_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³, written out directly."""
    x, y = x.double(), y.double()
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.sum() / m**2)


def test_kid_equals_a_direct_unbiased_mmd():
    real, fake = _gaussian(200, 32, 4), _gaussian(200, 32, 5, scale=1.3)
    out = intervals.kid(fake, real, subsets=1, subset_size=200)
    assert out["mean"] == pytest.approx(_mmd_unbiased(real, fake), rel=1e-10, abs=1e-12)
    assert out["std"] == 0 and out["subsets"] == 1 and out["subset_size"] == 200
    assert out["library"].startswith("torchmetrics ")
    # default settings: subset_size = min(1000, n_gen, n_ref), seeded (the global RNG left as it was)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = intervals.kid(fake, real[:150])
    assert torch.rand(1) == before
    assert a == intervals.kid(fake, real[:150]) and a["subset_size"] == 150 and a["subsets"] == 100
    assert 0 < a["std"] and abs(a["mean"] - _mmd_unbiased(real[:150], fake[:150])) < 5 * a["std"] + 0.05


def test_fid_interval_narrows_with_more_images_and_covers_the_full_set_value():
    real = _gaussian(4000, 32, 6)
    mu_r, cov_r = _ref(real)
    widths = []
    for n in (200, 800, 3200):
        fake = _gaussian(n, 32, 7, scale=1.2, shift=0.1)
        out = intervals.bootstrap(fake, torch.rand(n, dtype=torch.float64), None, mu_r, cov_r, resamples=300)
        lo, hi = out["fid_ci"]
        point = fid_from_stats(_stats(fake), _stats(real))
        assert lo <= point <= hi
        widths.append(hi - lo)
        assert out["retrieval_accuracy_ci"] is None and out["bootstrap"]["resamples"] == 300
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] > 3 * widths[2]  # about 1/sqrt(n): 4x fewer images, ~2x wider


def test_mean_intervals_cover_the_mean_and_bootstrap_is_seeded():
    n = 400
    fake, real = _gaussian(n, 16, 8), _gaussian(800, 16, 9)
    mu_r, cov_r = _ref(real)
    clip = torch.rand(n, dtype=torch.float64) * 100
    hits = (torch.rand(n) < 0.7).double()
    a = intervals.bootstrap(fake, clip, hits, mu_r, cov_r)
    assert a["bootstrap"]["resamples"] == 1000 and a["bootstrap"]["seed"] == 0 and a["bootstrap"]["level"] == 0.95
    assert a["clip_score_ci"][0] < float(clip.mean()) < a["clip_score_ci"][1]
    assert a["retrieval_accuracy_ci"][0] < float(hits.mean()) < a["retrieval_accuracy_ci"][1]
    assert intervals.bootstrap(fake, clip, hits, mu_r, cov_r) == a
    assert intervals.bootstrap(fake, clip, hits, mu_r, cov_r, seed=1)["fid_ci"] != a["fid_ci"]
    assert intervals.default_resamples(30_000, 2048) == intervals.LARGE_RESAMPLES


def test_shards_placed_by_index_sum_to_the_single_process_tensors():
    """What the all-reduce does: each shard's rows at their indices, zeros elsewhere; the sum is exact (rows,
    their float64 sums and FID's running statistics)."""
    from rapm_bench.eval.engine import _score_group
    from rapm_bench.eval.metrics import CLIP_SCORES, FID_FEATURES, Accumulator

    n, dim = 150, 8
    feats, clip = torch.randn(n, dim), torch.rand(n, dtype=torch.float64)
    scorer = SimpleNamespace(feature_dim=dim, features=lambda images: feats[images[:, 0, 0, 0].long()],
                             clip_scores=lambda images, captions: clip[images[:, 0, 0, 0].long()])
    detectors = [FID_FEATURES, CLIP_SCORES]
    groups = [range(g, min(g + 64, n)) for g in range(0, n, 64)]
    whole, shards = Accumulator.empty(n, detectors, scorer), [Accumulator.empty(n, detectors, scorer) for _ in range(2)]
    for k, g in enumerate(groups):
        images = torch.tensor(list(g), dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 1, 1)
        for acc in (whole, shards[k % 2]):
            _score_group(acc, scorer, images, [""] * len(g), g)
    summed = [a + b for a, b in zip(shards[0].tensors(torch.device("cpu")), shards[1].tensors(torch.device("cpu")),
                                    strict=True)]
    merged = Accumulator.empty(n, detectors, scorer)
    merged.load_tensors(summed)
    assert torch.equal(merged.rows["fid-features"], feats) and torch.equal(merged.rows["clip-scores"], clip)
    assert torch.equal(merged.rows["fid-features"], whole.rows["fid-features"])
    assert float(merged.sums["clip-scores"]) == pytest.approx(float(clip.sum()), rel=1e-12)
    fid_stats = merged.stats["fid-features"]
    assert fid_stats.count == n and torch.allclose(fid_stats.sum, feats.double().sum(0), rtol=1e-12)
    assert torch.allclose(fid_stats.sum_sq, whole.stats["fid-features"].sum_sq, rtol=1e-12)


@pytest.mark.e2e
def test_coco_without_reference_features_names_the_command(tmp_path):
    from rapm_bench.eval.protocols import get_protocol
    from rapm_bench.eval.reference import reference_features

    with pytest.raises(UserError, match=r"no reference features for protocol coco30k .*rerun `rapm-bench data coco "
                                        r"--protocol coco30k"):
        reference_features(get_protocol("coco30k"), SimpleNamespace(weights_sha256="ab" * 32), tmp_path)


@pytest.fixture(scope="module")
def two_batch_sizes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The same 70 images evaluated with generation batches of 70 and of 16 (one engine run each)."""
    out = []
    for batch in (70, 16):
        folder = tmp_path_factory.mktemp(f"b{batch}")
        result = CliRunner().invoke(app, ["eval", "--model", "teacher", "--steps", "1", "--num-images", "70",
                                          "--batch-size", str(batch), "--out", str(folder), "--device", "cpu",
                                          "--json"])
        assert result.exit_code == 0, result.output
        out.append(json.loads(result.output[result.output.index("{"):]))
    return out[0], out[1]


@pytest.mark.e2e
def test_eval_writes_intervals_and_kid(two_batch_sizes):
    rec = two_batch_sizes[0]
    for metric in ("fid", "clip_score", "retrieval_accuracy"):
        lo, hi = rec[f"{metric}_ci"]
        assert lo <= rec[metric] <= hi, metric
    boot = rec["bootstrap"]
    assert boot["resamples"] == 1000 and boot["seed"] == 0 and boot["level"] == 0.95
    assert boot["method"].startswith("percentile; multinomial resample")
    kid = rec["kid"]
    assert set(kid) >= {"mean", "std", "subsets", "subset_size", "library"}
    assert kid["subsets"] == 100 and kid["subset_size"] == 70 and kid["library"].startswith("torchmetrics ")
    assert kid["mean"] > 0 and kid["std"] > 0
    assert rec["timing"]["intervals_s"] < 60
    on_disk = json.loads(Path(rec["path"]).read_text())
    assert on_disk["fid_ci"] == rec["fid_ci"] and on_disk["kid"] == rec["kid"]


@pytest.mark.e2e
def test_intervals_do_not_depend_on_batch_size(two_batch_sizes):
    a, b = two_batch_sizes
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)
    for key in ("fid_ci", "clip_score_ci", "retrieval_accuracy_ci"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert a["kid"]["mean"] == pytest.approx(b["kid"]["mean"], rel=1e-9)
