"""A synthetic COCO captions_val2014.json with a few small JPEGs (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

N_IMAGES = 16


def coco_file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def build_coco(root: Path) -> tuple[Path, Path]:
    """A captions file (16 images, 1-7 captions each, some messy) and the images, of mixed sizes and modes."""
    rng = np.random.default_rng(0)
    ids = sorted(rng.choice(600_000, N_IMAGES, replace=False).tolist())
    images, annotations, ann_id = [], [], 1000
    img_dir = root / "val2014"
    img_dir.mkdir()
    for k, image_id in enumerate(ids):
        w, h = (40, 30) if k % 3 else (24, 36)
        images.append({"id": image_id, "file_name": coco_file_name(image_id), "width": w, "height": h})
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr) if k % 5 else Image.fromarray(arr[..., 0])  # some grayscale, like COCO
        im.save(img_dir / coco_file_name(image_id), quality=90)
        for c in range(int(rng.integers(1, 8))):
            ann_id += int(rng.integers(1, 5))
            annotations.append({"id": ann_id, "image_id": image_id, "caption": f"A photo {k} caption {c} \n"})
    rng.shuffle(annotations)
    ann = root / "annotations" / "captions_val2014.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return ann, img_dir
