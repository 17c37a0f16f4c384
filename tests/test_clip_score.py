"""CLIP score equals a direct open_clip computation (random-weight model from a custom config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.clip import MODEL
from PIL import Image

from rapm_bench.errors import UserError
from rapm_bench.eval.clip_score import ClipLike, ClipScorer, ClipScoreStats, OpenClipEmbedder
from rapm_bench.eval.folders import clip_score_from_folder
from rapm_bench.eval.protocols import get_protocol

CAPTIONS = [
    "a cat sitting on a red sofa",
    "Two people riding bikes down a busy street.\n",
    "A plate of food with broccoli and rice",
    "an airplane flying over the ocean at sunset " * 12,  # longer than 77 tokens: truncated
    "A bathroom with a white sink",
    "a dog",
]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (len(CAPTIONS), 3, 1, 1))
    noise = rng.integers(-60, 60, (len(CAPTIONS), 3, 72, 96))
    return torch.from_numpy((base + noise).clip(0, 255).astype(np.uint8))


def _direct(clip_checkpoint: Path, images: torch.Tensor, captions: list[str], resize: int | None, prefix: str) -> np.ndarray:
    """Cosines computed straight with open_clip: PIL crop + LANCZOS, the model's preprocess, tokenizer."""
    import open_clip
    from torchvision.transforms.functional import center_crop

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(clip_checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    pils = []
    for im in images:
        pil = Image.fromarray(im.permute(1, 2, 0).numpy())
        if resize is not None:
            pil = center_crop(pil, min(pil.size)).resize((resize, resize), Image.LANCZOS)
        pils.append(preprocess(pil))
    with torch.no_grad():
        img = model.encode_image(torch.stack(pils))
        txt = model.encode_text(tokenizer([prefix + c for c in captions]))
    return F.cosine_similarity(img, txt, dim=1).double().numpy()


def _protocol(name: str, **kw: object):
    return dataclasses.replace(get_protocol(name), clip_model=MODEL, **kw)


def test_dmd2_scorer_equals_direct_open_clip(clip_checkpoint: Path, images: torch.Tensor) -> None:
    protocol = _protocol("dmd2-coco10k")
    scorer = ClipScorer.for_protocol(protocol, checkpoint=clip_checkpoint)
    got = scorer.scores(images, CAPTIONS).numpy()
    expected = _direct(clip_checkpoint, images, CAPTIONS, resize=256, prefix="A photo depicts ")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # scale 1, no clamp: raw cosine
    assert scorer.prefix == "A photo depicts " and scorer.scale == 1.0 and not scorer.clamp
    assert (got < 0).any()  # raw cosines pass through unclamped


def test_coco30k_scorer_is_100_max_cos_0(clip_checkpoint: Path, images: torch.Tensor) -> None:
    scorer = ClipScorer.for_protocol(_protocol("coco30k"), checkpoint=clip_checkpoint)
    got = scorer.scores(images, CAPTIONS).numpy()
    cos = _direct(clip_checkpoint, images, CAPTIONS, resize=None, prefix="")
    assert (cos < 0).any() and (cos > 0).any()  # the clamp is exercised
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-4)
    unclamped = ClipScorer(scorer.embedder, "", 100.0, clamp=False).scores(images, CAPTIONS).numpy()
    np.testing.assert_allclose(unclamped, 100 * cos, rtol=1e-5, atol=1e-4)


def test_prefix_text_equals_dmd2_token_splice(clip_checkpoint: Path) -> None:
    """DMD2 splices the tokens of "a photo depicts" after <sot> and re-truncates; prefixing the text is the same."""
    import open_clip

    tok = open_clip.get_tokenizer(MODEL)
    caps = tok(CAPTIONS)
    prefix = tok(["A photo depicts "])[:, 1:4]
    spliced = torch.cat([caps[:, :1], prefix.expand(len(CAPTIONS), -1), caps[:, 1:]], dim=1)[:, :77]
    last = spliced[:, 76:77].clone()
    last[last > 0] = tok.eot_token_id
    spliced = torch.cat([spliced[:, :76], last], dim=1)
    assert torch.equal(spliced, tok(["A photo depicts " + c for c in CAPTIONS]))


def test_streaming_mean_and_shard_merge(clip_checkpoint: Path, images: torch.Tensor) -> None:
    protocol = _protocol("coco30k")
    whole = ClipScorer.for_protocol(protocol, checkpoint=clip_checkpoint)
    per_sample = whole.update(images, CAPTIONS)
    shard_a, shard_b = ClipScorer(whole.embedder, whole.prefix, 100.0, True), ClipScorer(whole.embedder, "", 100.0, True)
    parts = [shard_a.update(images[:2], CAPTIONS[:2]), shard_b.update(images[2:4], CAPTIONS[2:4]),
             shard_b.update(images[4:], CAPTIONS[4:])]
    merged = ClipScoreStats().merge(shard_a.stats).merge(shard_b.stats)
    assert merged.count == whole.stats.count == len(CAPTIONS)
    assert merged.mean() == pytest.approx(float(torch.cat(parts).mean()), rel=1e-12)  # the merge is exact
    assert whole.mean() == pytest.approx(float(per_sample.mean()), rel=1e-12)
    assert merged.mean() == pytest.approx(whole.mean(), rel=1e-5)  # fp32 embeddings vary with batch shape


def test_clip_score_from_folder(clip_checkpoint: Path, images: torch.Tensor, tmp_path: Path) -> None:
    scorer = ClipScorer.for_protocol(_protocol("dmd2-coco10k"), checkpoint=clip_checkpoint)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:06d}.png")
    value = clip_score_from_folder(tmp_path, CAPTIONS, scorer, batch_size=4)
    assert value == pytest.approx(float(scorer.scores(images, CAPTIONS).mean()), rel=1e-5)
    with pytest.raises(UserError, match="6 images in .* but 5 captions"):
        clip_score_from_folder(tmp_path, CAPTIONS[:5], scorer)


def test_tiny_evaluator_plugs_in() -> None:
    from rapm_bench.eval.tiny_evaluator import EVALUATOR_CONFIG, TinyEvaluator, build_clip

    torch.manual_seed(0)
    evaluator = TinyEvaluator(build_clip(EVALUATOR_CONFIG), EVALUATOR_CONFIG)
    assert isinstance(evaluator, ClipLike)
    protocol = get_protocol("tiny")
    scorer = ClipScorer.for_protocol(protocol, embedder=evaluator)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    captions = ["a large red circle at the top left on a gray background"] * 5
    np.testing.assert_allclose(
        scorer.scores(images, captions).numpy(), evaluator.clip_score(images, captions).numpy(), rtol=1e-5, atol=1e-4
    )


def test_missing_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="open_clip checkpoint not found"):
        OpenClipEmbedder.load("ViT-B-32", tmp_path / "missing.bin")
