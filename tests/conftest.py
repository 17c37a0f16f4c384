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
