"""CLIP score: per-sample scaled cosine between image and caption embeddings, streamed.

The embedding model sits behind `ClipLike` (uint8 images -> unit image embeddings,
captions -> unit text embeddings): `OpenClipEmbedder` for the COCO protocols (open_clip
ViT-g-14, the protocol's image resize before the model's own preprocess) and the tiny
evaluator for `tiny`. `ClipScorer` adds the protocol's prompt prefix, clamp and scale, and
keeps a running (sum, count) so shards merge exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from ..precision import compute
from .features import check_uint8_images, crop_resize_pil, sha256_of, thread_map, to_hwc
from .protocols import Protocol as EvalProtocol


@runtime_checkable
class ClipLike(Protocol):
    """A CLIP model as the scorer sees it (the tiny evaluator satisfies it as is)."""

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> L2-normalised (N, D) float32 on the CPU."""
        ...

    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """N captions -> L2-normalised (N, D) float32 on the CPU."""
        ...


class OpenClipEmbedder:
    """An open_clip model with its eval preprocess and tokenizer, fp32, TF32 off."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        image_resize: int | None = None,
        device: torch.device | str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).float().eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.image_resize = image_resize
        self.num_threads = num_threads
        self.precision = "fp32"  # the protocol's feature_precision (rapm_bench.precision): fp32 = TF32 off
        self.weights_sha256: str | None = None
        self.source: str | None = None

    @classmethod
    def load(
        cls,
        name: str,
        pretrained: str | Path | None,
        image_resize: int | None = None,
        device: torch.device | str = "cpu",
    ) -> OpenClipEmbedder:
        """open_clip `name` with weights from a local checkpoint file or a pretrained tag (hub cache)."""
        import open_clip

        local = pretrained is not None and Path(pretrained).expanduser().is_file()
        if pretrained is not None and not local and ("/" in str(pretrained) or Path(str(pretrained)).suffix):
            raise UserError(f"open_clip checkpoint not found: {pretrained}")
        source = str(Path(pretrained).expanduser()) if local else pretrained
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as e:  # noqa: BLE001 - offline hub miss, bad file, unknown name: one line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"cannot load open_clip {name} ({pretrained}): {first}; pass --clip-checkpoint PATH "
                f"(a local open_clip checkpoint, e.g. open_clip_pytorch_model.bin of the tag's hub repo)"
            ) from None
        emb = cls(model, preprocess, tokenizer, image_resize, device)
        emb.source = f"{name}:{source}"
        if local:
            emb.weights_sha256 = sha256_of(Path(str(source)))
        return emb

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 (3, H, W) image -> the model's input tensor."""
        pil = Image.fromarray(to_hwc(image))
        if self.image_resize is not None:
            pil = crop_resize_pil(pil, self.image_resize, "lanczos")
        return self.preprocess(pil)

    def image_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU part: uint8 (N, 3, H, W) -> the model's preprocessed inputs (N, 3, S, S) on the CPU."""
        check_uint8_images(images)
        return torch.stack(thread_map(self._prepare, list(images.cpu()), self.num_threads))

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """The device part: `image_inputs(images)` -> L2-normalised image embeddings (N, D), float32 on the CPU."""
        x = x.to(self.device)
        with compute(self.precision, self.device):
            emb = self.model.encode_image(x)
        return F.normalize(emb.float(), dim=-1).cpu()

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> L2-normalised image embeddings (N, D), float32 on the CPU."""
        return self.embed_images(self.image_inputs(images))

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> L2-normalised text embeddings (N, D), float32 on the CPU."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        with compute(self.precision, self.device):
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1).cpu()


@dataclass
class ClipScoreStats:
    """Running sum and count of per-sample CLIP scores (float64); merges exactly across shards."""

    sum: float = 0.0
    count: int = 0

    def update(self, scores: torch.Tensor) -> None:
        """Add a batch of per-sample scores."""
        self.sum += float(scores.double().sum())
        self.count += int(scores.numel())

    def merge(self, other: ClipScoreStats) -> ClipScoreStats:
        """Add another shard's statistics into this one; returns self."""
        self.sum += other.sum
        self.count += other.count
        return self

    def mean(self) -> float:
        """The CLIP score: mean of the per-sample scores."""
        if self.count == 0:
            raise ValueError("no CLIP scores accumulated")
        return self.sum / self.count


class ClipScorer:
    """scale · [max](cos(image, prefix + caption)[, 0]) per sample, with a running mean."""

    def __init__(self, embedder: ClipLike, prefix: str = "", scale: float = 100.0, clamp: bool = False) -> None:
        self.embedder = embedder
        self.prefix = prefix
        self.scale = scale
        self.clamp = clamp
        self.stats = ClipScoreStats()

    @classmethod
    def for_protocol(
        cls,
        protocol: EvalProtocol,
        checkpoint: str | Path | None = None,
        device: torch.device | str = "cpu",
        embedder: ClipLike | None = None,
    ) -> ClipScorer:
        """The protocol's scorer; `checkpoint`: a local open_clip file or tiny-evaluator folder."""
        if embedder is None:
            if protocol.clip_model == "tiny-evaluator":
                from .tiny_evaluator import load_tiny_evaluator

                embedder = load_tiny_evaluator(device, Path(checkpoint) if checkpoint is not None else None)
            else:
                weights = checkpoint if checkpoint is not None else protocol.clip_pretrained
                embedder = OpenClipEmbedder.load(protocol.clip_model, weights, protocol.clip_resize, device)
        return cls(embedder, protocol.clip_prefix, protocol.clip_scale, protocol.clip_clamp)

    def describe(self) -> dict[str, Any]:
        """Provenance for results."""
        return {
            "prefix": self.prefix, "scale": self.scale, "clamp": self.clamp,
            "source": getattr(self.embedder, "source", type(self.embedder).__name__),
            "weights_sha256": getattr(self.embedder, "weights_sha256", None),
        }

    def scores(self, images: torch.Tensor, captions: Sequence[str],
               image_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample CLIP scores, float64 (N,), without accumulating them.

        `image_inputs`: the embedder's `image_inputs(images)`, computed beforehand (eval prepares them
        on a worker thread while the GPU generates), used instead of preprocessing `images` again.
        """
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        if image_inputs is not None:
            img = self.embedder.embed_images(image_inputs).double()  # type: ignore[attr-defined]
        else:
            img = self.embedder.image_embeddings(images).double()
        txt = self.embedder.text_embeddings([self.prefix + c for c in captions]).double()
        cos = (img * txt).sum(-1)
        if self.clamp:
            cos = cos.clamp(min=0)
        return self.scale * cos

    def update(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Score a batch and add it to the running mean; returns the per-sample scores."""
        s = self.scores(images, captions)
        self.stats.update(s)
        return s

    def mean(self) -> float:
        """The CLIP score of everything passed to `update`."""
        return self.stats.mean()

