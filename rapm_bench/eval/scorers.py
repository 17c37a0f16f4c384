"""A protocol's scorer: FID features, CLIP score and (tiny world) caption retrieval behind one interface."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .clip_score import ClipScorer
from .features import eval_preprocess, load_extractor
from .protocols import Protocol


@dataclass(frozen=True)
class Prepared:
    """A group of uint8 images with the CPU-side inputs of the scorer's networks (`Scorer.prepare`)."""

    images: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class Scorer:
    """uint8 images in, features and scores out (docs/design.md §6: a fixed boundary)."""

    def __init__(self, protocol: Protocol, device: torch.device, inception: str | None = None,
                 clip_checkpoint: str | None = None) -> None:
        self.protocol = protocol
        self.extractor = load_extractor(protocol, inception, device)
        self.clip = ClipScorer.for_protocol(protocol, clip_checkpoint, device)
        for net in (self.extractor, self.clip.embedder):  # SDXL's networks run in the declared precision; the
            if hasattr(net, "precision"):                 # tiny evaluator is fp32 (its protocol declares fp32)
                net.precision = protocol.feature_precision
        self.feature_dim = int(self.extractor.dim)
        self.weights_sha256 = self.extractor.weights_sha256
        # The tiny evaluator also ranks captions: the sharper alignment number of docs/design.md §2.
        self.retriever = self.clip.embedder if hasattr(self.clip.embedder, "retrieval_hits") else None
        self._prepared: Prepared | None = None  # set inside `using`

    def prepare(self, images: torch.Tensor) -> Prepared:
        """The CPU part of scoring `images` (crops and resizes), thread-safe: it reads no mutable state.

        eval runs it on a worker thread while the GPU generates the next group; `features` and
        `clip_scores` of the same tensor inside `using(prepared)` then skip that work.
        """
        inputs: dict[str, torch.Tensor] = {}
        if hasattr(self.extractor, "inputs"):
            inputs["features"] = self.extractor.inputs(eval_preprocess(images, self.protocol))
        if hasattr(self.clip.embedder, "image_inputs"):
            inputs["clip"] = self.clip.embedder.image_inputs(images)
        return Prepared(images, inputs)

    @contextmanager
    def using(self, prepared: Prepared) -> Iterator[None]:
        """Score `prepared.images` from its prepared inputs inside this block."""
        self._prepared = prepared
        try:
            yield
        finally:
            self._prepared = None

    def _ready(self, name: str, images: torch.Tensor) -> torch.Tensor | None:
        """The prepared input `name` of exactly this tensor, or None."""
        p = self._prepared
        return p.inputs.get(name) if p is not None and p.images is images else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """FID features (N, D) of generated or real images, after the protocol's crop and resize."""
        x = self._ready("features", images)
        if x is not None:
            return self.extractor.run(x)  # type: ignore[union-attr]
        return self.extractor(eval_preprocess(images, self.protocol))

    def clip_scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-sample CLIP scores (the protocol's own resize, prefix and scaling)."""
        return self.clip.scores(images, captions, self._ready("clip", images))

    def retrieval_hits(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor | None:
        """Per-sample hit of the right caption among this group's captions (tiny world only)."""
        if self.retriever is None:
            return None
        return self.retriever.retrieval_hits(images, captions, batch=len(captions))

    def describe(self) -> dict[str, Any]:
        """Provenance: extractor and CLIP model with their weight hashes."""
        return {"fid_features": self.extractor.describe(), "clip": self.clip.describe()}


def load_scorer(protocol: Protocol, device: torch.device, inception: str | Path | None = None,
                clip_checkpoint: str | Path | None = None) -> Scorer:
    """The scorer a protocol declares, from local weights."""
    return Scorer(protocol, device, None if inception is None else str(inception),
                  None if clip_checkpoint is None else str(clip_checkpoint))
