"""COCO 2014 val data for the coco protocols: (image, caption) pairs and reference FID statistics.

`build_pairs` samples the protocol's pairs from `captions_val2014.json`:
- `coco30k`: pycocotools; the val2014 images in a seeded random order (the first K pairs are
  a uniform sample for any K), one caption per image drawn with a generator seeded by
  (seed, image id), whitespace normalised.
- `dmd2`: DMD2's pandas recipe verbatim in effect: merge images with captions, shuffle
  (`sample(frac=1)`), `drop_duplicates("file_name")`, `sample(N)`, all from one
  `RandomState(123)` (the same stream as their `np.random.seed(123)`); captions untouched.

`prepare_coco` validates every input first, streams the reference images through the
protocol's eval preprocessing and the FID extractor into float64 `FeatureStats`, and
writes the pair list, the statistics and the per-image features (float32, for KID)
atomically, named after the protocol hash.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..files import atomic_write_bytes, sha256_file
from .features import FeatureExtractor, preprocess_pil, thread_map, to_nchw
from .fid import FeatureStats
from .protocols import Protocol

ANNOTATIONS_NAME = "captions_val2014.json"
ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
IMAGES_URL = "http://images.cocodataset.org/zips/val2014.zip"
GET_ANNOTATIONS = (
    f"download annotations_trainval2014.zip from the COCO website ({ANNOTATIONS_URL}), unzip it "
    f"and pass --annotations PATH/annotations/{ANNOTATIONS_NAME}"
)
GET_IMAGES = f"download val2014.zip from the COCO website ({IMAGES_URL}), unzip it and pass --images PATH/val2014"
DEFAULT_CACHE_DIR = Path("~/.cache/rapm-bench")


@dataclass(frozen=True)
class Pair:
    """One evaluation pair: a val2014 image and the caption it is generated from."""

    image_id: int
    file_name: str
    caption: str


# --- annotations ------------------------------------------------------------------------------
def _resolve_annotations(path: Path) -> Path:
    """The captions file itself, also when a folder holding it is given."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / ANNOTATIONS_NAME, path / "annotations" / ANNOTATIONS_NAME):
            if candidate.is_file():
                return candidate
        raise UserError(f"{ANNOTATIONS_NAME} not found in {path}: {GET_ANNOTATIONS}")
    if not path.is_file():
        raise UserError(f"{ANNOTATIONS_NAME} not found at {path}: {GET_ANNOTATIONS}")
    return path


def load_annotations(path: Path) -> dict[str, Any]:
    """Read and validate a COCO captions file (images with id/file_name, annotations with image_id/caption)."""
    path = _resolve_annotations(path)
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): {GET_ANNOTATIONS}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): {GET_ANNOTATIONS}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise UserError(f"{path} is not a COCO captions file (no 'images' and 'annotations' lists): {GET_ANNOTATIONS}")
    bad_img = next(
        (im for im in data["images"]
         if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str)),
        None,
    )
    if bad_img is not None:
        raise UserError(f"{path}: malformed image entry {str(bad_img)[:80]} (needs integer 'id' and 'file_name')")
    bad_ann = next(
        (a for a in data["annotations"]
         if not isinstance(a, dict) or not isinstance(a.get("image_id"), int) or not isinstance(a.get("caption"), str)),
        None,
    )
    if bad_ann is not None:
        hint = " (an instances file? the captions file is captions_val2014.json)" if "bbox" in str(bad_ann) else ""
        raise UserError(f"{path}: malformed caption entry {str(bad_ann)[:80]}{hint}: {GET_ANNOTATIONS}")
    if not data["annotations"]:
        raise UserError(f"{path} holds no captions: {GET_ANNOTATIONS}")
    return data


