"""Samplers as pure functions of (denoiser, noise, recipe, schedule, steps, generators).

The update rules are diffusers' own schedulers; this module only builds them from a
declarative recipe and runs the loop the diffusers pipelines run (scale_model_input,
model call, step), so that images equal `StableDiffusionXLPipeline`'s for the same
scheduler and seeds. For DDIM the scheduler steps on the host's copy of the timesteps and the
model gets the GPU's: diffusers' DDIM step reads a GPU timestep back on the host (its index into
alphabar), which waits for the model's kernels, so a batch could not be queued ahead of the GPU.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import UserError
from .transfer import to_device
from .worlds.base import Cond, NoiseSchedule, World

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(scaled latents, timestep) -> model output (eps or v), guidance already applied."""


@dataclass(frozen=True)
class SamplerRecipe:
    """A diffusers scheduler and how to call it; part of every model spec."""

    scheduler: str  # "ddim" | "lcm" | "euler" | "tcd"
    timestep_spacing: str = "trailing"
    timesteps: tuple[int, ...] | None = None  # explicit timesteps (DMD2's LCM [999, 749, 499, 249])
    eta: float = 0.0  # DDIM eta, or TCD gamma
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # other scheduler config fields

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record for manifests and results."""
        d = asdict(self)
        d["options"] = dict(self.options)
        return d


# RAPM (and PCM, Hyper-SD): DDIM with trailing spacing, no clipping, final alphabar = alphabar_0.
DDIM_TRAILING = SamplerRecipe("ddim", "trailing", options=(("clip_sample", False), ("set_alpha_to_one", False)))
# DMD2: LCMScheduler with the timesteps it was trained on.
LCM_DMD2 = SamplerRecipe("lcm", "trailing", timesteps=(999, 749, 499, 249), options=(("set_alpha_to_one", False),))
# LCM-LoRA: LCMScheduler as shipped (leading spacing from 50 original steps: [999, 759, 499, 259] at 4).
LCM = SamplerRecipe("lcm", "leading")
# SDXL-Lightning: Euler, trailing.
EULER_TRAILING = SamplerRecipe("euler", "trailing")
# TCD: gamma (eta) 0.3.
TCD = SamplerRecipe("tcd", "trailing", eta=0.3, options=(("set_alpha_to_one", False),))


def make_scheduler(recipe: SamplerRecipe, schedule: NoiseSchedule) -> Any:
    """A fresh diffusers scheduler for this recipe on this world's noise schedule."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    classes = {"ddim": DDIMScheduler, "lcm": LCMScheduler, "euler": EulerDiscreteScheduler, "tcd": TCDScheduler}
    if recipe.scheduler not in classes:
        raise UserError(f"unknown scheduler {recipe.scheduler!r}; known: {', '.join(classes)}")
    kwargs = schedule.scheduler_kwargs() | {"timestep_spacing": recipe.timestep_spacing} | dict(recipe.options)
    return classes[recipe.scheduler](**kwargs)


def check_steps(recipe: SamplerRecipe, steps: int, schedule: NoiseSchedule) -> None:
    """Reject step counts the recipe cannot run."""
    if steps < 1 or steps > schedule.num_train_timesteps:
        raise UserError(f"--steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")
    if recipe.timesteps is not None and steps != len(recipe.timesteps):
        raise UserError(f"this sampler runs exactly {len(recipe.timesteps)} steps {list(recipe.timesteps)}, got {steps}")


# schedulers whose `step`, given a host timestep, reads host tensors only (alphabar on the CPU, as diffusers keeps
# it): the same numbers as with the GPU's timestep, without a synchronisation a step. The others keep their
# timesteps on the GPU as diffusers' pipelines do (LCM and Euler draw noise on the host generators each step anyway).
HOST_TIMESTEPS = frozenset({"ddim"})


def _step_kwargs(scheduler: Any, eta: float, generators: Sequence[torch.Generator] | None) -> dict[str, Any]:
    """The optional arguments of scheduler.step, as the diffusers pipelines pass them."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = list(generators) if generators is not None else None
    return kwargs


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    recipe: SamplerRecipe,
    schedule: NoiseSchedule,
    steps: int,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run `steps` sampler steps from unit-variance `noise`; returns clean latents (fp32)."""
    check_steps(recipe, steps, schedule)
    scheduler = make_scheduler(recipe, schedule)
    host = recipe.scheduler in HOST_TIMESTEPS
    device = torch.device("cpu") if host else noise.device
    if recipe.timesteps is not None:
        # The explicit timesteps are the model's own (DMD2 trained on [999, 749, 499, 249]): LCMScheduler's
        # warning that they are off its 50-step origin grid is expected, not news to the user.
        log = logging.getLogger(type(scheduler).__module__)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            scheduler.set_timesteps(timesteps=list(recipe.timesteps), device=device)
        finally:
            log.setLevel(level)
    else:
        scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    step_kwargs = _step_kwargs(scheduler, recipe.eta, generators)
    timesteps = scheduler.timesteps
    model_timesteps = to_device(timesteps, noise.device) if host else timesteps  # one copy, queued
    x = noise.float() * scheduler.init_noise_sigma
    for t, t_model in zip(timesteps, model_timesteps, strict=True):
        out = denoiser(scheduler.scale_model_input(x, t), t_model)
        x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
    return x


def cfg_denoiser(world: World, cond: Cond, guidance: float) -> Denoiser:
    """Classifier-free guidance around a world's UNet; guidance <= 1 means the conditional model only."""
    if guidance <= 1.0:
        return lambda x, t: world.predict(x, t, cond)
    neg = world.negative_cond(cond)
    both = {k: torch.cat([neg[k], cond[k]]) for k in cond}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, text = world.predict(torch.cat([x, x]), t, both).chunk(2)
        return uncond + guidance * (text - uncond)

    return denoise


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> tuple[
    torch.Tensor, list[torch.Generator]
]:
    """One CPU generator per image: the noise of image i depends on its seed alone (sent to the GPU queued:
    `transfer.to_device`)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens])
    return to_device(noise, device), gens
