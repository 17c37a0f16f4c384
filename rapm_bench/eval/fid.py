"""Streaming FID: features stream in as float batches, statistics accumulate in float64.

`FeatureStats` keeps (count, Σx, Σxxᵀ), so images never need to be on disk, shards merge
exactly (`merge`), and the reference statistics of a protocol can be cached. The distance
itself is clean-fid's `frechet_distance` (same sqrtm, same eps fallback, real part).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from ..errors import UserError


class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors, in float64."""

    def __init__(self, dim: int | None = None, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.dim = dim
        self.device = torch.device(device)
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        if dim is not None:
            self._init(dim)

    def _init(self, dim: int) -> None:
        """Allocate zero sums for `dim`-dimensional features."""
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.sum_sq = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (N, D)."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
        if self.sum is None:
            self._init(features.shape[1])
        if features.shape[1] != self.dim:
            raise ValueError(f"feature dimension {features.shape[1]} != {self.dim}")
        x = features.detach().to(device=self.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's statistics into this one (shards, GPUs); returns self."""
        if other.sum is None or other.sum_sq is None:
            return self
        if self.sum is None:
            self._init(int(other.dim or other.sum.shape[0]))
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.sum_sq += other.sum_sq.to(self.device)
        return self

    def _check(self, need: int) -> None:
        """Refuse statistics of fewer than `need` samples."""
        if self.count < need:
            raise ValueError(f"need at least {need} feature vectors, have {self.count}")

    def mean(self) -> np.ndarray:
        """Mean feature vector, float64."""
        self._check(1)
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1, like numpy.cov), float64."""
        self._check(2)
        mu = self.sum / self.count
        cov = (self.sum_sq - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return cov.cpu().numpy()

    def save(self, path: Path) -> None:
        """Write the raw sums to an .npz file, atomically (exact: merging after loading is still exact)."""
        import io

        from ..files import atomic_write_bytes

        if self.sum is None or self.sum_sq is None:
            raise ValueError("no features accumulated")
        buf = io.BytesIO()
        np.savez(buf, count=np.int64(self.count), sum=self.sum.cpu().numpy(), sum_sq=self.sum_sq.cpu().numpy())
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> FeatureStats:
        """Read statistics written by `save`."""
        with np.load(path) as z:
            stats = cls(int(z["sum"].shape[0]), device)
            stats.count = int(z["count"])
            stats.sum += torch.from_numpy(z["sum"]).to(stats.device)
            stats.sum_sq += torch.from_numpy(z["sum_sq"]).to(stats.device)
        return stats


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm without its deprecated `disp` argument or warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between two Gaussians, computed as clean-fid 0.1.35 does.

    ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½). Where the product is singular the square root
    is retried with `eps` added to both diagonals; a numerically complex root keeps its
    real part (clean-fid raises when the imaginary diagonal exceeds 1e-3, a SciPy
    1.11–1.12 artefact, see docs/reference.md, Metric libraries).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two accumulated feature sets."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


class UnreliableFIDWarning(UserWarning):
    """FID from fewer samples than feature dimensions: the covariance is rank-deficient."""


class FIDError(UserError, ValueError):
    """FID cannot be computed (non-finite features, a covariance no square root exists for): explained, never NaN."""


def _check_finite(stats: FeatureStats, name: str) -> None:
    """Refuse statistics whose sums hold NaN or Inf, saying which set and what to check."""
    if stats.sum is None or stats.sum_sq is None:
        raise FIDError(f"no {name} features: nothing was accumulated")
    bad = int((~torch.isfinite(stats.sum)).sum())
    if bad or not bool(torch.isfinite(stats.sum_sq).all()):
        raise FIDError(
            f"the {name} FID features hold NaN or Inf ({bad} of {stats.dim} dimensions non-finite over "
            f"{stats.count} images): the feature network's weights are broken or do not fit it (check the "
            f"Inception/evaluator file and its sha256), or the images are; nothing was scored"
        )


def checked_fid(a: FeatureStats, b: FeatureStats, names: tuple[str, str] = ("first", "second")) -> float:
    """`fid_from_stats`, warning when either set has fewer samples than feature dimensions.

    Never returns NaN: non-finite features or a covariance whose square root stays non-finite
    (even with clean-fid's eps regularisation) raise `FIDError` (a UserError) that says which.
    """
    for stats, name in zip((a, b), names, strict=True):
        _check_finite(stats, name)
    dim = int(a.dim or 0)
    if min(a.count, b.count) < dim:
        warnings.warn(
            f"FID from {min(a.count, b.count)} samples of {dim}-dimensional features is unreliable "
            f"(rank-deficient covariance; use at least {dim} images, ideally 10K+)",
            UnreliableFIDWarning,
            stacklevel=2,
        )
    value = fid_from_stats(a, b)
    if not np.isfinite(value):
        raise FIDError(
            f"FID is not finite ({value}): the square root of the product of the {names[0]} and {names[1]} "
            f"covariances ({min(a.count, b.count)} images, {dim}-d features) is singular even with eps "
            f"regularisation; use more images (at least {dim}) or check that the features vary"
        )
    return value
