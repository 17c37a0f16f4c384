"""The scaling measurement's settings and its build: everything `python -m rapm_bench.scaling` reads, made
once into `--work` (a random-weight SDXL pipeline from perf.sdxl, synthetic COCO-2014 data, a random-weight
clean-fid Inception-v3 and open_clip ViT-g-14). The measurement itself is perf/scaling.py."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .sdxl import SIZES, build_pipeline, check_finite

SMALL_CLIP = "rapm-scaling-clip-small"  # open_clip name of perf.stages_eval.CLIP_SMALL, registered from the work folder
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid loads its Inception by this name


def log(msg: str) -> None:
    """One progress line, flushed (the GPU run logs to a file)."""
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Settings:
    """What one scaling measurement builds and runs; also the worker processes' arguments."""

    work: Path  # build and run folder (reused when complete)
    small: bool  # SDXL's modules at tiny widths on the CPU
    num_images: int  # N: caption/image pairs of the protocol, all evaluated
    resolution: int  # generation side, pixels
    trajectories: int  # K teacher trajectories timed
    trajectory_batch: int | None  # trajectories per shard; None = the sdxl distill preset's
    batch_size: int | None  # generation batch; None = the sdxl preset's
    compile_blocks: bool | None = None  # eval's UNet blocks compiled; None = eval's rule (regions.pays)
    half_convolutions: str = "everywhere"  # the compiled TF32 decode's fp16 convolutions (worlds.sdxl.HALF_CONVOLUTIONS)
    overlap_scoring: bool = True  # eval's --overlap-scoring
    half_attention: bool = True  # the compiled TF32 decode's attention on fp16 tensor cores (worlds.sdxl.HALF_ATTENTION)

    @property
    def root(self) -> Path:
        return self.work / ("small" if self.small else "full")

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def coco(self) -> Path:
        return self.root / f"coco-{self.num_images}"

    @property
    def annotations(self) -> Path:
        return self.coco / "annotations" / "captions_val2014.json"

    @property
    def images(self) -> Path:
        return self.coco / "val2014"

    @property
    def inception(self) -> Path:
        return self.root / "inception" / INCEPTION_FILE

    @property
    def clip(self) -> Path:
        return self.root / "clip" / "open_clip_model.pt"

    @property
    def clip_config(self) -> Path:
        return self.root / "clip-config" / f"{SMALL_CLIP}.json"

    @property
    def data(self) -> Path:
        """Pair lists and reference statistics (`rapm-bench eval --data-dir`)."""
        return self.root / "data"

    def argv(self) -> list[str]:
        """These settings as command-line arguments (for the worker processes)."""
        args = ["--work", str(self.work), "--num-images", str(self.num_images), "--resolution", str(self.resolution),
                "--trajectories", str(self.trajectories)]
        if self.trajectory_batch is not None:
            args += ["--trajectory-batch", str(self.trajectory_batch)]
        if self.batch_size is not None:
            args += ["--batch-size", str(self.batch_size)]
        if self.compile_blocks is not None:
            args += ["--compile-blocks" if self.compile_blocks else "--no-compile-blocks"]
        if self.half_convolutions != "everywhere":
            args += ["--vae-half-convolutions", self.half_convolutions or "off"]
        if not self.overlap_scoring:
            args += ["--no-overlap-scoring"]
        if not self.half_attention:
            args += ["--no-vae-half-attention"]
        return args + (["--small"] if self.small else [])


