"""Generation: captions -> uint8 images, one seeded generator per image.

`generate_batch` is the one code path every model goes through (teacher, RAPM, PCM,
DMD2, any LoRA); `generate` is the `rapm-bench generate` job around it: resumable,
atomic PNG writes, a manifest, an optional contact sheet.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import GenerateConfig, get_preset, resolve_generate
from .errors import UserError
from .lora import resolve_lora_path
from .models import get_model
from .sampling import SamplerRecipe, cfg_denoiser, sample, seeded_noise
from .worlds import World, load_world


@torch.no_grad()
def sample_latents(
    world: World,
    prompts: Sequence[str],
    seeds: Sequence[int],
    recipe: SamplerRecipe,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Clean latents (B, C, h, w) fp32; latent i depends only on (prompts[i], seeds[i])."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    cond = world.encode_prompts(list(prompts))
    noise, gens = seeded_noise(seeds, world.latent_shape, world.device)
    return sample(cfg_denoiser(world, cond, guidance), noise, recipe, world.noise_schedule, steps, gens)


@torch.no_grad()
def generate_batch(
    world: World,
    prompts: Sequence[str],
    seeds: Sequence[int],
    recipe: SamplerRecipe,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Images (B, 3, H, W) uint8 for `prompts`; image i depends only on (prompts[i], seeds[i])."""
    return world.decode(sample_latents(world, prompts, seeds, recipe, steps, guidance))


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


def default_prompts(preset: str, n: int) -> list[str]:
    """Grammar captions from the tiny world's eval split (no prompt file needed)."""
    if preset != "tiny":
        raise UserError(f"preset {preset!r} needs --prompts FILE (one caption a line)")
    from .worlds.shapes import eval_captions

    return eval_captions(n)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that it is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(image: torch.Tensor) -> bytes:
    """(3, H, W) uint8 -> PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def png_ok(path: Path) -> bool:
    """Whether a PNG exists and decodes completely (resume skips only these)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - missing, truncated or corrupt: regenerate
        return False


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """A contact sheet of uint8 images, written atomically."""
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.999))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    atomic_write_bytes(Path(path), png_bytes(grid))


def check_out(out: Path, config_json: str) -> None:
    """Accept an output folder only if it is new, empty, or holds this very run (resume)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    cfg_path = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if not cfg_path.is_file() or cfg_path.read_text() != config_json:
            raise UserError(f"output folder {out} holds another run's files; choose another --out or empty it")


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """`rapm-bench generate`: write PNGs, manifest.json and an optional grid; return the manifest."""
    from tqdm import tqdm

    cfg = resolve_generate(cfg)
    spec = get_model(cfg.model)
    preset = get_preset(cfg.world.preset)
    if cfg.prompts is not None:
        prompts = read_prompts(Path(cfg.prompts))
        n = cfg.num_images or len(prompts)
        if n > len(prompts):
            raise UserError(f"--num-images {n} is more than the {len(prompts)} captions in {cfg.prompts}")
    else:
        n = cfg.num_images or preset.num_images
        prompts = default_prompts(cfg.world.preset, n)
    prompts = prompts[:n]
    out = Path(cfg.out)
    check_out(out, cfg.to_json())

    world = load_world(cfg.world)
    lora = resolve_lora_path(Path(cfg.lora)) if cfg.lora else spec.lora_path(cfg.world.preset, cfg.steps)
    if lora is not None:
        world.load_lora(lora)
        if cfg.fuse:
            world.fuse_lora()
    guidance = world.default_guidance if cfg.guidance is None else cfg.guidance

    atomic_write_bytes(out / "config.json", cfg.to_json().encode())  # the resolved config, before any work
    records = [{"file": f"{i:06d}.png", "prompt": p, "seed": cfg.seed + i} for i, p in enumerate(prompts)]
    todo = [r for r in records if not png_ok(out / r["file"])]
    bs = cfg.batch_size or preset.batch_size
    with tqdm(total=len(records), initial=len(records) - len(todo), desc=f"generate {cfg.model}", unit="img") as bar:
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            images = generate_batch(world, [r["prompt"] for r in chunk], [r["seed"] for r in chunk],
                                    spec.recipe, cfg.steps, guidance)
            for r, img in zip(chunk, images, strict=True):
                atomic_write_bytes(out / r["file"], png_bytes(img))
            bar.update(len(chunk))

    manifest = {
        "model": spec.describe(),
        "steps": cfg.steps,
        "guidance": guidance,
        "lora": None if lora is None else {"path": str(lora), "sha256": sha256_file(lora), "fused": cfg.fuse},
        "world": world.describe(),
        "images": records,
    }
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    if cfg.grid:
        import numpy as np
        from PIL import Image

        first = [torch.from_numpy(np.asarray(Image.open(out / r["file"]).convert("RGB"))).permute(2, 0, 1)
                 for r in records[:64]]
        save_grid(torch.stack(first), Path(cfg.grid))
    return manifest
