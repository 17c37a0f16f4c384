"""The fixed boundary "uint8 (N, 3, H, W) -> float features" (docs/design.md §6).

Two steps, the same for generated and real images:
1. `eval_preprocess`: centre-crop to a square and PIL LANCZOS-resize to the protocol's eval
   resolution (a no-op when the size already matches), uint8 in, uint8 out.
2. A feature extractor: `CleanInception` (clean-fid's "clean" mode: clean-fid's own PIL
   float bicubic resize to 299, then its InceptionV3W torchscript, TF32 off) or the tiny
   evaluator. Features leave as float32; `FeatureStats` accumulates them in float64.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from ..precision import compute, no_tf32, tf32  # noqa: F401 - their home is rapm_bench.precision; re-exported here
from .protocols import Protocol

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
DEFAULT_INCEPTION = Path("/tmp") / INCEPTION_FILE  # where clean-fid itself downloads it
INCEPTION_SIZE = 299


FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
"""uint8 images (N, 3, H, W) -> float features (N, dim). Optional attributes `name`, `dim` and
`weights_sha256` (read with getattr) go into caches and results."""


def check_uint8_images(images: torch.Tensor) -> None:
    """Raise unless `images` is uint8 (N, 3, H, W)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _threads(num_threads: int | None) -> int:
    """Worker threads for PIL work (PIL releases the GIL while resizing and decoding)."""
    return max(1, num_threads if num_threads is not None else min(8, os.cpu_count() or 1))


def thread_map(fn: Callable, items: list, num_threads: int | None) -> list:
    """`list(map(fn, items))`, on a thread pool when more than one thread is asked for."""
    n = _threads(num_threads)
    if n == 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, items))


# --- 1. eval preprocessing: centre crop + LANCZOS ---------------------------------------------
_FILTERS = {"lanczos": Image.LANCZOS}


def crop_resize_pil(image: Image.Image, size: int, resize_filter: str = "lanczos") -> Image.Image:
    """Centre-crop a PIL image to a square (torchvision's offsets) and resize it to `size`."""
    from torchvision.transforms.functional import center_crop

    side = min(image.size)
    if image.size[0] != image.size[1]:
        image = center_crop(image, [side, side])
    if side == size:
        return image
    if resize_filter not in _FILTERS:
        raise ValueError(f"resize filter {resize_filter!r} cannot take a {side}px image to {size}px")
    return image.resize((size, size), resample=_FILTERS[resize_filter])


def preprocess_pil(image: Image.Image, protocol: Protocol) -> np.ndarray:
    """One RGB PIL image -> the protocol's eval image, uint8 (R, R, 3)."""
    return np.asarray(crop_resize_pil(image.convert("RGB"), protocol.eval_resolution, protocol.resize_filter))


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 tensor -> (H, W, 3) numpy array."""
    return image.permute(1, 2, 0).contiguous().cpu().numpy()


def to_nchw(arrays: list[np.ndarray]) -> torch.Tensor:
    """A list of (H, W, 3) arrays -> (N, 3, H, W) tensor."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def eval_preprocess(images: torch.Tensor, protocol: Protocol, num_threads: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, R, R): centre crop + PIL LANCZOS to the eval resolution."""
    check_uint8_images(images)
    size = protocol.eval_resolution
    if images.shape[2] == images.shape[3] == size:
        return images

    def one(image: torch.Tensor) -> np.ndarray:
        pil = Image.fromarray(to_hwc(image))
        return np.asarray(crop_resize_pil(pil, size, protocol.resize_filter))

    return to_nchw(thread_map(one, list(images), num_threads)).to(images.device)


