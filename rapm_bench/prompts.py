"""Caption files: a UTF-8 text file (one caption a line) or a COCO captions json (`--prompts`, `--captions`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .errors import UserError


def read_prompts(path: Path) -> list[str]:
    """Captions from a UTF-8 text file, one a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no captions (one caption a line)")
    return prompts


def coco_captions(path: Path, seed: int = 0) -> list[str]:
    """One caption per image of a COCO captions_*.json (the first by annotation id), images shuffled with `seed`."""
    try:
        data = json.loads(Path(path).read_text())
        anns = sorted(data["annotations"], key=lambda a: a["id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a COCO captions file ({type(e).__name__}: {e})") from None
    first: dict[int, str] = {}
    for a in anns:
        first.setdefault(a["image_id"], " ".join(a["caption"].split()))
    images = sorted(first)
    random.Random(seed).shuffle(images)
    return [first[i] for i in images]