def _coco_index(data: dict[str, Any]) -> Any:
    """A pycocotools COCO index over already-loaded data (quiet)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def _clean(caption: str) -> str:
    """Collapse whitespace (some COCO captions hold newlines or double spaces)."""
    return " ".join(caption.split())


def _sample_coco30k(data: dict[str, Any], protocol: Protocol) -> list[Pair]:
    """Seeded random order of captioned images; one caption each from a (seed, image id) generator."""
    coco = _coco_index(data)
    ids = sorted(i for i in coco.imgs if coco.imgToAnns.get(i))
    n = protocol.num_pairs
    if len(ids) < n:
        raise UserError(f"the captions file holds {len(ids)} captioned images, protocol {protocol.name} needs {n}: "
                        f"use the full {ANNOTATIONS_NAME}")
    order = np.random.default_rng(protocol.caption_seed).permutation(len(ids))[:n]
    pairs = []
    for k in order:
        image_id = ids[int(k)]
        anns = sorted(coco.imgToAnns[image_id], key=lambda a: a.get("id", 0))
        pick = int(np.random.default_rng([protocol.caption_seed, image_id]).integers(len(anns)))
        pairs.append(Pair(image_id, coco.imgs[image_id]["file_name"], _clean(anns[pick]["caption"])))
    return pairs


def _sample_dmd2(data: dict[str, Any], protocol: Protocol) -> list[Pair]:
    """DMD2's recipe: merge, shuffle, one caption per file name, sample N; one RandomState(seed)."""
    import pandas as pd

    rs = np.random.RandomState(protocol.caption_seed)
    df = pd.DataFrame(data["images"])
    df = df.merge(pd.DataFrame(data["annotations"]), how="left", left_on="id", right_on="image_id")
    df = df[["file_name", "caption"]]
    df = df.sample(frac=1, random_state=rs)
    df = df.drop_duplicates(subset="file_name")
    n = protocol.num_pairs
    if len(df) < n:
        raise UserError(f"the captions file holds {len(df)} images, protocol {protocol.name} needs {n}: "
                        f"use the full {ANNOTATIONS_NAME}")
    df = df.sample(n, random_state=rs)
    ids = {im["file_name"]: im["id"] for im in data["images"]}
    pairs = []
    for file_name, caption in zip(df["file_name"], df["caption"], strict=True):
        if not isinstance(caption, str):
            raise UserError(f"image {file_name} has no caption in the captions file: {GET_ANNOTATIONS}")
        pairs.append(Pair(int(ids[file_name]), str(file_name), caption))
    return pairs


def check_coco_protocol(protocol: Protocol) -> None:
    """Refuse protocols whose captions do not come from COCO."""
    if protocol.caption_source != "coco2014-val":
        raise UserError(f"protocol {protocol.name} does not use COCO captions; its data needs no preparation")


def pairs_from_annotations(data: dict[str, Any], protocol: Protocol) -> list[Pair]:
    """The protocol's pairs from already-loaded annotations."""
    check_coco_protocol(protocol)
    if protocol.caption_sampling == "coco30k":
        return _sample_coco30k(data, protocol)
    if protocol.caption_sampling == "dmd2":
        return _sample_dmd2(data, protocol)
    raise UserError(f"protocol {protocol.name}: caption sampling {protocol.caption_sampling!r} is not a COCO one")


def build_pairs(annotations: Path, protocol: Protocol) -> list[Pair]:
    """The protocol's (image, caption) pairs from `captions_val2014.json`, in evaluation order."""
    check_coco_protocol(protocol)
    return pairs_from_annotations(load_annotations(annotations), protocol)


def reference_files(data: dict[str, Any], pairs: Sequence[Pair], protocol: Protocol) -> list[str]:
    """File names of the FID reference images: the pairs' own, or every val2014 image."""
    if protocol.reference == "paired":
        return [p.file_name for p in pairs]
    return [im["file_name"] for im in sorted(data["images"], key=lambda im: im["id"])]


# --- cache files ------------------------------------------------------------------------------
def pairs_path(cache_dir: Path, protocol: Protocol) -> Path:
    """Where the protocol's pair list lives in the cache."""
    return Path(cache_dir).expanduser() / f"{protocol.name}-{protocol.hash()}.pairs.json"


