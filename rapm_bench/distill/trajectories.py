"""Teacher trajectories (docs/rapm.md §3): computed once, cached on disk, resumable.

For K prompts and seeded noise z̃_N the teacher (CFG scale w) runs M DDIM sub-steps per
slot. Stored per trajectory: every boundary point z̃_n (n = 0..N) and ẑΔ_{n+1}, the point
after the first sub-step below each boundary t_{n+1} (n = 0..N−1); with `interior` (PCM's
consistency pairs) also every teacher point strictly inside each slot.

The cache folder is named by a hash of everything that defines the trajectories (teacher
weights fingerprint, prompts, seeds, w, N, M, schedule, dtypes); it fills shard by shard
(one teacher batch each, written atomically), so an interrupted run resumes where it
stopped and ends equal to an uninterrupted one. Under `accelerate launch` the missing
shards split round-robin across the processes (each on its own GPU); shard i holds
trajectories seeded seed + k whatever process computes it, so the cache equals a
single-process fill.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..precision import DTYPES
from ..prompts import coco_captions, read_prompts
from ..sampling import cfg_denoiser, seeded_noise
from ..worlds.base import World
from .schedule import SlotSchedule, ddim_step

FORMAT_VERSION = 1  # bump when the stored layout or the sub-step grid changes


@dataclass(frozen=True)
class TrajectorySpec:
    """Everything that defines a set of teacher trajectories: its hash names the cache folder."""

    teacher: str  # fingerprint of the teacher's weights and text encoding (`teacher_fingerprint`)
    prompts_sha256: str  # of the K prompts, in order
    num: int  # K
    seed: int  # trajectory k starts from noise seeded with seed + k
    guidance: float  # teacher CFG scale w
    slots: int  # N
    substeps: int  # M
    noise_schedule: dict[str, Any]  # the world's NoiseSchedule fields
    latent_shape: tuple[int, ...]
    compute_dtype: str  # the teacher UNet's dtype (round-off differs between fp32 and half precision)
    store_dtype: str  # dtype of the stored points
    batch: int  # trajectories per teacher batch (batching changes round-off, so it is part of the key)
    version: int = FORMAT_VERSION
    interior: bool = False  # also store the M−1 teacher points strictly inside every slot (PCM)

    def record(self) -> dict[str, Any]:
        """The fields that define the trajectories (`interior` only when set: older caches keep their keys)."""
        d = asdict(self)
        if not self.interior:
            del d["interior"]
        return d

    def key(self) -> str:
        """Hex digest naming the cache folder."""
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Trajectories:
    """K cached trajectories, in memory on the CPU."""

    z_tilde: torch.Tensor  # (K, N+1, C, H, W): z_tilde[:, n] = z̃_n (n = N: the noise, n = 0: the sample)
    z_delta: torch.Tensor  # (K, N, C, H, W): z_delta[:, n] = ẑΔ_{n+1}, the relative target's start for slot n
    prompts: tuple[str, ...]
    spec: TrajectorySpec
    folder: Path
    z_fine: torch.Tensor | None = None  # (K, N, M−1, C, H, W): slot n's teacher points at sched.fine(n)[1:-1]
    # (spec.interior only; z_fine[:, n, 0] = z_delta[:, n])

    def __len__(self) -> int:
        return self.z_tilde.shape[0]


def sha256_strings(items: Sequence[str]) -> str:
    """Hash of a list of strings (order matters)."""
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()


@torch.no_grad()
def teacher_fingerprint(world: World, probe: str = "a red circle") -> str:
    """A fast fingerprint of the teacher: strided samples of every UNet weight and one prompt's encoding."""
    h = hashlib.sha256(json.dumps(world.describe(), sort_keys=True, default=str).encode())
    for name, p in sorted(world.unet.named_parameters()):
        if "lora_" in name:
            continue
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    for k, v in sorted(world.encode_prompts([probe]).items()):
        h.update(k.encode())
        h.update(v.float().cpu().numpy().tobytes())
    return h.hexdigest()


def make_spec(world: World, prompts: Sequence[str], seed: int, guidance: float, slots: int, substeps: int,
              store_dtype: str, batch: int, interior: bool = False) -> TrajectorySpec:
    """The spec of these trajectories for this world (`interior`: keep every teacher point inside the slots)."""
    return TrajectorySpec(
        teacher=teacher_fingerprint(world), prompts_sha256=sha256_strings(prompts), num=len(prompts), seed=seed,
        guidance=float(guidance), slots=slots, substeps=substeps, noise_schedule=asdict(world.noise_schedule),
        latent_shape=tuple(world.latent_shape), compute_dtype=str(next(world.unet.parameters()).dtype),
        store_dtype=store_dtype, batch=batch, interior=interior,
    )


