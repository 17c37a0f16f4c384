"""`rapm-bench eval`: generate for a protocol's captions and stream the images into FID and CLIP.

Images never touch the disk (saving PNGs is optional): each batch goes as uint8 tensors
into the protocol's feature extractor and CLIP scorer; FID statistics accumulate in
float64 and merge exactly across processes (`accelerate launch`), which shard the
captions by fixed groups of indices. Image i is drawn with seed + i, so the result does
not depend on the number of processes or the batch size.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig, get_preset
from ..cudagraphs import graphed_predict
from ..errors import UserError
from ..files import atomic_write_bytes, sha256_file
from ..generate import PngWriter, batch_hint, generate_batches, oom_hint, png_threads
from ..models import get_model, with_lora
from ..provenance import device_name, git_commit, versions
from ..regions import WIDE, blocks_compiled, pays
from ..worlds import World, load_world
from .metrics import GROUP, Accumulator, Finish, detectors, finalize, metrics
from .overlap import Alongside
from .protocols import Protocol, default_protocol, get_protocol
from .reference import protocol_captions
from .scorers import Prepared, Scorer, load_scorer


def result_name(model: str, steps: int, protocol: str) -> str:
    """File name of one result: one JSON per (model, steps, protocol)."""
    return f"{model}-{steps}step-{protocol}.json"


def _all_reduce(acc: Accumulator, state: Any) -> None:
    """Sum the shards' accumulators across processes (exact: float64 sums)."""
    if state.num_processes == 1:
        return
    import torch.distributed as dist

    ts = acc.tensors(state.device)
    for t in ts:
        dist.all_reduce(t)
    acc.load_tensors(ts)


def evaluate(cfg: EvalConfig) -> dict[str, Any] | None:
    """Run one evaluation; write and return its result record (None on non-main processes)."""
    import hashlib

    from ..locks import hold

    folder = Path(cfg.out) if cfg.out else Path("results") / get_preset(cfg.world.preset).name
    key = hashlib.sha1(json.dumps([cfg.model, cfg.lora, cfg.steps, cfg.guidance, cfg.protocol, cfg.num_images,
                                   cfg.seed]).encode()).hexdigest()[:12]
    with hold(folder, "results folder", key):  # one job per result: the same evaluation twice fails at once,
        return _evaluate(cfg)  # naming this one; other evaluations write into the same folder side by side


