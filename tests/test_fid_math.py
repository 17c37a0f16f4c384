"""Streaming FID maths against float64 numpy/scipy and clean-fid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from rapm_bench.eval.fid import FeatureStats, fid_from_stats, frechet_distance


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix + shift).float()


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation, all in float64."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def test_stats_match_numpy() -> None:
    x = _features(500, 16, 0)
    s = FeatureStats()
    s.update(x)
    ref = x.double().numpy()
    np.testing.assert_allclose(s.mean(), ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.cov(), np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-12)
    assert s.count == 500


def test_merge_equals_one_shot() -> None:
    x = _features(700, 12, 1)
    whole = FeatureStats()
    whole.update(x)
    parts = [FeatureStats() for _ in range(3)]
    for i, chunk in enumerate(torch.split(x, [100, 250, 350])):
        parts[i % 3].update(chunk)
    merged = FeatureStats().merge(parts[0]).merge(parts[1]).merge(parts[2])
    assert merged.count == whole.count
    # zero-mean features: an entry of the mean can sit near 0, where float64 sums of 700 O(1) values still
    # carry ~700 × 1.1e-16 of absolute round-off: rtol plus that floor
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-10, atol=1e-13)


def test_fid_matches_scipy_and_cleanfid() -> None:
    x, y = _features(2000, 32, 2), _features(1500, 32, 3, shift=0.3)
    a, b = FeatureStats(), FeatureStats()
    a.update(x)
    b.update(y)
    ours = fid_from_stats(a, b)
    expected = _scipy_fid(x.double().numpy(), y.double().numpy())
    assert ours == pytest.approx(expected, rel=1e-6)
    cleanfid = pytest.importorskip("cleanfid.fid")
    assert ours == pytest.approx(float(cleanfid.frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())), rel=1e-9)


def test_fid_of_identical_sets_is_zero() -> None:
    s = FeatureStats()
    s.update(_features(1000, 24, 4))
    assert abs(fid_from_stats(s, s)) < 1e-6
    assert frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3)) == pytest.approx(3.0)


def test_singular_covariance_falls_back_to_eps() -> None:
    x = _features(10, 32, 5)  # fewer samples than dimensions: rank-deficient covariance
    a = FeatureStats()
    a.update(x)
    assert np.isfinite(fid_from_stats(a, a))


def test_save_load_roundtrip(tmp_path) -> None:
    s = FeatureStats()
    s.update(_features(64, 8, 6))
    s.save(tmp_path / "ref.npz")
    t = FeatureStats.load(tmp_path / "ref.npz")
    assert t.count == 64
    np.testing.assert_array_equal(t.cov(), s.cov())


def test_errors() -> None:
    s = FeatureStats()
    with pytest.raises(ValueError, match="at least 2"):
        s.update(torch.zeros(1, 4))
        s.cov()
    with pytest.raises(ValueError, match="dimension"):
        s.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        s.update(torch.zeros(4))
