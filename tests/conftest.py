"""Every fixture shared by more than one test module (builders they call live in tests/helpers/):
random-weight SDXL pipeline and LoRA, random tiny teacher, subprocess environment, small CLIP,
synthetic COCO and its prepared statistics, one-thread mode.

Tiers (pyproject.toml's markers): unit tests (no mark), `e2e` (a CLI command or a whole stage end to
end), `slow`, `gpu`. The default run is `not slow and not gpu`: unit + e2e, every command end to end.
`nox -s unit` runs the unit tier alone; `nox -s threads1` runs it with OMP_NUM_THREADS=1 (the
tolerances hold at 1 and at 2 threads)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if "RAPM_BENCH_CACHE" not in os.environ:  # reference statistics go to a private folder, not ~/.cache
    os.environ["RAPM_BENCH_CACHE"] = tempfile.mkdtemp(prefix="rapm-bench-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RAPM_BENCH_CACHE"], ignore_errors=True)

# Under pytest-xdist (`nox -s tests` runs two workers on CI's two cores) each worker takes one thread: two workers of
# two threads would fight over the cores. The tolerances hold at 1 thread as at 2 (`nox -s threads1`).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_report_header(config: pytest.Config) -> str:
    """The thread count the tolerances were checked at (`nox -s threads1` runs the unit tier at 1)."""
    return (f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
            "tiers: unit, e2e (default: both), slow, gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a saved random-weight SDXL pipeline."""
    from helpers.sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_lora(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random diffusers-format LoRA file for the tiny SDXL UNet."""
    from diffusers import UNet2DConditionModel
    from helpers.sdxl import random_unet_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    return random_unet_lora(unet, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A subprocess environment: offline, a private cache, one thread per process (the CPU is shared; one
    thread also fixes the round-off)."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "RAPM_BENCH_CACHE": str(tmp_path_factory.mktemp("cache")),
                         "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random-weight tiny teacher (the shipped layout: unet/, text_encoder/, world.json), small enough
    that a job takes seconds. Read-only: no test writes into it."""
    import json

    from rapm_bench.tiny.train import TeacherArch, build_teacher
    from rapm_bench.worlds.tiny import WORLD_JSON, world_metadata

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    unet, text_encoder = build_teacher(TeacherArch(block_out_channels=(8, 16), attention_heads=2, text_width=16,
                                                   text_layers=1, text_heads=2))
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / WORLD_JSON).write_text(json.dumps(world_metadata(3.0)))
    return folder


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): a shared 2-core
    machine runs small networks far faster without OpenMP contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight open_clip model registered under helpers.clip.MODEL and saved as a local checkpoint."""
    from helpers.clip import build_clip_checkpoint

    return build_clip_checkpoint(tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """(captions_val2014.json, val2014/): 16 synthetic images, 1-7 captions each (helpers/coco.py)."""
    from helpers.coco import build_coco

    return build_coco(tmp_path)


@pytest.fixture()
def rehearsal_protocol(monkeypatch: pytest.MonkeyPatch, clip_checkpoint: Path) -> str:
    """coco30k at 12 pairs, 32-px generation, with the small test CLIP in ViT-g-14's place."""
    import dataclasses

    from helpers.clip import MODEL

    from rapm_bench.eval import protocols

    proto = dataclasses.replace(protocols.get_protocol("coco30k"), name="coco-rehearsal", num_pairs=12,
                                generation_resolution=32, clip_model=MODEL, clip_pretrained=None)
    monkeypatch.setitem(protocols.PROTOCOLS, proto.name, proto)
    return proto.name


@pytest.fixture()
def prepared_coco(tmp_path: Path, coco: tuple[Path, Path], rehearsal_protocol: str) -> tuple[Path, Path]:
    """(stand-in Inception file, data cache) after `rapm-bench data coco` on the synthetic COCO set."""
    from helpers.inception import FakeTorchscriptInception
    from typer.testing import CliRunner

    from rapm_bench.cli import app

    annotations, images = coco
    torch.manual_seed(0)
    inception = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeTorchscriptInception()).save(str(inception))
    cache = tmp_path / "cache"
    prep = CliRunner().invoke(app, ["data", "coco", "--protocol", rehearsal_protocol, "--annotations",
                                    str(annotations), "--images", str(images), "--cache-dir", str(cache),
                                    "--inception", str(inception), "--device", "cpu"])
    assert prep.exit_code == 0, prep.output
    return inception, cache
