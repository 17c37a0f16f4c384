"""Metrics on image folders: images stream from disk as uint8 batches into float64 statistics.

For the agreement tests against clean-fid and for users who already have PNGs. Files are
found as clean-fid finds them (its extension list, recursive, sorted); no list of
features is ever held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..prompts import read_prompts
from .clip_score import ClipScorer, ClipScoreStats
from .features import FeatureExtractor, preprocess_pil, thread_map, to_nchw
from .fid import FeatureStats, checked_fid
from .protocols import Protocol

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "JPEG", "JPG", "PNG")
"""clean-fid's `EXTENSIONS` without `npy` (case-sensitive, as clean-fid globs them)."""


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted), as clean-fid lists them."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted({p for ext in IMAGE_EXTENSIONS for p in folder.rglob(f"*.{ext}") if p.is_file()}, key=str)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS[:9])}) in {folder}")
    return files


def read_image(path: Path, protocol: Protocol | None = None) -> np.ndarray:
    """One file -> uint8 (H, W, 3) RGB; with a protocol, its eval image (centre crop + resize)."""
    try:
        with Image.open(path) as im:
            return preprocess_pil(im, protocol) if protocol is not None else np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"unreadable image {path} ({e})") from None


def iter_batches(
    files: Sequence[Path],
    batch_size: int = 50,
    protocol: Protocol | None = None,
    num_threads: int | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 (n, 3, H, W) batches of at most `batch_size` images; a batch splits where the size changes."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for i in range(0, len(files), batch_size):
        arrays = thread_map(lambda p: read_image(p, protocol), list(files[i : i + batch_size]), num_threads)
        start = 0
        for j in range(1, len(arrays) + 1):
            if j == len(arrays) or arrays[j].shape != arrays[start].shape:
                yield to_nchw(arrays[start:j])
                start = j


def folder_stats(
    folder: Path,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    protocol: Protocol | None = None,
    num_threads: int | None = None,
) -> FeatureStats:
    """FID statistics (float64 sums) of every image in a folder."""
    stats = FeatureStats()
    with torch.no_grad():
        for batch in iter_batches(list_images(folder), batch_size, protocol, num_threads):
            stats.update(extractor(batch))
    return stats


def fid_from_folders(
    dir1: Path,
    dir2: Path,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    protocol: Protocol | None = None,
    num_threads: int | None = None,
) -> float:
    """FID between two image folders; with a protocol, both pass its eval preprocessing first."""
    a = folder_stats(dir1, extractor, batch_size, protocol, num_threads)
    b = folder_stats(dir2, extractor, batch_size, protocol, num_threads)
    return checked_fid(a, b)


def read_captions(captions: Sequence[str] | Path) -> list[str]:
    """Captions as a list: given directly, or read from a UTF-8 file (one a line)."""
    if isinstance(captions, Path):
        return read_prompts(captions)
    if isinstance(captions, str):
        raise TypeError("pass a list of captions or a Path to a caption file, not one string")
    return list(captions)


def clip_score_from_folder(
    folder: Path,
    captions: Sequence[str] | Path,
    scorer: ClipScorer,
    batch_size: int = 50,
    num_threads: int | None = None,
) -> float:
    """Mean CLIP score of a folder's images (sorted file order) against aligned captions."""
    files = list_images(folder)
    caps = read_captions(captions)
    if len(caps) != len(files):
        raise UserError(f"{len(files)} images in {folder} but {len(caps)} captions: one caption per image, "
                        f"in sorted file-name order")
    stats, done = ClipScoreStats(), 0
    for batch in iter_batches(files, batch_size, None, num_threads):
        stats.update(scorer.scores(batch, caps[done : done + batch.shape[0]]))
        done += batch.shape[0]
    return stats.mean()
