"""The tiny evaluator: a small CLIP (open_clip `CLIP`, custom config) for 32×32 shapes images.

It plays two roles in the `tiny` protocol:
- FID features: the *unnormalised projected image embedding* (`encode_image(normalize=False)`,
  `embed_dim`-dimensional), the same layer clean-fid's `clip_vit_b_32` mode uses.
- CLIP score: 100·max(cos(image, text), 0) per sample, and caption retrieval accuracy.

Images in: uint8 (N, 3, 32, 32). Preprocessing: x / 127.5 − 1 (mean 0.5, std 0.5).
Tokenizer: open_clip's `SimpleTokenizer` (BPE shipped in the wheel), context length 32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..precision import no_tf32

CONTEXT_LENGTH = 32
EVALUATOR_CONFIG: dict[str, Any] = {
    "embed_dim": 128,  # FID feature dimension
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def default_evaluator_dir() -> Path:
    """The evaluator weights shipped inside the package."""
    return Path(str(resources.files("rapm_bench") / "assets" / "tiny" / "evaluator"))


def build_clip(config: dict[str, Any]) -> torch.nn.Module:
    """An untrained open_clip `CLIP` from a config dict (embed_dim, vision_cfg, text_cfg)."""
    import open_clip

    return open_clip.CLIP(**config)


class TinyEvaluator:
    """Image features, CLIP score and caption retrieval for the shapes world."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], device: torch.device | str = "cpu") -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).float().eval().requires_grad_(False)
        self.tokenizer = SimpleTokenizer(context_length=config["text_cfg"]["context_length"])

    # --- loading and saving -------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path | None = None, device: torch.device | str = "cpu") -> TinyEvaluator:
        """Load weights + config from `folder` (default: the package's shipped evaluator)."""
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else default_evaluator_dir()
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise UserError(f"tiny evaluator weights missing in {folder}: run `rapm-bench tiny train-evaluator`")
        config = json.loads((folder / CONFIG).read_text())["clip"]
        model = build_clip(config)
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
        model.load_state_dict(state, strict=True)
        return cls(model, config, device)

    def state_dict_fp16(self) -> dict[str, torch.Tensor]:
        """Weights as contiguous fp16 CPU tensors (the shipped format)."""
        return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.model.state_dict().items()}

    # --- inputs -------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length) on the evaluator's device."""
        return self.tokenizer(list(captions)).to(self.device)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float in [-1, 1]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        return images.float() / 127.5 - 1.0

    # --- embeddings ---------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """FID features: unnormalised projected image embeddings (N, embed_dim), float32 on the CPU."""
        out = []
        with no_tf32():
            for i in range(0, images.shape[0], batch_size):
                x = self.preprocess(images[i : i + batch_size].to(self.device))
                out.append(self.model.encode_image(x, normalize=False).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.config["embed_dim"])

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """L2-normalised text embeddings (N, embed_dim), float32 on the CPU."""
        out = []
        with no_tf32():
            for i in range(0, len(captions), batch_size):
                tokens = self.tokenize(captions[i : i + batch_size])
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.config["embed_dim"])

    def image_embeddings(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """L2-normalised image embeddings (N, embed_dim), float32 on the CPU."""
        return F.normalize(self.image_features(images, batch_size), dim=-1)

    # --- metrics ------------------------------------------------------------------------
    def clip_score(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Per-sample CLIP score 100·max(cos(image, caption), 0), float32 (N,)."""
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        cos = (self.image_embeddings(images) * self.text_embeddings(captions)).sum(-1)
        return 100.0 * cos.clamp(min=0)

    def retrieval_hits(self, images: torch.Tensor, captions: Sequence[str], batch: int = 64) -> torch.Tensor:
        """Per-sample hit (bool): the best caption among its batch of `batch` equals the true caption."""
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        img, txt = self.image_embeddings(images), self.text_embeddings(captions)
        hits = []
        for i in range(0, len(captions), batch):
            sim = img[i : i + batch] @ txt[i : i + batch].T
            best = sim.argmax(1).tolist()
            group = captions[i : i + batch]
            hits += [group[b] == group[j] for j, b in enumerate(best)]
        return torch.tensor(hits, dtype=torch.bool)

    def retrieval_accuracy(self, images: torch.Tensor, captions: Sequence[str], batch: int = 64) -> float:
        """Fraction of images whose best caption among the `batch` captions of its batch is its own."""
        return float(self.retrieval_hits(images, captions, batch).float().mean())


def load_tiny_evaluator(device: torch.device | str | None = None, folder: Path | None = None) -> TinyEvaluator:
    """The shipped tiny evaluator (no network), on `device` (default: CUDA if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TinyEvaluator.load(folder, device)
