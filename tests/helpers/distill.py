"""Small distillation set-ups: an in-memory random teacher, a seconds-long config, a kill mid-iteration,
a Typer app holding `distill`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rapm_bench.distill.config import resolve_distill


def small_teacher(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random-weight tiny-world teacher (UNet, text encoder), small enough for fast CPU tests."""
    from rapm_bench.tiny.train import TeacherArch, build_teacher

    torch.manual_seed(seed)
    return build_teacher(TeacherArch(block_out_channels=(16, 32), text_width=32, text_layers=1))


def tiny_cfg(teacher: Path, tmp_path: Path, **kw):
    """A seconds-long tiny distillation config."""
    base = dict(teacher=str(teacher), device="cpu", out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                num_trajectories=4, trajectory_batch=2, substeps=2, iters=6, checkpoint_every=2, log_every=1,
                sample_every=0, sample_count=2, warmup=2)
    return resolve_distill("tiny", **(base | kw))


@contextmanager
def killed_at_chunk(cls: type, call: int) -> Iterator[None]:
    """Inside the block, the objective's `call`-th `chunks` call raises KeyboardInterrupt (a kill mid-iteration);
    the block must end with it."""
    real, calls = cls.chunks, []

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        yield from real(self, *args, **kwargs)

    cls.chunks = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        cls.chunks = real


def distill_app():
    """A Typer app holding `distill` as a sub-command (the lead's cli.py registers the same function)."""
    import typer

    from rapm_bench.cli_distill import distill

    app = typer.Typer()
    app.command()(distill)
    app.callback()(lambda: None)
    return app