# --- 2. clean-fid "clean" features ------------------------------------------------------------
def clean_resize(images: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """clean-fid's "clean" resize: uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [0, 255], on the CPU.

    Calls `cleanfid.resize.build_resizer("clean")` (PIL bicubic on float32 channels, clipped),
    exactly what clean-fid applies to every image before its Inception network.
    """
    from cleanfid.resize import build_resizer

    check_uint8_images(images)
    resize = build_resizer("clean")
    out = thread_map(lambda im: resize(to_hwc(im)), list(images.cpu()), num_threads)
    return to_nchw(out).float()


def gpu_resize(images: torch.Tensor) -> torch.Tensor:
    """Fast approximation of `clean_resize` on any device: antialiased bicubic `F.interpolate`, clipped.

    Measured deviation from clean-fid's resize: see tests/test_fid_agreement.py (a few 1e-3 on 0–255).
    """
    check_uint8_images(images)
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    out = F.interpolate(images.float(), size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 255)


def find_inception(path: Path | str | None) -> Path:
    """The local clean-fid Inception torchscript: `path` (file or folder) or clean-fid's default."""
    how = (
        f"download {INCEPTION_URL} (clean-fid's Inception, 92 MB) and pass --inception PATH, "
        f"or put it at {DEFAULT_INCEPTION}"
    )
    if path is None:
        if DEFAULT_INCEPTION.is_file():
            return DEFAULT_INCEPTION
        raise UserError(f"Inception weights not found at {DEFAULT_INCEPTION}: {how}")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        raise UserError(f"Inception weights not found at {p}: {how}")
    if p.name != INCEPTION_FILE:
        raise UserError(f"Inception weights {p}: clean-fid loads them by name; rename the file to {INCEPTION_FILE}")
    return p


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    from ..files import sha256_file

    return sha256_file(path)


class CleanInception:
    """clean-fid "clean" mode features: clean-fid's PIL float bicubic resize to 299, then Inception pool3.

    `network` takes float32 (N, 3, 299, 299) in [0, 255] (what clean-fid feeds its
    InceptionV3W) and returns (N, dim); tests plug a random-weight network into this slot.
    `fast_resize=True` swaps clean-fid's CPU resize for `gpu_resize` on the network's device.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str = "cpu",
        dim: int = 2048,
        weights_sha256: str | None = None,
        fast_resize: bool = False,
        num_threads: int | None = None,
        name: str = "clean-fid-inception",
    ) -> None:
        self.network = network
        self.device = torch.device(device)
        self.dim = dim
        self.weights_sha256 = weights_sha256
        self.fast_resize = fast_resize
        self.num_threads = num_threads
        self.name = name
        self.precision = "fp32"  # the protocol's feature_precision (rapm_bench.precision): fp32 = TF32 off

    @classmethod
    def load(
        cls, path: Path | str | None = None, device: torch.device | str = "cpu", fast_resize: bool = False
    ) -> CleanInception:
        """clean-fid's InceptionV3W from a local file (never downloads)."""
        from cleanfid.inception_torchscript import InceptionV3W

        file = find_inception(path)
        device = torch.device(device)
        try:
            net = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"cannot load Inception weights {file} ({str(e).splitlines()[0]}): download them again") from None
        return cls(net, device, 2048, sha256_of(file), fast_resize)

    def describe(self) -> dict[str, object]:
        """Provenance for results."""
        return {"name": self.name, "dim": self.dim, "weights_sha256": self.weights_sha256,
                "resize": "F.interpolate bicubic antialias" if self.fast_resize else "clean-fid PIL bicubic (clean)"}

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU part: uint8 (N, 3, H, W) -> clean-fid's resized float32 input (with `fast_resize`: the images)."""
        check_uint8_images(images)
        return images if self.fast_resize else clean_resize(images, self.num_threads)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The device part: `inputs(images)` -> float32 features (N, dim) on the CPU."""
        x = gpu_resize(x.to(self.device)) if self.fast_resize else x.to(self.device)
        with compute(self.precision, self.device):
            feats = self.network(x)
        return feats.reshape(feats.shape[0], -1).float().cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 features (N, dim) on the CPU."""
        return self.run(self.inputs(images))


class TinyFeatures:
    """The tiny evaluator's FID features (unnormalised projected image embeddings)."""

    def __init__(self, evaluator: object, weights_sha256: str | None = None) -> None:
        self.evaluator = evaluator
        self.dim = int(evaluator.config["embed_dim"])  # type: ignore[attr-defined]
        self.weights_sha256 = weights_sha256
        self.name = "tiny-evaluator"

    def describe(self) -> dict[str, object]:
        """Provenance for results."""
        return {"name": self.name, "dim": self.dim, "weights_sha256": self.weights_sha256}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> float32 features (N, dim) on the CPU."""
        return self.evaluator.image_features(images)  # type: ignore[attr-defined]


def load_extractor(
    protocol: Protocol,
    weights: Path | str | None = None,
    device: torch.device | str = "cpu",
    fast_resize: bool = False,
) -> CleanInception | TinyFeatures:
    """The protocol's FID feature extractor from local weights (Inception file, or tiny evaluator folder)."""
    if protocol.fid_extractor == "clean-fid-inception":
        extractor: CleanInception | TinyFeatures = CleanInception.load(weights, device, fast_resize)
    else:
        from .tiny_evaluator import WEIGHTS, default_evaluator_dir, load_tiny_evaluator

        folder = Path(weights) if weights is not None else default_evaluator_dir()
        evaluator = load_tiny_evaluator(device, folder)
        extractor = TinyFeatures(evaluator, sha256_of(folder / WEIGHTS))
    expected = protocol.fid_weights_sha256
    if expected is not None and extractor.weights_sha256 != expected:
        raise UserError(
            f"protocol {protocol.name} pins FID weights sha256 {expected[:12]}…, "
            f"but the given file hashes to {str(extractor.weights_sha256)[:12]}…"
        )
    return extractor
