"""Evaluation protocols as data: one frozen record per protocol, hashed into every result.

A protocol fixes everything that moves FID or CLIP score: the caption set and its seed,
the number of pairs, the reference images, the resolutions and resize filter, the FID
feature network and the CLIP model, prompt prefix and scaling (docs/design.md §7,
docs/reference.md "Evaluation protocols").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..precision import COMPUTE_PRECISIONS

CAPTION_SOURCES = ("coco2014-val", "shapes-eval")
CAPTION_SAMPLINGS = ("coco30k", "dmd2", "shapes-eval")
REFERENCES = ("paired", "all-val2014")
CROPS = ("center",)
RESIZE_FILTERS = ("lanczos", "none")
FID_EXTRACTORS = ("clean-fid-inception", "tiny-evaluator")
FID_MODES = ("clean", "none")
CAPTION_FIELDS = ("caption_source", "caption_sampling", "caption_seed", "num_pairs", "generation_resolution",
                  "vae_precision")
"""The caption spec: what every metric of a protocol shares (the caption pairs and how the images are made)."""


class MetricFields(typing.Protocol):
    """What a protocol reads of a metric (eval/metrics.py's MetricSpec) to hash it."""

    @property
    def name(self) -> str: ...

    @property
    def fields(self) -> tuple[str, ...]: ...  # the Protocol fields its number depends on

    @property
    def settings(self) -> Mapping[str, Any]: ...  # its own settings


@dataclass(frozen=True)
class Protocol:
    """Everything that defines an FID / CLIP-score number; `hash()` names it in results and caches."""

    name: str
    caption_source: str  # "coco2014-val" (captions_val2014.json) or "shapes-eval" (the shapes world's eval split)
    caption_sampling: str  # "coco30k": pycocotools, one seeded caption per image; "dmd2": DMD2's pandas recipe
    caption_seed: int  # seed of the caption/image sampling
    num_pairs: int  # (image, caption) pairs evaluated; `--num-images K` evaluates the first K
    reference: str  # FID reference images: "paired" (the pairs' own images) or "all-val2014"
    generation_resolution: int  # side of the generated images, pixels
    eval_resolution: int  # real and generated images are centre-cropped and resized to this side
    crop: str  # "center": centre crop to a square (torchvision's centre_crop offsets)
    resize_filter: str  # "lanczos" (PIL) or "none" (sizes must already match)
    fid_extractor: str  # "clean-fid-inception" (InceptionV3W pool3, 2048-d) or "tiny-evaluator" (128-d)
    fid_weights_sha256: str | None  # expected weights hash; None = not pinned (the file's hash goes into results)
    fid_mode: str  # "clean": clean-fid's PIL float bicubic resize to 299; "none": features of the eval image
    clip_model: str  # open_clip architecture name, or "tiny-evaluator"
    clip_pretrained: str | None  # open_clip pretrained tag (a local checkpoint may replace it at run time)
    clip_resize: int | None  # centre-crop + LANCZOS to this side before the model's preprocess; None = raw image
    clip_prefix: str  # prepended to every caption for CLIP score ("A photo depicts " for DMD2)
    clip_scale: float  # 100 -> 100·cos; 1 -> raw cosine
    clip_clamp: bool  # max(cos, 0) per sample before scaling
    # Added later, hashed only where they differ from these defaults (every earlier hash holds):
    vae_precision: str = "fp32"  # SDXL VAE decode: "fp32" (TF32 off), "tf32" or "bf16" (rapm_bench.precision)
    feature_precision: str = "fp32"  # FID and CLIP networks: "fp32" (TF32 off), "tf32" or "bf16"

    def __post_init__(self) -> None:
        """Reject values no code path implements."""
        for field, allowed in (
            ("caption_source", CAPTION_SOURCES),
            ("caption_sampling", CAPTION_SAMPLINGS),
            ("reference", REFERENCES),
            ("crop", CROPS),
            ("resize_filter", RESIZE_FILTERS),
            ("fid_extractor", FID_EXTRACTORS),
            ("fid_mode", FID_MODES),
            ("vae_precision", COMPUTE_PRECISIONS),
            ("feature_precision", COMPUTE_PRECISIONS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"protocol {self.name!r}: {field}={value!r} is not one of {', '.join(allowed)}")
        if self.num_pairs < 1 or self.eval_resolution < 1 or self.generation_resolution < 1:
            raise ValueError(f"protocol {self.name!r}: sizes and counts must be positive")

    def to_dict(self) -> dict[str, Any]:
        """The protocol as a plain JSON-able dict."""
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        """Sorted, whitespace-free JSON: the bytes the hash is taken of (later fields only where not default)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _LATER or v != _LATER[k]}
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def hash(self) -> str:
        """Stable short id: the first 12 hex digits of sha256(canonical JSON)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    def _fields(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named fields (later ones only where not default, as in the protocol hash)."""
        return {k: getattr(self, k) for k in names if k not in _LATER or getattr(self, k) != _LATER[k]}

    def caption_spec(self) -> dict[str, Any]:
        """The caption pairs and the generation settings every metric of this protocol shares."""
        return self._fields(CAPTION_FIELDS)

    def metric_record(self, spec: MetricFields) -> dict[str, Any]:
        """What one metric's numbers depend on: the caption spec, the fields it reads, its own settings."""
        return {"metric": spec.name, "captions": self.caption_spec(), "fields": self._fields(spec.fields),
                "settings": _plain(spec.settings)}

    def metric_hash(self, spec: MetricFields) -> str:
        """12 hex digits of sha256(metric record): results agreeing on it are comparable on that metric."""
        record = json.dumps(self.metric_record(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(record.encode()).hexdigest()[:12]

    def with_num_pairs(self, num_pairs: int) -> Protocol:
        """The same protocol on its first `num_pairs` pairs (a different hash)."""
        if num_pairs < 1 or num_pairs > self.num_pairs:
            raise UserError(f"--num-images must be between 1 and {self.num_pairs} for protocol {self.name}")
        return dataclasses.replace(self, num_pairs=num_pairs)


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON-able data (tuples as lists)."""
    return json.loads(json.dumps(dict(settings)))


_LATER = {f.name: f.default for f in dataclasses.fields(Protocol) if f.default is not dataclasses.MISSING}

PROTOCOLS: dict[str, Protocol] = {
    # Default for sdxl: 30K val2014 images, one seeded caption each; reference = those 30K images.
    "coco30k": Protocol(
        name="coco30k",
        caption_source="coco2014-val",
        caption_sampling="coco30k",
        caption_seed=2014,
        num_pairs=30_000,
        reference="paired",
        generation_resolution=1024,
        eval_resolution=512,
        crop="center",
        resize_filter="lanczos",
        fid_extractor="clean-fid-inception",
        fid_weights_sha256=None,
        fid_mode="clean",
        clip_model="ViT-g-14",
        clip_pretrained="laion2b_s12b_b42k",
        clip_resize=None,
        clip_prefix="",
        clip_scale=100.0,
        clip_clamp=True,
        # TF32 instead of fp32, measured harmless on the SDXL architecture (results/bench/README.md, H200): the
        # VAE's uint8 images move by at most 1 level (4 % of values), FID by 2e-4 relative, CLIP score by 1e-4;
        # 3.7× faster decode, 4.2× faster features (issue 14)
        vae_precision="tf32",
        feature_precision="tf32",
    ),
    # DMD2's SDXL protocol (their 19.32): pandas recipe, seed 123, 10K pairs, 512 px LANCZOS, clean-fid;
    # CLIP: centre-crop + LANCZOS 256, "A photo depicts " prefix, mean raw cosine.
    "dmd2-coco10k": Protocol(
        name="dmd2-coco10k",
        caption_source="coco2014-val",
        caption_sampling="dmd2",
        caption_seed=123,
        num_pairs=10_000,
        reference="paired",
        generation_resolution=1024,
        eval_resolution=512,
        crop="center",
        resize_filter="lanczos",
        fid_extractor="clean-fid-inception",
        fid_weights_sha256=None,
        fid_mode="clean",
        clip_model="ViT-g-14",
        clip_pretrained="laion2b_s12b_b42k",
        clip_resize=256,
        clip_prefix="A photo depicts ",
        clip_scale=1.0,
        clip_clamp=False,
    ),
    # The embedded shapes world: eval split captions, paired rendered references, 32 px, tiny evaluator.
    "tiny": Protocol(
        name="tiny",
        caption_source="shapes-eval",
        caption_sampling="shapes-eval",
        caption_seed=0,
        num_pairs=2_000,
        reference="paired",
        generation_resolution=32,
        eval_resolution=32,
        crop="center",
        resize_filter="none",
        fid_extractor="tiny-evaluator",
        fid_weights_sha256=None,
        fid_mode="none",
        clip_model="tiny-evaluator",
        clip_pretrained=None,
        clip_resize=None,
        clip_prefix="",
        clip_scale=100.0,
        clip_clamp=True,
    ),
}

def get_protocol(name: str) -> Protocol:
    """The shipped protocol called `name`."""
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def default_protocol(preset: str) -> Protocol:
    """The protocol a world evaluates on when none is named (its WorldSpec's `default_protocol`)."""
    from ..worlds.registry import get_world_spec

    return get_protocol(get_world_spec(preset).default_protocol)
