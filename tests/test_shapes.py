"""The shapes renderer and grammar: determinism, splits, antialiasing, captions that match pixels."""

from __future__ import annotations

import pytest
import torch

from rapm_bench.worlds import shapes
from rapm_bench.worlds.tiny import tokenize


def test_render_format() -> None:
    images, caps = shapes.render(shapes.split_indices("val", 16))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert len(caps) == 16 and all(c.startswith("a ") and c.endswith(" background") for c in caps)


def test_image_depends_on_its_index_only() -> None:
    idx = shapes.split_indices("train", 300, offset=1234)
    whole = shapes.render_images(idx)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    mixed = torch.cat([shapes.split_indices("eval", 50), idx[perm]])
    again = shapes.render_images(mixed)[50:]
    assert torch.equal(again, whole[perm])
    assert torch.equal(shapes.render_images(idx[7:8]), whole[7:8])
    assert shapes.captions(idx[perm]) == [shapes.captions(idx)[i] for i in perm.tolist()]


def test_render_chunks_agree() -> None:
    idx = shapes.split_indices("train", 40)
    old = shapes.CHUNK
    try:
        shapes.CHUNK = 7
        chunked = shapes.render_images(idx)
    finally:
        shapes.CHUNK = old
    assert torch.equal(chunked, shapes.render_images(idx))


def test_splits_disjoint_and_fixed() -> None:
    ranges = sorted(shapes.SPLITS.values(), key=lambda r: r.start)
    for a, b in zip(ranges, ranges[1:], strict=False):
        assert a.stop <= b.start
    assert shapes.SPLITS["train"] == range(0, 10_000_000)
    assert shapes.split_indices("eval", 3).tolist() == [20_000_000, 20_000_001, 20_000_002]
    with pytest.raises(ValueError, match="holds 100000 indices"):
        shapes.split_indices("val", 10, offset=99_995)
    with pytest.raises(ValueError, match="unknown split"):
        shapes.split_indices("test", 1)


def test_antialiased_edges() -> None:
    images = shapes.render_images(shapes.split_indices("val", 64))
    palette = {tuple(c) for c in (*shapes.COLOURS.values(), *shapes.BACKGROUNDS.values())}
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    mixed = sum(tuple(p) not in palette for p in pixels)
    assert 0.01 < mixed / len(pixels) < 0.2  # edges blend, interiors are flat


def test_caption_matches_pixels() -> None:
    idx = shapes.split_indices("val", 256)
    scene = shapes.scene_attributes(idx)
    images = shapes.render_images(idx)
    caps = shapes.scene_captions(scene)
    bg = torch.tensor(list(shapes.BACKGROUNDS.values()))[scene.background]
    a, b = scene.objects
    corner_free = (a.cell != 0) & (~scene.two | (b.cell != 0))
    assert torch.equal(images[corner_free, :, 0, 0].long(), bg[corner_free])
    for i in range(256):
        if scene.two[i] or shapes.SHAPES[int(a.shape[i])] == "ring":
            continue  # object B may cover A; a ring's centre is background
        centre = images[i, :, int(a.cy[i]), int(a.cx[i])].tolist()
        colour = list(shapes.COLOURS)[int(a.colour[i])]
        assert centre == list(shapes.COLOURS[colour]), caps[i]
        assert f" {colour} " in caps[i] and shapes.CELLS[int(a.cell[i])] in caps[i]


def test_relations_are_true() -> None:
    scene = shapes.scene_attributes(shapes.split_indices("val", 512))
    a, b = scene.objects
    for i, cap in enumerate(shapes.scene_captions(scene)):
        if not scene.two[i]:
            continue
        dx, dy = float(b.cx[i] - a.cx[i]), float(b.cy[i] - a.cy[i])
        if "to the left of" in cap:
            assert dx > 0
        elif "to the right of" in cap:
            assert dx < 0
        elif " above " in cap:
            assert dy > 0
        else:
            assert " below " in cap and dy < 0


def test_captions_mostly_distinct_in_batches() -> None:
    caps = shapes.eval_captions(4096)
    dup = sum(64 - len(set(caps[i : i + 64])) for i in range(0, 4096, 64))
    assert dup / 64 < 1.0  # under one duplicate per batch of 64 on average
    assert caps == shapes.captions(shapes.split_indices("eval", 4096))


def test_fast_tokenizer_equals_simple_tokenizer() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    caps = shapes.eval_captions(200) + ["", "Not a Grammar caption!"]
    assert torch.equal(tokenize(caps), SimpleTokenizer(context_length=32)(caps))


def test_bad_indices() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        shapes.render_images(torch.tensor([-1]))
    assert shapes.render_images([]).shape == (0, 3, 32, 32)


def test_dense_and_per_shape_patches_agree() -> None:
    scene = shapes.scene_attributes(shapes.split_indices("val", 300))
    obj = scene.objects[1]
    ar = torch.arange(shapes.PATCH)
    x = (obj.cx.floor().view(-1, 1, 1) - shapes.PATCH // 2 + ar.view(1, 1, -1)) + 0.5 - obj.cx.view(-1, 1, 1)
    y = (obj.cy.floor().view(-1, 1, 1) - shapes.PATCH // 2 + ar.view(1, -1, 1)) + 0.5 - obj.cy.view(-1, 1, 1)
    args = (obj.shape, scene.two, x, y, obj.radius.view(-1, 1, 1))
    assert torch.equal(shapes._patches_dense(*args), shapes._patches_by_shape(*args))
