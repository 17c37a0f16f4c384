"""Slot boundaries and the DDIM step as pure functions (docs/rapm.md §2).

Slots: t_N > … > t_1 from DDIM `trailing` spacing for N steps, then t_0 = −1, whose
alphabar is alphabar_0 (`set_alpha_to_one=False`), exactly where the 4-step inference
recipe (DDIM trailing, baselines/rapm.py) ends. Slot n runs t_{n+1} → t_n; the teacher
crosses it in M sub-steps on a rounded linear grid, the first of which ends at
t_{n+1} − Δ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FINAL = -1
"""The timestep after the last: alphabar = alphabar_0 (diffusers' `set_alpha_to_one=False`)."""


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM `trailing` timesteps, as diffusers' DDIMScheduler.set_timesteps computes them."""
    ratio = num_train_timesteps / steps
    return [round(num_train_timesteps - i * ratio) - 1 for i in range(steps)]


@dataclass(frozen=True)
class SlotSchedule:
    """N slots × M sub-steps on a world's alphabar table."""

    alphas_cumprod: torch.Tensor  # alphabar_t, t = 0..T-1 (float64, CPU)
    slots: int  # N
    substeps: int  # M
    # device copies of the table and of timestep lists, made once: a host-to-device copy from pageable memory
    # synchronises the stream, and a RAPM iteration's few dozen of them left the GPU idle (issue 14)
    _on_device: dict[Any, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def boundaries(self) -> list[int]:
        """[t_0, t_1, …, t_N] = [−1, 249, 499, 749, 999] for N = 4, T = 1000."""
        return [FINAL, *reversed(trailing_timesteps(self.slots, len(self.alphas_cumprod)))]

    def fine(self, n: int) -> list[int]:
        """The teacher's M+1 grid points of slot n, from t_{n+1} down to t_n (rounded linspace)."""
        hi, lo = self.boundaries[n + 1], self.boundaries[n]
        m = self.substeps
        pts = [round(hi + (lo - hi) * k / m) for k in range(m + 1)]
        if len(set(pts)) != len(pts):
            raise ValueError(f"slot {n} ({hi}→{lo}) is too short for {m} sub-steps")
        return pts

    def delta_timestep(self, n: int) -> int:
        """t_{n+1} − Δ: where ẑΔ_{n+1} (the first teacher sub-step below t_{n+1}) lies."""
        return self.fine(n)[1]

    def alphabar(self, t: int | torch.Tensor) -> torch.Tensor:
        """alphabar_t (float64, on t's device); t = −1 means alphabar_0."""
        t = torch.as_tensor(t, dtype=torch.long)
        return self._table(t.device)[t.clamp(min=0)]

    def _table(self, device: torch.device) -> torch.Tensor:
        """The alphabar table on `device` (the same float64 values)."""
        if device.type == "cpu":
            return self.alphas_cumprod
        key = ("table", device)
        if key not in self._on_device:
            self._on_device[key] = self.alphas_cumprod.to(device)
        return self._on_device[key]

    def timesteps(self, ts: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """`ts` as a long tensor on `device`, made once per list and device (callers must not write into it)."""
        device = torch.device(device)
        if device.type == "cpu":
            return torch.tensor(list(ts), dtype=torch.long)
        key = (tuple(int(t) for t in ts), device)
        if key not in self._on_device:
            self._on_device[key] = torch.tensor(key[0], dtype=torch.long).to(device)
        return self._on_device[key]


def _expand(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) coefficient as a tensor broadcastable against x (B, ...)."""
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.ndim == 1:
        v = v.view(-1, *([1] * (x.ndim - 1)))
    return v


def predict_x0_eps(
    x: torch.Tensor, model_output: torch.Tensor, ab_t: torch.Tensor | float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a model output: eps, v (Salimans & Ho 2022) or sample prediction."""
    a = _expand(ab_t, x).sqrt().to(x)
    s = (1 - _expand(ab_t, x)).sqrt().to(x)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - s * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * x - s * model_output
        eps = a * model_output + s * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - a * x0) / s
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(
    x: torch.Tensor, model_output: torch.Tensor, ab_t: torch.Tensor | float, ab_s: torch.Tensor | float,
    prediction_type: str,
) -> torch.Tensor:
    """DDIM(x, t→s) = sqrt(ab_s)·x̂0 + sqrt(1−ab_s)·ε̂ (eta 0, no clipping); coefficients per sample or scalar."""
    x0, eps = predict_x0_eps(x, model_output, ab_t, prediction_type)
    ab_s = _expand(ab_s, x)
    return ab_s.sqrt().to(x) * x0 + (1 - ab_s).sqrt().to(x) * eps


def renoise(
    x: torch.Tensor, ab_from: torch.Tensor | float, ab_to: torch.Tensor | float, noise: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion from level ab_from to the noisier ab_to: q(x_to | x_from)."""
    ratio = (_expand(ab_to, x) / _expand(ab_from, x)).clamp(0, 1)
    return ratio.sqrt().to(x) * x + (1 - ratio).sqrt().to(x) * noise
