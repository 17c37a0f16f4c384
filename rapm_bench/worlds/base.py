"""The world adapter: everything that differs between SDXL and the embedded tiny world.

Nothing outside a world knows which world it is in. A world owns its networks, their
precision policy (docs/design.md §8: fp32 in, half precision inside, fp32 out) and its
noise schedule; samplers, the distillation engine and the evaluation only call the
methods below.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..precision import COMPUTE_PRECISIONS, DTYPES

Cond = dict[str, torch.Tensor]
"""Text conditioning: batch-first tensors the world's UNet call understands."""


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule, as diffusers scheduler keyword arguments."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # or "v_prediction"
    rescale_betas_zero_snr: bool = False

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every diffusers scheduler built for this world."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }

    def alphas_cumprod(self) -> torch.Tensor:
        """alphabar_t for t = 0..T-1 in float64, exactly as diffusers computes it."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(**self.scheduler_kwargs())
        return sched.alphas_cumprod.to(torch.float64)


class World(abc.ABC):
    """A text-to-image world: prompt encoding, the UNet call, the schedule, decoding."""

    name: str
    noise_schedule: NoiseSchedule
    device: torch.device
    unet: torch.nn.Module  # a diffusers UNet2DConditionModel (LoRA targets are shared)
    default_guidance: float  # the teacher's CFG scale when a command gives none
    compile_blocks_from: int | None = None  # UNet passes (images × steps) from which generation compiles the UNet's
    #                                        blocks by default (regions.pays); None: never unasked

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent (the tiny world: pixel space 3×32×32)."""

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Side of the decoded square image in pixels."""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alphabar_t, float64, on the CPU."""
        return self.noise_schedule.alphas_cumprod()

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Encode a batch of captions into the UNet's conditioning (no grad)."""

    @abc.abstractmethod
    def negative_cond(self, cond: Cond) -> Cond:
        """The unconditional branch for classifier-free guidance, batch-aligned with `cond`."""

    @abc.abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Raw model output (eps or v, see noise_schedule) for latents x at timesteps t; fp32 out."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images (B, 3, H, W) on the CPU."""

    def decode_start(self, latents: torch.Tensor) -> Callable[[], torch.Tensor]:
        """`decode`, split in two: queue the work, then (the returned function) wait for the images. A world on a
        GPU queues the decode and the copy to the CPU without waiting for the GPU (generate.generate_batches);
        here, `decode` at once."""
        images = self.decode(latents)
        return lambda: images

    def set_vae_precision(self, precision: str, channels_last: bool | None = None) -> None:
        """Decode in `precision` (precision.COMPUTE_PRECISIONS: the protocol's `vae_precision`) through the
        world's `decoder` (worlds/sdxl.py, VAEDecoder); a world without one (the tiny world decodes by
        identity) has nothing to set."""
        if precision not in COMPUTE_PRECISIONS:
            raise UserError(f"unknown VAE precision {precision!r}; use one of {', '.join(COMPUTE_PRECISIONS)}")
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            decoder.precision = precision
            if channels_last is not None:
                decoder.channels_last = channels_last

    def grad_activation_gib(self) -> float:
        """GiB of activations a gradient pass of one latent through the UNet keeps without checkpointing
        (distill/memory.py chooses checkpointing from it); 0 = negligible."""
        return 0.0

    # --- LoRA -------------------------------------------------------------------------
    @abc.abstractmethod
    def load_lora(self, path: Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        """Attach a LoRA file (any format diffusers reads) to the UNet, unfused."""

    @abc.abstractmethod
    def fuse_lora(self) -> None:
        """Merge the attached LoRA into the UNet weights (faster sampling, same images)."""

    @abc.abstractmethod
    def unload_lora(self) -> None:
        """Remove every LoRA (unfusing first where fused): back to the plain teacher."""

    def describe(self) -> dict[str, Any]:
        """Provenance of this world for manifests and results."""
        return {"world": self.name, "noise_schedule": self.noise_schedule.__dict__}


class UNetWorld(World):
    """A world whose `unet` is a bare diffusers UNet (no pipeline): LoRA files go onto it through PEFT."""

    _fused: bool = False

    def load_lora(self, path: Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        """Attach a diffusers/kohya LoRA file to the UNet, unfused, at `scale`."""
        from ..lora import load_unet_lora

        load_unet_lora(self.unet, Path(path), adapter_name)
        if scale != 1.0:
            self.unet.set_adapters([adapter_name], weights=[scale])

    def fuse_lora(self) -> None:
        """Merge the active LoRA into the UNet weights."""
        self.unet.fuse_lora()
        self._fused = True

    def unload_lora(self) -> None:
        """Remove every LoRA, unfusing first: back to the plain teacher."""
        if self._fused:
            self.unet.unfuse_lora()
            self._fused = False
        if getattr(self.unet, "peft_config", None):
            self.unet.unload_lora()


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"--device {device}: rapm-bench runs on cpu or cuda")
    return dev


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Half precision on a GPU, fp32 on the CPU, unless asked otherwise."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in DTYPES:
        raise UserError(f"unknown precision {precision!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[precision]