def stats_path(cache_dir: Path, protocol: Protocol, weights_sha256: str | None) -> Path:
    """Where the protocol's reference FID statistics for one extractor's weights live in the cache."""
    tag = weights_sha256[:12] if weights_sha256 else "unhashed"
    return Path(cache_dir).expanduser() / f"{protocol.name}-{protocol.hash()}-{tag}.fid.npz"


def features_path(cache_dir: Path, protocol: Protocol, weights_sha256: str | None) -> Path:
    """Where the protocol's reference per-image features (float32, for KID) live: beside the statistics."""
    stats = stats_path(cache_dir, protocol, weights_sha256)
    return stats.with_name(stats.name.removesuffix(".fid.npz") + ".features.npy")


def save_reference_features(path: Path, features: torch.Tensor) -> None:
    """Write (N, D) float32 features as .npy, atomically."""
    buf = io.BytesIO()
    np.save(buf, features.detach().to("cpu", torch.float32).numpy())
    atomic_write_bytes(Path(path), buf.getvalue())


def load_reference_features(path: Path) -> torch.Tensor:
    """Reference features written by `save_reference_features` (float32 (N, D))."""
    try:
        return torch.from_numpy(np.load(Path(path), allow_pickle=False)).float()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read reference features {path} ({e}): rerun `rapm-bench data coco`") from None