def _evaluate(cfg: EvalConfig) -> dict[str, Any] | None:
    """The body of `evaluate`."""
    from accelerate import PartialState
    from tqdm import tqdm

    preset = get_preset(cfg.world.preset)
    spec = get_model(cfg.model)
    lora_override = _lora_file(cfg.lora) if cfg.lora else None
    spec = with_lora(spec, lora_override)  # a LoRA trained here samples at its own step count and sampler
    steps, guidance_or_none = spec.resolve(cfg.steps, cfg.guidance)
    protocol = get_protocol(cfg.protocol) if cfg.protocol else default_protocol(preset.name)
    captions_all = protocol_captions(protocol, Path(cfg.data_dir) if cfg.data_dir else None)
    n = len(captions_all) if cfg.num_images is None else cfg.num_images  # a given one is >= 2 (EvalConfig)
    if n > len(captions_all):
        raise UserError(f"--num-images {n} is more than the {len(captions_all)} caption pairs of protocol "
                        f"{protocol.name!r}")
    if n < 2:
        raise UserError(f"protocol {protocol.name!r} has {n} caption pairs; a covariance needs at least 2")
    captions = captions_all[:n]
    out_dir = Path(cfg.out) if cfg.out else Path("results") / preset.name
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    batch = preset.default_batch(cfg.world.device) if cfg.batch_size is None else cfg.batch_size
    images_out = Path(cfg.images_out) if cfg.images_out else None
    if images_out is not None:
        from ..generate import check_out

        check_out(images_out, _images_config(cfg, steps, protocol), "--save-images")

    if cfg.lora and spec.lora is None:
        raise UserError(f"--lora replaces a LoRA model's weights; {spec.name!r} has none: use --model lora:PATH")

    state = PartialState(cpu=cfg.world.device == "cpu")
    t_load = time.perf_counter()
    world_cfg = cfg.world if state.num_processes == 1 else replace(cfg.world, device=str(state.device))
    world_cfg = replace(world_cfg, resolution=world_cfg.resolution or protocol.generation_resolution)
    lora = lora_override or spec.lora_path(preset.name, steps)  # a missing LoRA fails before the world loads
    world = load_world(replace(world_cfg, teacher=world_cfg.teacher or preset.teacher))
    if lora is not None:
        world.load_lora(lora)
        if cfg.fuse:
            world.fuse_lora()
    world.set_vae_precision(protocol.vae_precision)  # the protocol's decode precision (SDXL; tiny: no VAE)
    guidance = world.default_guidance if guidance_or_none is None else guidance_or_none
    scorer = load_scorer(protocol, world.device, cfg.inception, cfg.clip_checkpoint)
    specs = list(metrics().values())
    references = {m.name: m.reference(protocol, scorer, Path(cfg.data_dir) if cfg.data_dir else None)
                  for m in specs if m.reference is not None}
    state.wait_for_everyone()  # the loop starts together: its time is the slowest shard's
    load_s = time.perf_counter() - t_load

    groups = [range(g, min(g + GROUP, n)) for g in range(0, n, GROUP)]
    mine = groups[state.process_index :: state.num_processes]
    acc = Accumulator.empty(n, detectors(specs), scorer)
    if images_out is not None:
        atomic_write_bytes(images_out / "config.json", _images_config(cfg, steps, protocol).encode())
    memory = preset.eval_memory_hint
    t0 = time.perf_counter()
    blocks = pays(world, n * steps, cfg.compile_blocks)  # the whole run's size: the same for every shard
    with tqdm(total=sum(len(g) for g in mine), desc=f"eval {spec.name} {steps}-step", unit="img",
              disable=not state.is_main_process) as bar, blocks_compiled(world.unet, blocks, WIDE), graphed_predict(world), \
            Alongside(world, cfg.overlap_scoring) as beside, \
            ThreadPoolExecutor(1, thread_name_prefix="eval-prepare") as worker, \
            PngWriter(pending=GROUP + png_threads()) as pngs:
        # GPU: compiled blocks (regions.pays), UNet passes from CUDA graphs. The CPU part of scoring a group
        # (crops, resizes) runs on `worker` while this thread generates the next group; the group is then scored
        # in this thread, in group order, so the sums are those of a loop without the worker: between the next
        # group's UNet calls on a side CUDA stream (`beside`, eval/overlap.py; --no-overlap-scoring: after the
        # next group). The optional PNGs are written by `pngs`' threads meanwhile.
        first_s: float | None = None  # the first group's generation: compiles, graph captures, cuDNN's warm-up
        phases = {"generate_s": 0.0, "score_s": 0.0}  # this thread's time (each phase ends on a copy to the CPU)
        prepare_s: list[float] = []  # the worker's time, hidden behind generation where it is shorter

        def prepare(images: torch.Tensor) -> Prepared:
            """The worker's job for one group: the scorer's CPU inputs."""
            t = time.perf_counter()
            prepared = scorer.prepare(images)
            prepare_s.append(time.perf_counter() - t)
            return prepared

        def score(group: range, job: Future[Prepared]) -> None:
            """Score one generated group once its CPU inputs are ready."""
            t = time.perf_counter()
            prepared = job.result()
            with oom_hint(f"scoring {len(group)} images with the protocol's FID and CLIP networks",
                          "free GPU memory (other processes on this GPU), use a larger GPU, or pass "
                          "--no-overlap-scoring; --batch-size sets generation batches only"), scorer.using(prepared):
                _score_group(acc, scorer, prepared.images, [captions[i] for i in group], group)  # rows on the CPU
            phases["score_s"] += time.perf_counter() - t

        batches = [[list(range(s, min(s + batch, g.stop))) for s in range(g.start, g.stop, batch)] for g in mine]
        stream = generate_batches(world, (([captions[i] for i in idx], [cfg.seed + i for i in idx])
                                          for group_batches in batches for idx in group_batches),
                                  spec.recipe, steps, guidance)  # batch k+1 queued before k is waited for
        for group, group_batches in zip(mine, batches, strict=True):
            t_group, scored = time.perf_counter(), phases["score_s"]
            imgs = []
            for idx in group_batches:
                with oom_hint(f"generating {len(idx)} images", batch_hint(batch, memory)):
                    imgs.append(next(stream))
                bar.update(len(idx))
            images = torch.cat(imgs)  # uint8 on the CPU
            job = worker.submit(prepare, images)
            if images_out is not None:
                for i, img in zip(group, images, strict=True):
                    pngs.write(images_out / f"{i:06d}.png", img)
            beside.drain()  # the last group's scoring, where it did not run between this group's UNet calls
            beside.submit(functools.partial(score, group, job), job.done)
            phases["generate_s"] += time.perf_counter() - t_group - (phases["score_s"] - scored)
            if first_s is None:  # the group's images reached the CPU: its GPU work is done
                first_s = time.perf_counter() - t0
        generated_s = time.perf_counter() - t0  # every group generated, all but the last scored
        beside.drain()
        scored_beside = beside.ran_beside
    _all_reduce(acc, state)
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    state.wait_for_everyone()
    seconds = time.perf_counter() - t0

    if not state.is_main_process:
        return None
    t_int = time.perf_counter()
    scores = finalize(specs, Finish(protocol, n, acc, references, world.device))
    intervals_s = time.perf_counter() - t_int
    result = _record(cfg, spec, steps, guidance, protocol, n, scores, world, lora, seconds, scorer)
    # Timings of this run (main process; not part of what identifies or compares a result).
    # The loop is first group + steady groups + tail; a longer run extrapolates as load + first + its other
    # images at the steady rate + tail (perf.scaling).
    rest = sum(len(g) for g in mine[1:])  # after the first group: the steady rate, for extrapolating a longer run
    steady_s = generated_s - first_s if first_s is not None else 0.0
    result["timing"] = {"load_s": load_s, "loop_s": seconds, "images_per_s": result["images_per_second"],
                        "first_group_s": first_s, "first_group_images": len(mine[0]) if mine else 0,
                        "steady_images_per_s": rest / steady_s if rest and steady_s > 0 else None,
                        # once a run: the last group's scoring, the merge across processes, the blocks and graphs let go
                        "tail_s": seconds - generated_s,
                        "compiled_blocks": blocks, "overlap_scoring": cfg.overlap_scoring,
                        "groups_scored_beside": scored_beside, **phases, "prepare_s": sum(prepare_s),
                        "intervals_s": intervals_s, "processes": state.num_processes}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / result_name(spec.name, steps, protocol.name)
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    result["path"] = str(path)
    return result