@torch.no_grad()
def teacher_points(
    world: World, prompts: Sequence[str], seeds: Sequence[int], guidance: float, sched: SlotSchedule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch by M-step DDIM per slot with CFG w: (z_tilde (B, N+1, ...), z_delta (B, N, ...),
    z_fine (B, N, M−1, ...)), z_fine[:, n, j] at timestep sched.fine(n)[j + 1]."""
    cond = world.encode_prompts(list(prompts))
    denoise = cfg_denoiser(world, cond, guidance)
    z, _ = seeded_noise(seeds, world.latent_shape, world.device)
    pred = world.noise_schedule.prediction_type
    n_slots = sched.slots
    z_tilde: list[torch.Tensor] = [z]  # filled from n = N down to 0, reversed at the end
    z_delta: list[torch.Tensor] = []
    z_fine: list[torch.Tensor] = []  # per slot (B, M−1, ...)
    for n in reversed(range(n_slots)):
        grid = sched.fine(n)
        inside: list[torch.Tensor] = []
        for k, (t, s) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
            ts = sched.timesteps([t, s], z.device)  # on the device once: no stream sync per sub-step
            z = ddim_step(z, denoise(z, ts[0]), sched.alphabar(ts[0]), sched.alphabar(ts[1]), pred)
            if k == 0:
                z_delta.append(z)
            if k < len(grid) - 2:
                inside.append(z)
        z_tilde.append(z)
        z_fine.append(torch.stack(inside, 1) if inside else z.new_zeros(z.shape[0], 0, *z.shape[1:]))
    return torch.stack(z_tilde[::-1], 1), torch.stack(z_delta[::-1], 1), torch.stack(z_fine[::-1], 1)


def teacher_trajectories(
    world: World, prompts: Sequence[str], seeds: Sequence[int], guidance: float, sched: SlotSchedule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: (z_tilde (B, N+1, ...), z_delta (B, N, ...)) by M-step DDIM per slot with CFG w."""
    z_tilde, z_delta, _ = teacher_points(world, prompts, seeds, guidance, sched)
    return z_tilde, z_delta


def _shard_name(start: int) -> str:
    return f"shard_{start:07d}.safetensors"


def load_or_build(
    world: World, prompts: Sequence[str], spec: TrajectorySpec, root: Path, progress: bool = True,
) -> Trajectories:
    """The cached trajectories of `spec` under root/<key>/, computing the missing shards first (split across the
    processes of an `accelerate launch`: shard i goes to process i mod P; all return the whole cache)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from ..locks import wait_for

    if len(prompts) != spec.num:
        raise ValueError("one prompt per trajectory")
    state = PartialState()
    if state.num_processes > 1:
        # One cache key for all processes, the main one's (each encoded the fingerprint's probe on its own GPU).
        spec = broadcast_object_list([spec])[0]
    folder = Path(root) / spec.key()
    with wait_for(folder, "trajectory cache"):  # another job filling it: wait, then reuse the shards it wrote
        return _fill(world, prompts, spec, folder, state, progress)


def _fill(world: World, prompts: Sequence[str], spec: TrajectorySpec, folder: Path, state: Any,
          progress: bool) -> Trajectories:
    """The body of `load_or_build`: compute this process's missing shards of `folder`, then load them all."""
    from safetensors.torch import load_file, save
    from tqdm import tqdm

    from ..files import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(spec.record(), indent=2, sort_keys=True)
    meta_path = folder / "spec.json"
    if meta_path.is_file() and meta_path.read_text() != meta:
        raise UserError(f"trajectory cache {folder} holds a different spec (hash collision?); delete the folder")
    atomic_write_bytes(meta_path, meta.encode())
    atomic_write_bytes(folder / "prompts.json", json.dumps(list(prompts), indent=0).encode())

    sched = SlotSchedule(world.alphas_cumprod, spec.slots, spec.substeps)
    dtype = DTYPES[spec.store_dtype]
    starts = list(range(0, spec.num, spec.batch))
    mine = starts[state.process_index :: state.num_processes]  # fixed by shard index: no race on what exists
    todo = [s for s in mine if not (folder / _shard_name(s)).is_file()]
    total = sum(min(spec.batch, spec.num - s) for s in mine)  # this process's share (the main one's bar)
    done = total - sum(min(spec.batch, spec.num - s) for s in todo)
    with tqdm(total=total, initial=done, desc="teacher trajectories", unit="traj",
              disable=not progress or not todo or not state.is_main_process) as bar:
        for start in todo:
            stop = min(start + spec.batch, spec.num)
            seeds = range(spec.seed + start, spec.seed + stop)
            if spec.interior:
                zt, zd, zf = teacher_points(world, prompts[start:stop], seeds, spec.guidance, sched)
                fine = {"z_fine": zf.to(dtype).cpu().contiguous()}
            else:
                zt, zd = teacher_trajectories(world, prompts[start:stop], seeds, spec.guidance, sched)
                fine = {}
            tensors = {"z_tilde": zt.to(dtype).cpu().contiguous(), "z_delta": zd.to(dtype).cpu().contiguous(), **fine}
            atomic_write_bytes(folder / _shard_name(start), save(tensors))
            bar.update(stop - start)
    state.wait_for_everyone()  # every shard is on disk
    shards = [load_file(str(folder / _shard_name(s))) for s in starts]
    return Trajectories(
        z_tilde=torch.cat([s["z_tilde"] for s in shards]), z_delta=torch.cat([s["z_delta"] for s in shards]),
        prompts=tuple(prompts), spec=spec, folder=folder,
        z_fine=torch.cat([s["z_fine"] for s in shards]) if spec.interior else None,
    )


def training_prompts(preset: str, num: int, prompts_file: str | None, offset: int = 0) -> list[str]:
    """K distillation prompts: the world's own (tiny: the shapes *train* split) or a caption file (txt or COCO
    json)."""
    if prompts_file is None:
        from ..worlds.registry import get_world_spec

        world = get_world_spec(preset)
        if world.training_prompts is None:
            raise UserError(f"preset {preset!r} needs --prompts FILE: {world.prompts_help}")
        return world.training_prompts(num, offset)
    path = Path(prompts_file)
    if path.suffix == ".json":
        items = coco_captions(path)
    else:
        items = read_prompts(path)
    items = items[offset:]
    if len(items) < num:
        raise UserError(f"--num-trajectories {num} needs {num} captions; {path} has {len(items)} after the offset")
    return items[:num]
