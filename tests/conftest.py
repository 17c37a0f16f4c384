"""Shared fixtures: a random-weight SDXL-architecture pipeline saved to disk, a LoRA for it."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if "RAPM_BENCH_CACHE" not in os.environ:  # reference statistics go to a private folder, not ~/.cache
    os.environ["RAPM_BENCH_CACHE"] = tempfile.mkdtemp(prefix="rapm-bench-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RAPM_BENCH_CACHE"], ignore_errors=True)

torch.set_num_threads(min(2, torch.get_num_threads()))


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
    from sdxl_fixture import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_lora(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random diffusers-format LoRA file for the tiny SDXL UNet."""
    from diffusers import UNet2DConditionModel
    from sdxl_fixture import random_unet_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    return random_unet_lora(unet, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A subprocess environment: offline, a private cache, one thread per process (the CPU is shared; one
    thread also fixes the round-off)."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "RAPM_BENCH_CACHE": str(tmp_path_factory.mktemp("cache")),
                         "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random-weight tiny teacher (the shipped layout), small enough that a job takes seconds."""
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