def _lora_file(path: str) -> Path:
    """An explicit `--lora` file, checked before any work."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--lora {p} not found: pass a LoRA file (or a folder holding one)")
    return p


def _images_config(cfg: EvalConfig, steps: int, protocol: Protocol) -> str:
    """What identifies the images `--save-images` writes (config.json of that folder)."""
    return json.dumps({"command": "eval", "model": cfg.model, "lora": getattr(cfg, "lora", None), "steps": steps,
                       "guidance": cfg.guidance,
                       "protocol": protocol.name, "protocol_hash": protocol.hash(), "seed": cfg.seed,
                       "world": asdict(cfg.world)}, indent=2, sort_keys=True)


def _score_group(acc: Accumulator, scorer: Scorer, images: torch.Tensor, captions: list[str], group: range) -> None:
    """Every detector's per-image rows of one group of images (image indices `group`), each computed once."""
    for name, rows in acc.rows.items():
        out = acc.detectors[name].run(scorer, images, captions)
        if name in acc.stats:
            acc.stats[name].update(out)
        rows[group.start : group.stop] = out.to(rows.dtype).cpu()
        acc.sums[name] += out.double().cpu().sum(0)


def _record(cfg: EvalConfig, spec: Any, steps: int, guidance: float, protocol: Protocol, n: int,
            scores: dict[str, Any], world: World, lora: Path | None, seconds: float, scorer: Scorer) -> dict[str, Any]:
    """The result JSON: scores (every metric's fields, metrics.finalize) with full provenance."""
    return {
        "model": spec.name,
        "steps": steps,
        "guidance": guidance,
        "sampler": spec.recipe.describe(),
        "preset": cfg.world.preset,
        "protocol": protocol.name,
        "protocol_hash": protocol.hash(),
        "num_images": n,
        "seed": cfg.seed,
        **scores,
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
        "device": device_name(world.device),
        "world": world.describe(),
        "lora": None if lora is None else {"path": str(lora), "sha256": sha256_file(lora) if lora.is_file() else None},
        "scorer": scorer.describe(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(["rapm-bench", *sys.argv[1:]]) if sys.argv and "rapm" in sys.argv[0] else None,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
