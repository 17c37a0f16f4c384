"""Generation: captions -> uint8 images, one seeded generator per image.

`generate_batches` is the one code path every model goes through (teacher, RAPM, PCM,
DMD2, any LoRA; `generate_batch` is one batch of it); `generate` is the `rapm-bench generate`
job around it: resumable, atomic PNG writes, a manifest, an optional contact sheet.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .config import GenerateConfig, get_preset, resolve_generate
from .cudagraphs import graphed_predict
from .errors import UserError
from .files import TMP_SUFFIX, atomic_write_bytes, is_stale_tmp, remove_stale_tmp, sha256_file  # noqa: F401 - re-exported
from .lora import resolve_lora_path
from .models import get_model
from .prompts import read_prompts
from .regions import WIDE, blocks_compiled, pays
from .sampling import SamplerRecipe, cfg_denoiser, sample, seeded_noise
from .transfer import host_copy
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


Job = tuple[Sequence[str], Sequence[int]]  # one batch: its captions and their seeds


def _queue(world: World, prompts: Sequence[str], seeds: Sequence[int], recipe: SamplerRecipe, steps: int,
           guidance: float) -> tuple[Sequence[int], Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Queue one batch's sampling and decode; returns its seeds, a wait for which latents are finite and a wait
    for its images."""
    latents = sample_latents(world, prompts, seeds, recipe, steps, guidance)
    finite = host_copy(torch.isfinite(latents.flatten(1)).all(1))
    return seeds, finite, world.decode_start(latents)


