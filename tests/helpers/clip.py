"""A small random-weight open_clip model, registered under MODEL (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODEL = "rapm-test-clip"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def build_clip_checkpoint(root: Path) -> Path:
    """Register MODEL with open_clip (from a config file in `root`) and save seeded random weights there."""
    import open_clip

    (root / f"{MODEL}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(root / f"{MODEL}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    path = root / "weights.pt"
    torch.save(model.state_dict(), path)
    return path
