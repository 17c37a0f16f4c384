"""FID agrees with clean-fid (same features in, same number out) and with a float64 scipy computation.

The feature network is the real Inception-v3 architecture (torchvision) with random,
seeded weights, fed exactly what clean-fid feeds its InceptionV3W: float32 (N, 3, 299, 299)
in [0, 255] after clean-fid's own "clean" resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.inception import FakeTorchscriptInception
from PIL import Image
from scipy import linalg

from rapm_bench.errors import UserError
from rapm_bench.eval.features import CleanInception, clean_resize, eval_preprocess, find_inception, gpu_resize
from rapm_bench.eval.fid import FeatureStats, UnreliableFIDWarning, fid_from_stats
from rapm_bench.eval.folders import (
    fid_from_folders,
    folder_stats,
    iter_batches,
    list_images,
)
from rapm_bench.eval.protocols import get_protocol

PROJ_DIM = 16  # full-rank covariance from a few dozen images: a well-conditioned sqrtm on both sides

# The same image through the float32 Inception gives other features in a batch of 7 than in one of 16
# or 32, and on 1 thread than on 2: other conv kernels and reduction orders. Float32's unit round-off
# is 6e-8; through ~90 layers it grows to ~1e-6 of the features' scale (measured: 3.9e-7 relative,
# 2.9e-6 absolute on feature means up to 56, at OMP_NUM_THREADS=1). The float64 statistics and the
# Fréchet distance add only ~1e-12 to that. So features from different batches are compared to
# FEATURE_RTOL plus an absolute floor of FEATURE_RTOL times the largest entry (a mean or covariance
# entry near zero carries the round-off of the large ones it is summed from), and FID to FEATURE_RTOL
# plus FEATURE_RTOL times the size of the terms that cancel in it (`fid_floor`).
FEATURE_RTOL = 1e-6


def fid_floor(a: FeatureStats, b: FeatureStats) -> float:
    """Absolute round-off floor of an FID: FEATURE_RTOL × (|μ1|² + |μ2|² + tr Σ1 + tr Σ2)."""
    size = float((a.mean() ** 2).sum() + (b.mean() ** 2).sum() + np.trace(a.cov()) + np.trace(b.cov()))
    return FEATURE_RTOL * size


class RandomInception(torch.nn.Module):
    """torchvision Inception-v3, random He-initialised weights, pool3 features; InceptionV3W's input scaling."""

    def __init__(self, proj_dim: int | None = None, seed: int = 0) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        g = torch.Generator().manual_seed(seed)
        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        for m in self.net.modules():
            if isinstance(m, torch.nn.Conv2d):  # He init keeps activations O(1) through 90 layers
                fan_in = m.weight[0].numel()
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        self.net.fc = torch.nn.Identity()
        self.net.eval()
        proj = None if proj_dim is None else torch.randn(2048, proj_dim, generator=g) / 2048**0.5
        self.register_buffer("proj", proj)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 299, 299)
        feats = self.net((x - 128) / 128)  # InceptionV3W: x in [0, 255] -> (x - 128) / 128
        return feats if self.proj is None else (feats - 0.5) @ self.proj * 50


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth image: a colour gradient with a few soft discs."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([rng.uniform(0, 255) * (1 - xx) + rng.uniform(0, 255) * yy for _ in range(3)], -1)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)[..., None]
        img = img * (1 - mask) + rng.uniform(0, 255, 3) * mask
    return img.clip(0, 255).astype(np.uint8)