def load_pairs(path: Path) -> list[Pair]:
    """Read a pair list written by `prepare_coco`."""
    try:
        raw = json.loads(Path(path).read_text())
        return [Pair(int(p["image_id"]), str(p["file_name"]), str(p["caption"])) for p in raw["pairs"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the pair list {path} ({e}): rerun `rapm-bench data coco`") from None


def load_reference_stats(path: Path) -> FeatureStats:
    """Reference statistics written by `prepare_coco` (exact sums, mergeable)."""
    try:
        return FeatureStats.load(Path(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read reference statistics {path} ({e}): rerun `rapm-bench data coco`") from None


def _cache_ok(pairs_file: Path, stats_file: Path, protocol: Protocol, features_file: Path | None = None) -> bool:
    """Whether the cache files exist, parse, and belong to this protocol (features: present, when named)."""
    if features_file is not None and not features_file.is_file():
        return False
    try:
        meta = json.loads(pairs_file.read_text())
        with np.load(stats_file) as z:
            ok = {"count", "sum", "sum_sq"} <= set(z.files)
        return ok and meta.get("protocol_hash") == protocol.hash() and len(meta["pairs"]) == protocol.num_pairs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _stats_bytes(stats: FeatureStats, meta: dict[str, Any]) -> bytes:
    """An .npz with the exact sums (FeatureStats.load) plus clean-fid-style mu and sigma."""
    assert stats.sum is not None and stats.sum_sq is not None
    buf = io.BytesIO()
    np.savez(
        buf,
        count=np.int64(stats.count),
        sum=stats.sum.cpu().numpy(),
        sum_sq=stats.sum_sq.cpu().numpy(),
        mu=stats.mean(),
        sigma=stats.cov() if stats.count > 1 else np.zeros_like(stats.sum_sq.cpu().numpy()),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    return buf.getvalue()


# --- images -----------------------------------------------------------------------------------
def _missing_images(images_dir: Path, names: Sequence[str]) -> list[str]:
    """Names of the listed files that are not in `images_dir`."""
    return [n for n in names if not (images_dir / n).is_file()]


def _load_eval_image(path: Path, protocol: Protocol) -> np.ndarray:
    """One real image -> the protocol's eval image (uint8 HWC), or a one-line UserError."""
    try:
        with Image.open(path) as im:
            return preprocess_pil(im, protocol)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"unreadable image {path} ({e}): {GET_IMAGES}") from None


def reference_stats(
    files: Sequence[Path],
    protocol: Protocol,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    num_threads: int | None = None,
    progress: bool = True,
    features: list[torch.Tensor] | None = None,
) -> FeatureStats:
    """Stream image files through the eval preprocessing and `extractor` into float64 statistics.

    When `features` is a list, each batch's float32 features are appended to it too (for KID).
    """
    from tqdm.auto import tqdm

    stats = FeatureStats()
    with tqdm(total=len(files), unit="img", desc=f"{protocol.name} reference statistics", disable=not progress) as bar:
        for i in range(0, len(files), batch_size):
            chunk = list(files[i : i + batch_size])
            arrays = thread_map(lambda p: _load_eval_image(p, protocol), chunk, num_threads)
            with torch.no_grad():
                f = extractor(to_nchw(arrays))
            stats.update(f)
            if features is not None:
                features.append(f.detach().to("cpu", torch.float32))
            bar.update(len(chunk))
    return stats


def prepare_coco(
    annotations: Path,
    images_dir: Path,
    protocol: Protocol,
    cache_dir: Path,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    num_threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the protocol's pair list and reference FID statistics into `cache_dir`; returns the .npz path.

    Both files are named after the protocol hash (the statistics also after the extractor's
    weights hash) and written atomically once everything has been read; an existing
    complete cache is reused. Every input is checked before anything is written.
    """
    check_coco_protocol(protocol)
    weights = getattr(extractor, "weights_sha256", None)
    pairs_file, stats_file = pairs_path(cache_dir, protocol), stats_path(cache_dir, protocol, weights)
    features_file = features_path(cache_dir, protocol, weights)
    if _cache_ok(pairs_file, stats_file, protocol, features_file):
        return stats_file
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")

    # 1. validate: captions, pairs, every reference image present
    ann_file = _resolve_annotations(Path(annotations))
    data = load_annotations(ann_file)
    pairs = pairs_from_annotations(data, protocol)
    images_dir = Path(images_dir).expanduser()
    if not images_dir.is_dir():
        raise UserError(f"COCO val2014 images folder not found: {images_dir}: {GET_IMAGES}")
    names = reference_files(data, pairs, protocol)
    missing = _missing_images(images_dir, names)
    if missing:
        raise UserError(
            f"{len(missing)} images the caption list names are missing from {images_dir}, e.g. {missing[0]}: {GET_IMAGES}"
        )

    # 2. stream the reference images into float64 statistics (nothing written yet)
    feats: list[torch.Tensor] = []
    stats = reference_stats([images_dir / n for n in names], protocol, extractor, batch_size, num_threads, progress,
                            feats)
    if stats.sum_sq is None or not bool(torch.isfinite(stats.sum_sq).all()):
        raise UserError("the reference features are not finite: check the feature network weights")

    # 3. write: pair list, then statistics, each atomically
    meta = {
        "protocol": protocol.to_dict(),
        "protocol_hash": protocol.hash(),
        "annotations": str(ann_file),
        "annotations_sha256": sha256_file(ann_file),
        "images_dir": str(images_dir),
        "reference_images": len(names),
    }
    if protocol.caption_sampling == "dmd2":
        import pandas as pd

        meta["pandas_version"] = pd.__version__  # DataFrame.sample's algorithm is pandas' own
    pairs_json = {**meta, "pairs": [asdict(p) for p in pairs]}
    atomic_write_bytes(pairs_file, (json.dumps(pairs_json, indent=1, ensure_ascii=False) + "\n").encode())
    stats_meta = {
        "protocol_hash": protocol.hash(),
        "extractor": getattr(extractor, "name", type(extractor).__name__),
        "weights_sha256": weights,
        "count": stats.count,
    }
    atomic_write_bytes(stats_file, _stats_bytes(stats, stats_meta))
    save_reference_features(features_file, torch.cat(feats))  # all of them: 30K × 2048 float32 is 246 MB
    return stats_file