def _collect(seeds: Sequence[int], finite: Callable[[], torch.Tensor], images: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Wait for a queued batch's images; non-finite latents raise a UserError instead of becoming black images that
    would be scored."""
    out, ok = images(), finite()
    if not bool(ok.all()):
        bad = [int(s) for s, good in zip(seeds, ok.tolist(), strict=True) if not good]
        raise UserError(f"the model produced NaN/Inf latents for {len(bad)} of {len(seeds)} images (seeds "
                        f"{', '.join(map(str, bad[:4]))}{', ...' if len(bad) > 4 else ''}): a LoRA with non-finite "
                        "weights or a half-precision overflow; check the LoRA, or pass --precision fp32")
    return out


@torch.no_grad()
def generate_batches(world: World, jobs: Iterable[Job], recipe: SamplerRecipe, steps: int,
                     guidance: float) -> Iterator[torch.Tensor]:
    """Images (B, 3, H, W) uint8 on the CPU for each (prompts, seeds) job, in order; image i of a job depends only
    on (prompts[i], seeds[i]).

    Each job is queued before the previous one's images are waited for. On a GPU nothing in a job waits for the
    GPU (timesteps, token ids and noise go through pinned memory, DDIM steps on the host's timesteps, the images
    and the finiteness check come back behind CUDA events: `transfer`), so the host tokenises, encodes and draws
    the noise of batch k+1 while the GPU runs batch k, and the GPU does not wait for the host between batches
    (issue 14: an H100 sat idle 43 ms of each 1,487-ms batch of 16, results/bench/profiles/
    profile-generate-b16-h100.txt). Images equal one `generate_batch` call a job (tests/test_tiny_world.py).
    """
    pending = None
    for prompts, seeds in jobs:
        queued = _queue(world, prompts, seeds, recipe, steps, guidance)
        if pending is not None:
            yield _collect(*pending)
        pending = queued
    if pending is not None:
        yield _collect(*pending)


def generate_batch(
    world: World,
    prompts: Sequence[str],
    seeds: Sequence[int],
    recipe: SamplerRecipe,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Images (B, 3, H, W) uint8 for `prompts`; image i depends only on (prompts[i], seeds[i]) (one job of
    `generate_batches`)."""
    return next(generate_batches(world, [(prompts, seeds)], recipe, steps, guidance))


def default_prompts(preset: str, n: int) -> list[str]:
    """The world's own captions when no prompt file is given (tiny: grammar captions of the eval split)."""
    source = get_preset(preset).sample_prompts
    if source is None:
        raise UserError(f"preset {preset!r} needs --prompts FILE (one caption a line)")
    return source(n)


def batch_hint(batch_size: int, more: str = "") -> str:
    """The advice for an out-of-memory error in a batched stage."""
    if batch_size > 1:
        return f"pass a smaller --batch-size (now {batch_size}, try {max(1, batch_size // 2)}){more}"
    return f"--batch-size is already 1{more or '; free GPU memory or use a larger GPU'}"


@contextlib.contextmanager
def oom_hint(what: str, hint: str) -> Iterator[None]:
    """Turn a GPU out-of-memory error into a one-line UserError that names what reduces memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory while {what}: {hint}") from None


def png_bytes(image: torch.Tensor) -> bytes:
    """(3, H, W) uint8 -> PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def png_threads() -> int:
    """Threads for writing PNGs: all CPUs but one (the GPU's launching thread), at most 8, at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _write_png(path: Path, image: torch.Tensor) -> None:
    atomic_write_bytes(path, png_bytes(image))


class PngWriter:
    """Writes (3, H, W) uint8 images as PNGs, atomically, on a pool of threads while the caller goes on.

    Pillow releases the GIL while it compresses, so the pool runs in parallel: a 1024-px PNG takes 0.1-0.3 s of one
    CPU core, more than the ~0.11 s the GPU spends on an SDXL image (results/bench/probes/probe_png.py). At most
    `pending` images wait (`write` blocks until one is done); a writer's error is raised by the next `write` or by
    `close`. Leaving the `with` block waits for every file; leaving it on an error drops the writes not yet
    started (a file is there complete or not at all, as with `atomic_write_bytes`).
    """

    def __init__(self, threads: int | None = None, pending: int = 64) -> None:
        self.threads = threads or png_threads()
        self.pending = max(1, pending)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png")
        self._jobs: collections.deque[Future[None]] = collections.deque()

    def write(self, path: Path, image: torch.Tensor) -> None:
        """Queue one image for `path` (waits while `pending` are queued; raises an earlier write's error)."""
        while self._jobs and (self._jobs[0].done() or len(self._jobs) >= self.pending):
            self._jobs.popleft().result()
        self._jobs.append(self._pool.submit(_write_png, path, image))

    def close(self) -> None:
        """Wait for every queued file; raise the first error."""
        try:
            while self._jobs:
                self._jobs.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close()
            return
        self._jobs.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)  # the error in flight wins; started files finish


def png_ok(path: Path) -> bool:
    """Whether a PNG exists and decodes completely (resume skips only these)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - missing, truncated or corrupt: regenerate
        return False


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """A contact sheet of uint8 images, written atomically."""
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.999))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    atomic_write_bytes(Path(path), png_bytes(grid))


def check_out(out: Path, config_json: str, option: str = "--out") -> None:
    """Accept an output folder only if it is new, empty, or holds this very run (resume).

    Leftover temporary files of a killed run do not count; its config.json must equal this one.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder")
    cfg_path = out / "config.json"
    from .locks import is_lock_file

    if out.exists() and any(not is_stale_tmp(p) and not is_lock_file(p) for p in out.iterdir()):
        if not cfg_path.is_file() or cfg_path.read_text() != config_json:
            raise UserError(f"output folder {out} holds another run's files (its config.json is not this "
                            f"command's); choose another {option} or empty it")


def _manifest_hashes(path: Path) -> dict[str, str]:
    """{file: sha256} of the images a previous run's manifest.json recorded (empty if none)."""
    try:
        return {r["file"]: r["sha256"] for r in json.loads(path.read_text())["images"] if "sha256" in r}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _image_done(path: Path, sha256: str | None) -> bool:
    """Whether a resumed run may keep this PNG: it decodes and matches its recorded hash, if any."""
    return png_ok(path) and (sha256 is None or sha256_file(path) == sha256)


def _memory_hint(preset: str) -> str:
    """What else reduces GPU memory in a world (after --batch-size)."""
    return get_preset(preset).generate_memory_hint


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """`rapm-bench generate`: write PNGs, manifest.json and an optional grid; return the manifest."""
    from .locks import hold

    with hold(Path(cfg.out), "output folder"):  # one job per folder: a second fails at once, naming this one
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> dict[str, Any]:
    """The body of `generate`."""
    from tqdm import tqdm

    cfg = resolve_generate(cfg)
    spec = get_model(cfg.model, cfg.lora)  # a LoRA trained here: its own sampler
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
    if cfg.grid and Path(cfg.grid).is_dir():
        raise UserError(f"--grid {cfg.grid} is a folder; give a file name, e.g. {Path(cfg.grid) / 'grid.png'}")

    lora = resolve_lora_path(Path(cfg.lora)) if cfg.lora else spec.lora_path(cfg.world.preset, cfg.steps)
    world = load_world(cfg.world)
    if lora is not None:
        world.load_lora(lora)
        if cfg.fuse:
            world.fuse_lora()
    guidance = world.default_guidance if cfg.guidance is None else cfg.guidance

    if out.is_dir():
        remove_stale_tmp(out)  # leftovers of a killed run: never read, only cleared
    atomic_write_bytes(out / "config.json", cfg.to_json().encode())  # the resolved config, before any work
    records = [{"file": f"{i:06d}.png", "prompt": p, "seed": cfg.seed + i} for i, p in enumerate(prompts)]
    # Resume: batches stay those of an uninterrupted run (batch k = images k*bs ... k*bs+bs-1), so a
    # regenerated image is computed in the same batch, bit for bit; a batch is redone whole when any of
    # its images is missing, does not decode, or differs from the sha256 a previous manifest recorded.
    bs = cfg.batch_size  # resolve_generate filled it (WorldSpec.default_batch)
    known = _manifest_hashes(out / "manifest.json")
    batches = [records[i : i + bs] for i in range(0, len(records), bs)]
    todo = [b for b in batches if not all(_image_done(out / r["file"], known.get(r["file"])) for r in b)]
    # from the whole run's size, so that a resumed run compiles as the uninterrupted one did (same images)
    blocks = pays(world, len(records) * (cfg.steps or 0), cfg.compile_blocks)
    with tqdm(total=len(records), initial=len(records) - sum(map(len, todo)), desc=f"generate {cfg.model}",
              unit="img") as bar, blocks_compiled(world.unet, blocks, WIDE), graphed_predict(world), \
            PngWriter(pending=2 * bs + png_threads()) as pngs:  # GPU: compiled blocks (regions.pays), the UNet
        # passes replayed from CUDA graphs; the PNGs of a batch are written by threads while the next one generates
        stream = generate_batches(world, (([r["prompt"] for r in c], [r["seed"] for r in c]) for c in todo),
                                  spec.recipe, cfg.steps, guidance)  # batch k+1 queued before k is waited for
        for chunk in todo:
            with oom_hint(f"generating {len(chunk)} images", batch_hint(bs, _memory_hint(cfg.world.preset))):
                images = next(stream)
            for r, img in zip(chunk, images, strict=True):
                pngs.write(out / r["file"], img)
            bar.update(len(chunk))
    records = [r | {"sha256": sha256_file(out / r["file"])} for r in records]

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
