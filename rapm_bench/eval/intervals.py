"""Bootstrap intervals over images, and KID through torchmetrics, from the eval pass's per-image data.

Bootstrap (docs/design.md §6, metrics): B multinomial resamples of the generated images (counts
w, drawn on the CPU from one seeded generator, so the draws do not depend on the device);
the reference statistics stay fixed. Each resample's scores come from the counts without
copying images: mean = w@X/n, covariance from Xᵀ(w·X), and tr (Σ_g Σ_r)^½ as
Σ √max(λ, 0) over eigvalsh(S Σ_g S) with S = Σ_r^½ (eigh, once), all in float64 on the
features' device (with fewer drawn images than dimensions, the eigenvalues of the smaller
Gram matrix ZZᵀ, the same non-zero ones). CLIP score and retrieval accuracy are per-image means: w@s/n.

Intervals are percentile intervals. For FID the resampled values are first shifted by
the bootstrap bias (mean of the resamples − the point estimate): a resample repeats
about a third of the images, which inflates FID by more than its spread when n is near
the feature dimension (tiny, n = 512, 128-d: +5 FID against a spread of ±1), so an
unshifted interval would not even contain the measured value. The shifted interval is
conservative there (about 2× the true sampling spread at n = 4·D, 1.4× at n = 16·D).

KID is torchmetrics' `KernelInceptionDistance` on the protocol's own features (a
pass-through module), in the usual units (not ×1000), seeded locally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

LEVEL = 0.95
SEED = 0  # bootstrap and KID subsets
RESAMPLES = 1000  # default where the features are small (tiny: 128-d)
LARGE_RESAMPLES = 100  # default where n·D·min(n, D) > LARGE_WORK (coco30k: 30K × 2048-d Inception)
LARGE_WORK = 1e10
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
METHOD = ("percentile; multinomial resample of the generated set's per-image features (reference fixed); "
          "FID resamples shifted by their bootstrap bias (mean - point estimate)")


SMALL_DIM = 512  # up to this feature dimension the CPU maths runs on one thread


@contextlib.contextmanager
def cpu_threads_for(dim: int, device: torch.device | str) -> Iterator[None]:
    """One CPU thread for small matrices (thread start-up costs more than it saves, 10x on a busy CPU)."""
    old = torch.get_num_threads()
    if torch.device(device).type == "cpu" and dim <= SMALL_DIM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_resamples(n: int, dim: int) -> int:
    """Bootstrap resamples for n images of dim-dimensional features: fewer where each costs n·D·min(n, D) flops."""
    return RESAMPLES if n * dim * min(n, dim) <= LARGE_WORK else LARGE_RESAMPLES


def multinomial_counts(n: int, resamples: int, seed: int) -> torch.Tensor:
    """(resamples, n) int32 counts: how often each image is drawn in each resample (CPU, seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(resamples, n, dtype=torch.int32)
    for b in range(resamples):
        out[b] = torch.bincount(torch.randint(n, (n,), generator=g), minlength=n).to(torch.int32)
    return out


def percentile_interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The (1 − level)/2 and (1 + level)/2 quantiles (linear interpolation, numpy's default)."""
    a = (1 - level) / 2
    lo, hi = np.quantile(values.double().cpu().numpy(), [a, 1 - a])
    return float(lo), float(hi)


def mean_resamples(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-resample means of per-image values (float64, (B,))."""
    return counts.double() @ values.double().cpu() / values.shape[0]


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix through eigh (negative rounding eigenvalues clipped)."""
    e, v = torch.linalg.eigh(a)
    return (v * e.clamp(min=0).sqrt()) @ v.T


def fid_resamples(features: torch.Tensor, ref_mean: torch.Tensor, ref_cov: torch.Tensor,
                  counts: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """FID of each resample (rows of `counts`) against fixed reference statistics, float64 (B,)."""
    device = torch.device(device)
    x = features.to(device=device, dtype=torch.float64)
    n = x.shape[0]
    mean = x.mean(0)
    x0 = x - mean  # centred: the covariance is shift-invariant and keeps its digits
    del x
    mu_r, cov_r = ref_mean.to(device, torch.float64), ref_cov.to(device, torch.float64)
    s = sqrtm_psd(cov_r)
    y = x0 @ s  # S Σ_g S = Σ w_i (y_i − ȳ_w)(y_i − ȳ_w)ᵀ / (n − 1), ȳ_w = w@Y / n
    sq = (x0 * x0).sum(1)
    d, tr_r = mean - mu_r, torch.trace(cov_r)
    out = torch.empty(counts.shape[0], dtype=torch.float64)
    for b in range(counts.shape[0]):
        w = counts[b].to(device=device, dtype=torch.float64)
        keep = w > 0  # a resample holds about 63% of the images: skip the rest
        wy, wx = w @ y, w @ x0
        z = (y[keep] - wy / n) * w[keep].sqrt()[:, None]  # S Σ_g S = ZᵀZ / (n − 1)
        gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T  # ZZᵀ has the same non-zero eigenvalues
        lam = torch.linalg.eigvalsh((gram + gram.T) / 2) / (n - 1)
        dm = d + wx / n
        tr_g = (w @ sq - wx @ wx / n) / (n - 1)
        out[b] = (dm @ dm + tr_g + tr_r - 2 * lam.clamp(min=0).sqrt().sum()).cpu()
    return out


def fid_point(features: torch.Tensor, ref_mean: torch.Tensor, ref_cov: torch.Tensor,
              device: torch.device | str = "cpu") -> float:
    """FID of the whole generated set by the eigvalsh path (equals clean-fid's at the point estimate)."""
    ones = torch.ones(1, features.shape[0], dtype=torch.int32)
    return float(fid_resamples(features, ref_mean, ref_cov, ones, device)[0])


def fid_interval(features: torch.Tensor, ref_mean: torch.Tensor, ref_cov: torch.Tensor, counts: torch.Tensor,
                 level: float = LEVEL, device: torch.device | str = "cpu") -> tuple[list[float], float]:
    """FID's bias-shifted percentile interval over the resamples `counts`, and the shift (mean − point)."""
    n, dim = features.shape
    ones = torch.ones(1, n, dtype=torch.int32)  # row 0: the whole set (one setup for point and resamples)
    with cpu_threads_for(dim, device):
        all_fids = fid_resamples(features, ref_mean, ref_cov, torch.cat([ones, counts]), device)
    point, fids = float(all_fids[0]), all_fids[1:]
    shift = float(fids.mean()) - point
    return list(percentile_interval(fids - shift, level)), shift


def mean_interval(values: torch.Tensor, counts: torch.Tensor, level: float = LEVEL) -> list[float]:
    """The percentile interval of a per-image mean (CLIP score, retrieval accuracy) over the resamples `counts`."""
    return list(percentile_interval(mean_resamples(values, counts), level))


def bootstrap_record(resamples: int, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """A result's `bootstrap` field (the metrics add their own entries, FID its `fid_shift`)."""
    return {"resamples": resamples, "seed": seed, "level": level, "method": METHOD}


def bootstrap(features: torch.Tensor, clip_scores: torch.Tensor, hits: torch.Tensor | None,
              ref_mean: torch.Tensor, ref_cov: torch.Tensor, resamples: int | None = None, seed: int = SEED,
              level: float = LEVEL, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Percentile intervals of FID, CLIP score and retrieval accuracy over one set of resamples."""
    n, dim = features.shape
    b = resamples if resamples is not None else default_resamples(n, dim)
    counts = multinomial_counts(n, b, seed)
    fid_ci, shift = fid_interval(features, ref_mean, ref_cov, counts, level, device)
    return {
        "fid_ci": fid_ci,
        "clip_score_ci": mean_interval(clip_scores, counts, level),
        "retrieval_accuracy_ci": None if hits is None else mean_interval(hits, counts, level),
        "bootstrap": bootstrap_record(b, seed, level) | {"fid_shift": shift},
    }


class PassThrough(torch.nn.Module):
    """A torchmetrics "feature extractor" for features already extracted: returns them in float64."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features in, the same features out (float64)."""
        return x.to(torch.float64)


def kid(gen_features: torch.Tensor, ref_features: torch.Tensor, subsets: int = KID_SUBSETS,
        subset_size: int | None = None, seed: int = SEED, device: torch.device | str = "cpu") -> dict[str, Any]:
    """KID (polynomial-kernel unbiased MMD², usual units) by torchmetrics, with the settings used."""
    import warnings

    import torchmetrics
    from torchmetrics.image.kid import KernelInceptionDistance

    size = subset_size or min(KID_SUBSET_SIZE, gen_features.shape[0], ref_features.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        # sync_on_compute off: only the main process computes (other processes never join a gather)
        metric = KernelInceptionDistance(feature=PassThrough(gen_features.shape[1]), subsets=subsets,
                                         subset_size=size, sync_on_compute=False).to(device)
    metric.update(gen_features.to(device), real=False)
    metric.update(ref_features.to(device), real=True)
    with torch.random.fork_rng(devices=[]), cpu_threads_for(gen_features.shape[1], device):
        torch.manual_seed(seed)  # torchmetrics draws its subsets from torch's global CPU RNG
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subsets": subsets, "subset_size": size,
            "library": f"torchmetrics {'.'.join(torchmetrics.__version__.split('.')[:2])}", "seed": seed}
