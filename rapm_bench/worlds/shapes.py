"""The shapes world: captioned 32×32 images drawn procedurally, deterministically from an index.

Every attribute of image `i` comes from a counter-based hash of `(i, field)`, so an image
never depends on the batch it is rendered in, the device or the batch size. Shapes are
drawn from analytic signed distances (pixel units) with box-filter coverage
`clamp(0.5 - sdf, 0, 1)`: antialiased edges without supersampling.

Grammar (half the images hold one object, half two):
  "a large red circle at the top left on a gray background"
  "a small blue ring to the left of a large yellow cross on a black background"
A relation is read off the two grid cells (the axis that differs more; ties: horizontal),
so it is always true of the picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
SPLITS: dict[str, range] = {
    "train": range(0, 10_000_000),
    "val": range(10_000_000, 10_100_000),
    "eval": range(20_000_000, 20_100_000),
}
"""Fixed, disjoint index ranges: the teacher and evaluator train on `train` only."""

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 175, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 75, 230),
    "purple": (145, 55, 200),
    "pink": (250, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (120, 120, 120),
    "white": (235, 235, 235),
    "brown": (100, 62, 38),
}
SIZES = ("small", "large")
CELLS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the centre",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
RADIUS = {"small": 3.25, "large": 4.75}  # pixels; the shape's nominal radius
CELL_PITCH = 9.5  # pixels between grid-cell centres (centres at 6.5, 16, 25.5)
JITTER = 0.75  # pixels: uniform offset of an object's centre in x and y
RADIUS_JITTER = 0.08  # relative: uniform scale jitter of an object's radius
P_TWO_OBJECTS = 0.5
CHUNK = 8192  # images rendered at once (bounds memory)
PATCH = 16  # pixels: the window an object is drawn in (its extent is at most ±6 px)

_M32 = 0xFFFFFFFF
# hash fields: one per random attribute; object k uses fields 8*k + 2 .. 8*k + 9
_F_COUNT, _F_BG = 0, 1
_F_SHAPE, _F_COLOUR, _F_SIZE, _F_CELL, _F_DX, _F_DY, _F_SCALE = range(7)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 32-bit x in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (Chris Wellons), on 32-bit values held in int64."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_u32(indices: torch.Tensor, field: int) -> torch.Tensor:
    """A uniform 32-bit integer per (index, field), as int64."""
    return _mix32(_mix32(indices) ^ _mix32(torch.full_like(indices, field * 0x9E3779B9 + 1)))


def hash_uniform(indices: torch.Tensor, field: int) -> torch.Tensor:
    """A uniform float in [0, 1) per (index, field)."""
    return (hash_u32(indices, field) >> 8).to(torch.float32) / float(1 << 24)


def hash_choice(indices: torch.Tensor, field: int, n: int) -> torch.Tensor:
    """A uniform integer in [0, n) per (index, field)."""
    return hash_u32(indices, field) % n


@dataclass(frozen=True)
class ObjectAttrs:
    """One object slot of a batch: integer codes and float geometry, one entry per image."""

    shape: torch.Tensor  # index into SHAPES
    colour: torch.Tensor  # index into COLOURS
    size: torch.Tensor  # index into SIZES
    cell: torch.Tensor  # 0..8, row-major 3×3 grid
    cx: torch.Tensor  # centre x in pixels
    cy: torch.Tensor  # centre y in pixels (down)
    radius: torch.Tensor  # pixels


@dataclass(frozen=True)
class SceneAttrs:
    """Everything that defines a batch of images."""

    indices: torch.Tensor
    two: torch.Tensor  # bool: a second object is present
    background: torch.Tensor  # index into BACKGROUNDS
    objects: tuple[ObjectAttrs, ObjectAttrs]


def _check_indices(indices: torch.Tensor | list[int] | range) -> torch.Tensor:
    """Indices as a 1-D int64 tensor in [0, 2**31)."""
    if isinstance(indices, torch.Tensor):
        idx = indices.to(torch.int64)
    else:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2**31):
        raise ValueError("indices must lie in [0, 2**31)")  # (checked on the CPU only: no device sync)
    return idx


def _object(indices: torch.Tensor, slot: int, cell: torch.Tensor) -> ObjectAttrs:
    """Attributes of object `slot` (0 or 1) placed in grid `cell`."""
    base = 2 + 8 * slot

    def u(f: int) -> torch.Tensor:
        return hash_uniform(indices, base + f)

    size = hash_choice(indices, base + _F_SIZE, len(SIZES))
    nominal = torch.where(size == 1, RADIUS["large"], RADIUS["small"])
    row, col = cell // 3, cell % 3
    return ObjectAttrs(
        shape=hash_choice(indices, base + _F_SHAPE, len(SHAPES)),
        colour=hash_choice(indices, base + _F_COLOUR, len(COLOURS)),
        size=size,
        cell=cell,
        cx=IMAGE_SIZE / 2 + (col - 1).float() * CELL_PITCH + (2 * u(_F_DX) - 1) * JITTER,
        cy=IMAGE_SIZE / 2 + (row - 1).float() * CELL_PITCH + (2 * u(_F_DY) - 1) * JITTER,
        radius=nominal * (1 + (2 * u(_F_SCALE) - 1) * RADIUS_JITTER),
    )


def scene_attributes(indices: torch.Tensor | list[int] | range) -> SceneAttrs:
    """All attributes of the images `indices` (on the indices' device)."""
    idx = _check_indices(indices)
    cell_a = hash_choice(idx, 2 + _F_CELL, 9)
    cell_b = (cell_a + 1 + hash_choice(idx, 10 + _F_CELL, 8)) % 9  # any other cell
    return SceneAttrs(
        indices=idx,
        two=hash_uniform(idx, _F_COUNT) < P_TWO_OBJECTS,
        background=hash_choice(idx, _F_BG, len(BACKGROUNDS)),
        objects=(_object(idx, 0, cell_a), _object(idx, 1, cell_b)),
    )


# --- signed distances (pixel units, negative inside) ------------------------------------------
def _box(x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    """Exact SDF of an axis-aligned box with half sizes (hx, hy)."""
    dx, dy = x.abs() - hx, y.abs() - hy
    outside = torch.hypot(dx.clamp(min=0), dy.clamp(min=0))
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _triangle(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Exact SDF of an upward equilateral triangle with half side r, centred on its centroid (Quilez)."""
    k = math.sqrt(3.0)
    y = -y  # image rows grow downwards
    x = x.abs() - r
    y = y + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.maximum(x.clamp(max=0), -2 * r)
    return -torch.hypot(x, y) * torch.sign(y)


def _sdf(shape: int, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance of shape `shape` with radius r at offsets (x, y) from its centre."""
    name = SHAPES[shape]
    if name == "circle":
        return torch.hypot(x, y) - r
    if name == "square":
        h = 0.89 * r  # area of the circle of radius r
        return _box(x, y, h, h)
    if name == "triangle":
        return _triangle(x, y, 1.0 * r)
    if name == "diamond":
        return (x.abs() + y.abs() - 1.15 * r) / math.sqrt(2.0)
    if name == "ring":
        return (torch.hypot(x, y) - 0.72 * r).abs() - 0.3 * r
    if name == "cross":
        long, short = 0.98 * r, 0.38 * r
        return torch.minimum(_box(x, y, long, short), _box(x, y, short, long))
    raise ValueError(f"unknown shape {name}")


def _patches_by_shape(
    shape: torch.Tensor, present: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Coverage patches, each shape's distance evaluated on its own objects only (CPU)."""
    patch = torch.zeros(shape.numel(), PATCH, PATCH, device=shape.device)
    for s in range(len(SHAPES)):
        sel = ((shape == s) & present).nonzero().squeeze(1)
        if sel.numel():
            patch[sel] = (0.5 - _sdf(s, x[sel], y[sel], r[sel])).clamp(0, 1)
    return patch


def _patches_dense(
    shape: torch.Tensor, present: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """The same patches with every shape evaluated everywhere, then selected (no host syncs: GPUs)."""
    n = shape.numel()
    d = torch.stack([_sdf(s, x, y, r).expand(n, PATCH, PATCH) for s in range(len(SHAPES))])
    d = d.gather(0, shape.view(1, -1, 1, 1).expand(1, n, PATCH, PATCH)).squeeze(0)
    return (0.5 - d).clamp(0, 1) * present.view(-1, 1, 1)


def _coverage(obj: ObjectAttrs, present: torch.Tensor) -> torch.Tensor:
    """Antialiased coverage (N, 1, H, W) of one object slot; zero where absent.

    Each object is drawn into a PATCH×PATCH window around its centre, then pasted into a
    padded canvas (4× fewer distance evaluations than drawing on the whole image).
    """
    n, dev = obj.shape.numel(), obj.shape.device
    half = PATCH // 2
    ar = torch.arange(PATCH, device=dev)
    ox, oy = obj.cx.floor().long() - half, obj.cy.floor().long() - half  # patch origins (pixels)
    x = (ox.view(-1, 1, 1) + ar.view(1, 1, -1)).float() + 0.5 - obj.cx.view(-1, 1, 1)
    y = (oy.view(-1, 1, 1) + ar.view(1, -1, 1)).float() + 0.5 - obj.cy.view(-1, 1, 1)
    patch_fn = _patches_by_shape if dev.type == "cpu" else _patches_dense
    patch = patch_fn(obj.shape, present, x, y, obj.radius.view(-1, 1, 1))
    pad = half  # centres lie inside the image, so a patch overhangs it by at most `half`
    canvas = torch.zeros(n, IMAGE_SIZE + 2 * pad, IMAGE_SIZE + 2 * pad, device=dev)
    rows = (oy + pad).view(-1, 1, 1) + ar.view(1, -1, 1)
    cols = (ox + pad).view(-1, 1, 1) + ar.view(1, 1, -1)
    canvas[torch.arange(n, device=dev).view(-1, 1, 1), rows, cols] = patch
    return canvas[:, pad : pad + IMAGE_SIZE, pad : pad + IMAGE_SIZE].unsqueeze(1)


def _palette(table: dict[str, tuple[int, int, int]], codes: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 255] of shape (N, 3, 1, 1) for palette codes."""
    lut = torch.tensor(list(table.values()), dtype=torch.float32, device=codes.device)
    return lut[codes].view(-1, 3, 1, 1)


def _render_chunk(scene: SceneAttrs) -> torch.Tensor:
    """uint8 (N, 3, H, W) for one chunk of scene attributes."""
    img = _palette(BACKGROUNDS, scene.background).expand(-1, -1, IMAGE_SIZE, IMAGE_SIZE).contiguous()
    for slot, obj in enumerate(scene.objects):
        present = torch.ones_like(scene.two) if slot == 0 else scene.two
        img.lerp_(_palette(COLOURS, obj.colour).expand_as(img), _coverage(obj, present))
    return img.round_().to(torch.uint8)  # a convex mix of palette colours: already in [0, 255]


def render_images(indices: torch.Tensor | list[int] | range, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images (N, 3, 32, 32) for the given indices, on `device` (default: the indices')."""
    idx = _check_indices(indices)
    idx = idx.to(device=device if device is not None else idx.device, dtype=torch.int64)
    out = [_render_chunk(scene_attributes(idx[i : i + CHUNK])) for i in range(0, idx.numel(), CHUNK)]
    if not out:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8, device=idx.device)
    return torch.cat(out)


def _phrase(size: int, colour: int, shape: int) -> str:
    """'a large red circle'."""
    return f"a {SIZES[size]} {list(COLOURS)[colour]} {SHAPES[shape]}"


def _relation(cell_a: int, cell_b: int) -> str:
    """Where object A is relative to object B, from their grid cells."""
    dr, dc = cell_b // 3 - cell_a // 3, cell_b % 3 - cell_a % 3
    if abs(dc) >= abs(dr):
        return "to the left of" if dc > 0 else "to the right of"
    return "above" if dr > 0 else "below"


def scene_captions(scene: SceneAttrs) -> list[str]:
    """Captions of a batch of scene attributes."""
    a, b = scene.objects
    cols = [
        t.tolist()
        for t in (scene.two, scene.background, a.size, a.colour, a.shape, a.cell, b.size, b.colour, b.shape, b.cell)
    ]
    backgrounds = list(BACKGROUNDS)
    out = []
    for two, bg, sa, ca, ha, cell_a, sb, cb, hb, cell_b in zip(*cols, strict=True):
        first = _phrase(sa, ca, ha)
        if two:
            where = f"{_relation(cell_a, cell_b)} {_phrase(sb, cb, hb)}"
        else:
            where = CELLS[cell_a]
        out.append(f"{first} {where} on a {backgrounds[bg]} background")
    return out


def captions(indices: torch.Tensor | list[int] | range) -> list[str]:
    """The captions of the given indices."""
    idx = _check_indices(indices).cpu()
    return scene_captions(scene_attributes(idx.cpu()))


def render(
    indices: torch.Tensor | list[int] | range, device: torch.device | str | None = None
) -> tuple[torch.Tensor, list[str]]:
    """(uint8 images (N, 3, 32, 32), captions) for the given indices."""
    idx = _check_indices(indices)
    return render_images(idx, device), captions(idx)


def split_indices(split: str, n: int, offset: int = 0) -> torch.Tensor:
    """The first `n` indices of a split (after `offset`), as int64."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    r = SPLITS[split]
    if offset < 0 or n < 0 or offset + n > len(r):
        raise ValueError(f"split {split!r} holds {len(r)} indices; asked for [{offset}, {offset + n})")
    return torch.arange(r.start + offset, r.start + offset + n, dtype=torch.int64)


def eval_captions(n: int, offset: int = 0) -> list[str]:
    """Captions of the first `n` eval-split indices: the tiny protocol's prompts."""
    return captions(split_indices("eval", n, offset))
