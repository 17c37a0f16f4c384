"""Measuring: timed calls (CUDA synchronised), FLOPs counted by `FlopCounterMode`, the GPUs' peak table
for the floors."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

GIB = 2**30

# --- peaks: dense bf16 TFLOP/s by GPU name (first substring match wins) ------------------------------
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200", 790.0, "bf16 8192³ matmul measured on an H200 (docs/reference.md, Measured here)"),
    ("H100 PCIe", 756.0, "spec sheet, dense bf16"),
    ("H100 NVL", 835.0, "spec sheet, dense bf16"),
    ("H100", 790.0, "issue #7: H100 SXM bf16 matmul ceiling (spec sheet 989)"),
    ("A100", 312.0, "spec sheet, dense bf16"),
    ("A6000", 154.8, "spec sheet (RTX A6000), dense bf16"),
    ("L40S", 362.0, "spec sheet, dense bf16"),
    ("RTX 4090", 165.2, "spec sheet, dense bf16, fp32 accumulate"),
)


# --- measuring -------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _extra_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formulas FlopCounterMode lacks: the CPU attention kernels (same maths as on CUDA), and `bmm` with an
    fp32 `out_dtype` (worlds/attention.py's fp16 products; torch 2.11's own formula fails on the extra argument)."""
    from torch.utils.flop_counter import bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def bmm(a: Any, b: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return bmm_flop(a, b)

    table: dict[Any, Callable[..., int]] = {aten.bmm: bmm}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_flop_count(q, k, v)

        def bwd(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_backward_flop_count(g, q, k, v)

        table[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return table


def flop_counts(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of one call by aten op ("addmm", "convolution", ...), counted by FlopCounterMode (matmuls,
    convolutions, attention; not elementwise).

    nn.MultiheadAttention's fused inference path is switched off while counting (its
    projections would go uncounted); the arithmetic is the same.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ..cudagraphs import eager

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    # compiled modules (the VAE decode) run eagerly while counting: a first call under the counter's dispatch
    # mode would not compile, and later calls would not either (a bench row then timed the eager decode)
    stance = getattr(torch._dynamo, "set_stance", None)
    try:
        with (FlopCounterMode(display=False, custom_mapping=_extra_flops()) as counter, eager(),
              stance("force_eager") if stance is not None else contextlib.nullcontext()):
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    # the packet's name: "aten.addmm" -> "addmm"
    return {str(op).split(".")[1] if "." in str(op) else str(op): int(n)
            for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (`flop_counts`, summed)."""
    return sum(flop_counts(fn).values())


@dataclass(frozen=True)
class Measurement:
    """Timed calls of one variant of a stage."""

    name: str
    unit: str  # what a call produces: "image", "iteration", "trajectory", ...
    units: int  # how many per call
    seconds: tuple[float, ...]  # each timed call
    flops: int | None  # counted FLOPs of one call
    peak_memory_gib: float | None  # torch.cuda.max_memory_allocated during the timed calls
    extra: dict[str, Any] = field(default_factory=dict)
    warmup_seconds: tuple[float, ...] = ()  # each untimed warm-up call (compiles and graph captures happen there)

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.seconds)

    def row(self, peak_tflops: float | None) -> dict[str, Any]:
        """JSON row: time, throughput, counted FLOPs, achieved TFLOP/s, floor at the peak, ratio, memory."""
        t = self.median
        floor = None if peak_tflops is None or self.flops is None else self.flops / (peak_tflops * 1e12)
        return {
            "name": self.name, "unit": self.unit, "units_per_call": self.units,
            "seconds": t, "seconds_all": list(self.seconds),
            "seconds_per_unit": t / self.units, "throughput_per_s": self.units / t,
            "flops_per_call": self.flops, "flops_per_unit": None if self.flops is None else self.flops / self.units,
            "tflops_achieved": None if self.flops is None else self.flops / t / 1e12,
            "floor_seconds": floor, "ratio": None if floor is None else floor / t,
            "peak_memory_gib": self.peak_memory_gib,
            # the warm-up calls' time beyond as many timed calls: compiling and capturing, reported apart
            "warmup_seconds_all": list(self.warmup_seconds),
            "warmup_excess_seconds": sum(self.warmup_seconds) - len(self.warmup_seconds) * t,
            **self.extra,
        }


def measure(
    name: str, fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int, unit: str, units: int,
    count: bool = True, flops: int | None = None, **extra: Any,
) -> Measurement:
    """Count one call's FLOPs (that call warms up too; `count=False` skips it, and given `flops` stand for the
    count: counting runs the networks eagerly, which can outgrow the GPU's memory where the compiled call fits),
    run `warmup` more, time `repeats`."""
    if flops is None and count:
        flops = count_flops(fn)
    warm = []
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        warm.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return Measurement(name, unit, units, tuple(times), flops, None if peak is None else round(peak, 3), dict(extra),
                       tuple(warm))


def free_memory(device: torch.device) -> None:
    """Return cached blocks so the next measurement's peak starts clean."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- provenance ------------------------------------------------------------------------------------------------
def peak_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak TFLOP/s of this device and where the number comes from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: no peak; ratios are null, achieved TFLOP/s only"
    name = torch.cuda.get_device_name(device)
    for key, tflops, source in PEAK_TFLOPS:
        if key in name:
            return tflops, source
    return None, f"{name} is not in the peak table: pass --peak-tflops"
