"""Jobs that run between a world's UNet calls: eval scores one group while the GPU samples the next (issue 14).

The host queues generation's work ahead of the GPU (generate.generate_batches: one batch ahead), so during
generation the CPU mostly waits. `Alongside` shadows `world.predict` inside its block: once a call is queued on the
GPU, it runs the oldest waiting job whose inputs are ready, its kernels on a side CUDA stream, so the job's host
time (Python, launches, copies back) hides behind the UNet's GPU time; its GPU time hides only where the UNet leaves
the GPU idle (SDXL at batch 16 on an H100: the 30K eval's steady rate 9.51 -> 9.70 images/s, measured before
batches were queued ahead). As the next group's first batch is queued before a group's images come back, a group
is scored beside the next group's second batch and later: a one-batch group's predecessor at the end.
Jobs run one after another in submission order, in the caller's thread (the global TF32 switches of
`rapm_bench.precision` are set and restored by one thread at a time), so what they add up is what a loop running
them between groups adds up (tests/test_eval_overlap.py).

A job reads host tensors and weights only: it never waits for the main stream's work, so it must not read its
outputs.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import torch


class Alongside:
    """Jobs run after a world's UNet calls are queued (`enabled`), else only when `drain` is called; a context
    manager that shadows `world.predict` (enter it after `cudagraphs.graphed_predict`). Jobs still waiting when
    the block ends are dropped: the caller drains them."""

    def __init__(self, world: Any, enabled: bool = True) -> None:
        self.world, self.enabled = world, enabled
        cuda = world.device.type == "cuda"
        self.stream = torch.cuda.Stream(world.device) if enabled and cuda else None
        self.jobs: deque[tuple[Callable[[], None], Callable[[], bool]]] = deque()
        self.ran_beside = 0  # jobs run between UNet calls (the rest ran in `drain`)
        self._inner: Any = None
        self._shadowed = False

    def submit(self, job: Callable[[], None], ready: Callable[[], bool] = lambda: True) -> None:
        """Queue `job`; it runs after a later UNet call once `ready()` holds, or in `drain`."""
        self.jobs.append((job, ready))

    def drain(self) -> None:
        """Run every waiting job now, in order (each waits for its inputs)."""
        while self.jobs:
            self._run(self.jobs.popleft()[0])

    def _run(self, job: Callable[[], None]) -> None:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            job()

    def _predict(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The world's predict, then the oldest waiting job if its inputs are ready (one job a call)."""
        out = self._inner(x, t, cond)
        if self.jobs and self.jobs[0][1]():
            self._run(self.jobs.popleft()[0])
            self.ran_beside += 1
        return out

    def __enter__(self) -> Alongside:
        if self.enabled:
            self._shadowed = "predict" in vars(self.world)  # graphed_predict's Graphed, say: restored at the end
            self._inner = self.world.predict
            self.world.predict = self._predict
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        if self._shadowed:
            self.world.predict = self._inner
        else:
            del self.world.predict