# --- 1. build (once) -------------------------------------------------------------------------------------
def text_encoder_configs(small: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """SDXL's text encoders: CLIP ViT-L/14 text (768 wide, 12 layers) and OpenCLIP bigG text (1280, 32 layers,
    projection 1280); small: 32 wide, 2 layers (perf.sdxl.SIZES)."""
    return SIZES["small" if small else "full"].text


def build_teacher(folder: Path, small: bool, device: torch.device, resolution: int) -> None:
    """A random-weight SDXL pipeline (perf.sdxl, size small or full) saved with save_pretrained (fp16; fp32 when
    small), after checking a 2-step sample at `resolution` is finite."""

    pipe = build_pipeline("small" if small else "full", device, torch.float32 if small else torch.float16)
    log(f"teacher: latents of a 2-step sample finite, |max| {check_finite(pipe, resolution):.3g}")
    pipe.save_pretrained(folder)


class Pool3(torch.nn.Module):
    """torchvision's Inception-v3 up to its 2048-d pool3 features (its `fc` is an identity)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._forward(x)[0]


class CleanFidInception(torch.nn.Module):
    """The interface of clean-fid's TorchScript file: `layers` maps (N, 3, 299, 299) in [-1, 1] to (N, 2048)."""

    def __init__(self, layers: torch.nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def build_inception(path: Path, small: bool) -> None:
    """A random-weight Inception-v3 TorchScript file (small: average pooling and one linear layer)."""
    from .stages_eval import build_inception as inception_v3

    torch.manual_seed(3)
    if small:
        layers: torch.nn.Module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(),
                                                      torch.nn.Linear(192, 2048))
    else:
        net = inception_v3(torch.device("cpu"))
        for m in net.modules():  # He init: features of order 1 (PyTorch's default init shrinks them to ~1e-8)
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        layers = Pool3(net)
    torch.jit.script(CleanFidInception(layers).eval()).save(str(path))


def build_clip(path: Path, small: bool, device: torch.device) -> None:
    """A random-weight open_clip ViT-g-14 state dict, fp16 (small: CLIP_SMALL, fp32)."""
    from .stages_eval import build_clip as open_clip_model

    torch.manual_seed(4)
    model = open_clip_model(small, device)
    dtype = torch.float32 if small else torch.float16
    torch.save({k: v.to("cpu", dtype) for k, v in model.state_dict().items()}, path)


def build_coco(folder: Path, n: int, small: bool) -> None:
    """COCO-2014-style captions_val2014.json and n JPEGs (640×480; small: 64×48), 1-5 captions each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    things = ["cat", "dog", "bus", "pizza", "man", "woman", "train", "horse", "clock", "bowl of fruit", "surfer"]
    places = ["on a sofa", "in a street", "on a table", "near the sea", "in a kitchen", "in a park", "at night"]
    ids = sorted(int(i) for i in rng.choice(600_000, n, replace=False))
    w, h = (64, 48) if small else (640, 480)
    (folder / "val2014").mkdir(parents=True)
    (folder / "annotations").mkdir()
    images, annotations = [], []
    for k, image_id in enumerate(ids):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / "val2014" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for c in range(int(rng.integers(1, 6))):
            caption = f"A {rng.choice(things)} {rng.choice(places)}, photo {k} caption {c}"
            annotations.append({"id": 1000 + 10 * k + c, "image_id": image_id, "caption": caption})
    data = {"info": {"description": "synthetic COCO-2014 val (rapm_bench.scaling)"}, "images": images,
            "annotations": annotations}
    (folder / "annotations" / "captions_val2014.json").write_text(json.dumps(data))


def _once(target: Path, make: Callable[[Path], None]) -> bool:
    """Make `target` (file or folder) through a temporary sibling renamed at the end, unless it exists."""
    if target.exists():
        return False
    tmp = target.with_name(target.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    make(tmp)
    os.replace(tmp, target)
    return True


def build(s: Settings, device: torch.device) -> list[str]:
    """Everything the measurement reads, built once into the work folder; returns what was built now."""
    from .stages_eval import CLIP_SMALL

    steps: list[tuple[str, Path, Callable[[Path], None]]] = [
        ("teacher", s.teacher, lambda p: build_teacher(p, s.small, device, s.resolution)),
        ("coco", s.coco, lambda p: build_coco(p, s.num_images, s.small)),
        ("inception", s.inception, lambda p: build_inception(p, s.small)),
        ("clip", s.clip, lambda p: build_clip(p, s.small, device)),
    ]
    if s.small:
        steps.append(("clip-config", s.clip_config, lambda p: p.write_text(json.dumps(CLIP_SMALL))))
    built = []
    for name, target, make in steps:
        t0 = time.perf_counter()
        if _once(target, make):
            built.append(name)
            log(f"built {name} in {time.perf_counter() - t0:.1f} s: {target}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return built