def _textures(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A busy image: coloured noise over stripes."""
    stripes = (np.sin(np.arange(w) * rng.uniform(0.2, 1.5)) * 60 + 128)[None, :, None]
    return (stripes + rng.normal(0, 50, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _write_folder(folder: Path, make, n: int, seed: int) -> Path:
    """n images, mostly 64 px PNGs, a few JPEGs of other shapes (clean-fid resizes each to 299)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i % 8 == 7:
            Image.fromarray(make(rng, 48, 80)).save(folder / f"{i:03d}.jpg", quality=90)
        else:
            Image.fromarray(make(rng, 64, 64)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fid")
    return _write_folder(root / "a", _blobs, 32, 1), _write_folder(root / "b", _textures, 32, 2)


@pytest.fixture(scope="module")
def net() -> RandomInception:
    torch.manual_seed(0)
    return RandomInception(PROJ_DIM)


@pytest.fixture(scope="module")
def ours(dirs: tuple[Path, Path], net: RandomInception) -> tuple[FeatureStats, FeatureStats]:
    extractor = CleanInception(net, dim=PROJ_DIM, num_threads=2)
    return folder_stats(dirs[0], extractor, batch_size=7), folder_stats(dirs[1], extractor, batch_size=7)


def test_fid_equals_clean_fid(dirs: tuple[Path, Path], net: RandomInception, ours) -> None:
    from cleanfid import fid as cfid

    theirs = cfid.compute_fid(
        str(dirs[0]), str(dirs[1]), mode="clean", custom_feat_extractor=net, use_dataparallel=False,
        num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False,
    )
    mine = fid_from_stats(*ours)
    print(f"FID rapm-bench {mine:.9g} clean-fid {theirs:.9g} rel {abs(mine - theirs) / theirs:.2e}")
    assert mine > 1.0  # two different image distributions
    assert abs(mine - theirs) <= 1e-3 * abs(theirs)


def test_fid_from_folders_end_to_end(dirs: tuple[Path, Path], net: RandomInception, ours) -> None:
    value = fid_from_folders(dirs[0], dirs[1], CleanInception(net, dim=PROJ_DIM), batch_size=32)
    # batch size does not matter beyond the float32 features' round-off
    assert value == pytest.approx(fid_from_stats(*ours), rel=FEATURE_RTOL, abs=fid_floor(*ours))


def test_frechet_matches_float64_scipy(dirs: tuple[Path, Path], net: RandomInception, ours) -> None:
    extractor = CleanInception(net, dim=PROJ_DIM)
    f1, f2 = (
        torch.cat([extractor(b) for b in iter_batches(list_images(d), 16)]).double().numpy() for d in dirs
    )
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    a, b = ours  # features of batches of 7, the reference's of batches of 16: float32 round-off apart
    np.testing.assert_allclose(a.mean(), mu1, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * np.abs(mu1).max())
    np.testing.assert_allclose(a.cov(), s1, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * np.abs(s1).max())
    assert fid_from_stats(a, b) == pytest.approx(expected, rel=FEATURE_RTOL, abs=fid_floor(a, b))
    same = FeatureStats()  # on the very same features the float64 statistics are exact to float64 round-off
    same.update(torch.from_numpy(f1))
    np.testing.assert_allclose(same.mean(), mu1, rtol=1e-12, atol=1e-12 * np.abs(mu1).max())
    np.testing.assert_allclose(same.cov(), s1, rtol=1e-9, atol=1e-12 * np.abs(s1).max())


def test_fid_of_a_set_with_itself_is_zero(ours) -> None:
    a, _ = ours
    assert abs(fid_from_stats(a, a)) < 1e-8 * np.trace(a.cov())


def test_few_samples_warn_and_stay_finite(dirs: tuple[Path, Path]) -> None:
    extractor = CleanInception(RandomInception(None, seed=1), dim=2048)
    a, b = dirs
    small_a, small_b = a.parent / "small_a", a.parent / "small_b"
    for src, dst in ((a, small_a), (b, small_b)):
        dst.mkdir()
        for f in sorted(src.glob("*.png"))[:6]:
            (dst / f.name).write_bytes(f.read_bytes())
    with pytest.warns(UnreliableFIDWarning, match="unreliable"):
        value = fid_from_folders(small_a, small_b, extractor, batch_size=6)
    assert np.isfinite(value)


def test_clean_resize_is_clean_fids(dirs: tuple[Path, Path]) -> None:
    from cleanfid.utils import ResizeDataset

    files = list_images(dirs[0])[:8]  # PNGs and a JPEG of another shape
    theirs = torch.stack([ResizeDataset([str(f)], mode="clean")[0] for f in files])
    mine = torch.cat([clean_resize(b) for b in iter_batches(files, 8)])
    assert mine.dtype == theirs.dtype == torch.float32
    assert torch.equal(mine, theirs)


def test_gpu_resize_deviation_from_clean_fid() -> None:
    """docs/reference.md: ~2.5e-3 on 0–255. Measured here (torch 2.14.1, Pillow 13): uniform noise
    64 px 9.1e-4, 256 px 3.7e-3, 512 px 2.8e-3, 1024 px 1.4e-3; smooth images <= 1.2e-4."""
    g = torch.Generator().manual_seed(0)
    worst = {}
    for size in (64, 256, 512, 1024):
        noise = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        worst[size] = float((clean_resize(noise) - gpu_resize(noise)).abs().max())
    print("max |clean-fid resize - F.interpolate bicubic antialias| (0-255):", worst)
    assert max(worst.values()) < 5e-3
    same = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    assert torch.equal(gpu_resize(same), clean_resize(same))  # 299 in: both are the identity


def test_fast_resize_fid_close(dirs: tuple[Path, Path], net: RandomInception, ours) -> None:
    fast = CleanInception(net, dim=PROJ_DIM, fast_resize=True)
    value = fid_from_stats(folder_stats(dirs[0], fast, 16), folder_stats(dirs[1], fast, 16))
    assert value == pytest.approx(fid_from_stats(*ours), rel=1e-3)


def test_eval_preprocess_is_centre_crop_lanczos() -> None:
    protocol = get_protocol("dmd2-coco10k")
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2)
    out = eval_preprocess(images, protocol)
    assert out.shape == (2, 3, 512, 512) and out.dtype == torch.uint8
    for i in range(2):  # torchvision centre crop offsets: left = round((120 - 90) / 2) = 15
        expected = np.asarray(Image.fromarray(arr[i]).crop((15, 0, 105, 90)).resize((512, 512), Image.LANCZOS))
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), expected)
    same = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    assert eval_preprocess(same, protocol) is same
    with pytest.raises(ValueError, match="cannot take"):
        eval_preprocess(same, get_protocol("tiny"))


def test_missing_inception_weights_say_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"Inception weights not found at .*: download https://.*--inception PATH"):
        find_inception(tmp_path / "nope.pt")
    other = tmp_path / "inception.pt"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="rename the file to inception-2015-12-05.pt"):
        find_inception(other)
    (tmp_path / "inception-2015-12-05.pt").write_bytes(b"truncated download")
    with pytest.raises(UserError, match="cannot load Inception weights .*: download them again"):
        CleanInception.load(tmp_path)


def test_clean_inception_loads_a_local_torchscript_file(tmp_path: Path) -> None:
    from rapm_bench.files import sha256_file

    torch.manual_seed(0)
    fake = FakeTorchscriptInception()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(fake).save(str(path))
    extractor = CleanInception.load(tmp_path)  # a folder works, and so does the file itself
    assert CleanInception.load(path).weights_sha256 == extractor.weights_sha256 == sha256_file(path)
    images = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    feats = extractor(images)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    with torch.no_grad():
        expected = fake.layers((clean_resize(images) - 128) / 128)  # InceptionV3W's input scaling
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
