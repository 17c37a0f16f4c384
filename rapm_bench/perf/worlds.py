"""The worlds the bench times: `RandomSDXLWorld` (SDXL's architecture, random weights: perf.sdxl) and
`TunedWorld` (a world with the bench's optimisations: SDPA, channels-last, torch.compile)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..transfer import to_device
from ..worlds import sdxl as sdxl_world
from ..worlds.base import Cond, NoiseSchedule, UNetWorld, World
from ..worlds.registry import get_world_spec
from ..worlds.sdxl import SDXLWorld, VAEDecoder
from .config import BenchConfig, Optimisations
from .sdxl import SDXL_UNET, SDXL_UNET_SMALL, build_unet, build_vae


# --- worlds ------------------------------------------------------------------------------------------------
def _sdxl_pooled_dim(unet_cfg: dict[str, Any]) -> int:
    """Width of the pooled text embedding a text_time UNet expects."""
    return unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]


def build_sdxl_unet(small: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight SDXL-architecture UNet (perf.sdxl, small or full), initialised on `device`."""
    return build_unet(small, device, dtype, seed)


def build_sdxl_vae(small: bool, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-weight SDXL-architecture VAE (perf.sdxl, small or full), fp32, seeded with `seed + 1`."""
    return build_vae(small, device, seed)


class RandomSDXLWorld(UNetWorld):
    """The SDXL world's UNet call, schedule and VAE decode on random weights; random text conditioning.

    The text encoders are not run: per prompt they cost ~0.2 % of one RAPM iteration.
    """

    name = "sdxl"
    default_guidance = 5.0
    compile_blocks_from = SDXLWorld.compile_blocks_from
    noise_schedule = NoiseSchedule()  # SDXL: scaled_linear 0.00085-0.012, eps

    def __init__(self, small: bool, device: torch.device, dtype: torch.dtype, resolution: int | None = None,
                 seed: int = 0) -> None:
        self.small, self.device, self.dtype = small, device, dtype
        self.unet_config = SDXL_UNET_SMALL if small else SDXL_UNET
        self.unet = build_sdxl_unet(small, device, dtype, seed)
        self.vae = build_sdxl_vae(small, device, seed)
        self.decoder = VAEDecoder(self.vae)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._resolution = resolution or self.unet_config["sample_size"] * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self._resolution // self.vae_scale
        return (self.unet_config["in_channels"], side, side)

    @property
    def image_size(self) -> int:
        return self._resolution

    def grad_activation_gib(self) -> float:
        from ..worlds.sdxl import activation_gib

        return activation_gib(self._resolution) * (0.01 if self.small else 1.0)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Seeded random embeddings of SDXL's shapes (77 tokens × cross_attention_dim, pooled, time ids)."""
        width, pooled = self.unet_config["cross_attention_dim"], _sdxl_pooled_dim(self.unet_config)
        gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(77, width, generator=g) for g in gens])
        text = torch.stack([torch.randn(pooled, generator=g) for g in gens])
        side = self._resolution
        ids = torch.tensor([[side, side, 0, 0, side, side]] * len(prompts))
        return {k: to_device(v.to(self.dtype), self.device) for k, v in  # queued: generate_batches runs ahead
                (("prompt_embeds", embeds), ("text_embeds", text), ("time_ids", ids))}

    @torch.no_grad()
    def negative_cond(self, cond: Cond) -> Cond:
        """SDXL base's zeroed embeddings for the empty prompt (force_zeros_for_empty_prompt)."""
        return {"prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
                "text_embeds": torch.zeros_like(cond["text_embeds"]), "time_ids": cond["time_ids"]}

    # SDXLWorld's own functions (they read self.unet, self.dtype, self.decoder): the UNet call, half precision
    # inside and fp32 out, and the decode, latents -> uint8 images on the CPU
    predict = SDXLWorld.predict
    decode = SDXLWorld.decode
    decode_start = SDXLWorld.decode_start

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"teacher": "random weights, SDXL architecture" + (" (small)" if self.small else ""),
                                     "resolution": self._resolution, "dtype": str(self.dtype).removeprefix("torch.")}


class TunedWorld(World):
    """Any world with the bench's switches: channels_last inputs, CFG pairs split into two calls."""

    def __init__(self, inner: World, opts: Optimisations) -> None:
        self.inner, self.opts = inner, opts
        self.name, self.noise_schedule, self.device = inner.name, inner.noise_schedule, inner.device
        self.default_guidance = inner.default_guidance
        self.compile_blocks_from = inner.compile_blocks_from
        self.calls_per_batch = 1  # 2 = a CFG pair as two UNet calls (the trajectories stage sets it)

    @property
    def unet(self) -> nn.Module:  # type: ignore[override]
        return self.inner.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.inner.latent_shape

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.inner.alphas_cumprod

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self.inner.encode_prompts(prompts)

    def negative_cond(self, cond: Cond) -> Cond:
        return self.inner.negative_cond(cond)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = self.calls_per_batch
        if n == 1 or x.shape[0] % n:
            return self.inner.predict(x, t, cond)
        t = torch.as_tensor(t, device=x.device)
        ts = t.chunk(n) if t.ndim else [t] * n
        parts = zip(x.chunk(n), ts, *(v.chunk(n) for v in cond.values()), strict=True)
        return torch.cat([self.inner.predict(p[0], p[1], dict(zip(cond, p[2:], strict=True))) for p in parts])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)

    def decode_start(self, latents: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.inner.decode_start(latents)

    def grad_activation_gib(self) -> float:
        return self.inner.grad_activation_gib()

    def set_vae_precision(self, precision: str, channels_last: bool | None = None) -> None:
        self.inner.set_vae_precision(precision, channels_last)

    def load_lora(self, path: Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        self.inner.load_lora(path, adapter_name, scale)

    def fuse_lora(self) -> None:
        self.inner.fuse_lora()

    def unload_lora(self) -> None:
        self.inner.unload_lora()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() | {"bench_opts": asdict(self.opts)}


def set_sdpa(module: nn.Module, sdpa: bool) -> None:
    """torch SDPA attention processors (True) or diffusers' classic matmul-softmax-matmul ones."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def set_vae_variant(world: World, vae: str) -> str:
    """Decode as the bench's VAE variant `<precision>[/channels_last][/eager][/sdpa|/tf32attn][/tf32conv|/bounded|/halfall]`
    says (eager: not compiled, which a GPU's TF32 and bf16 decodes otherwise are; sdpa: the TF32 decode's attention
    through SDPA, not two matrix products; tf32attn: those products in TF32, not on fp16 tensor cores as
    worlds.sdxl.HALF_ATTENTION has a compiled decode's; the compiled TF32 decode's convolutions on fp16 tensor cores as
    worlds.sdxl.HALF_CONVOLUTIONS says, none with tf32conv, only those that read silu(GroupNorm) with bounded, all with
    halfall (worlds/halfconv.py); worlds/sdxl.py VAEDecoder); returns the precision."""
    precision, *flags = vae.split("/")
    world.set_vae_precision(precision, channels_last="channels_last" in flags)
    decoder = getattr(getattr(world, "inner", world), "decoder", None)
    if decoder is not None:
        decoder.compile = "eager" not in flags
        decoder.gemm_attention = "sdpa" not in flags
        decoder.half_attention = "tf32attn" not in flags and sdxl_world.HALF_ATTENTION
        named = [h for flag, h in (("tf32conv", ""), ("bounded", "bounded"), ("halfall", "everywhere")) if flag in flags]
        decoder.half_convolutions = named[0] if named else sdxl_world.HALF_CONVOLUTIONS  # read now: perf.scaling sets it
    return precision


def set_channels_last(module: nn.Module, on: bool) -> None:
    """Convolution weights in NHWC (True) or NCHW."""
    module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


@contextlib.contextmanager
def compiled_unet(world: TunedWorld, enabled: bool, blocks: bool = False,
                  classes: tuple[str, ...] | None = None) -> Iterator[None]:
    """`torch.compile` the world's UNet for the duration (no-grad stages only); `blocks`: each of its blocks of
    `classes` (default regions.BLOCKS) instead (regions.blocks_compiled; a GPU only, as the engine: elsewhere the
    blocks stay eager)."""
    from .. import regions

    inner = world.inner
    plain = inner.unet
    if blocks or not enabled:
        with regions.blocks_compiled(plain, blocks and world.device.type == "cuda", classes or regions.BLOCKS):
            yield
        return
    inner.unet = torch.compile(plain)
    try:
        yield
    finally:
        inner.unet = plain


def compute_dtype(cfg: BenchConfig, device: torch.device) -> torch.dtype:
    """The UNet's dtype: bf16 on a GPU, fp32 on the CPU, unless --dtype says otherwise."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return names[cfg.dtype]


def build_world(cfg: BenchConfig, device: torch.device) -> TunedWorld:
    """The preset's world with the bench's optimisations applied."""
    if get_world_spec(cfg.preset).bench_weights == "shipped":
        from ..config import WorldConfig

        inner: World = get_world_spec(cfg.preset).load(WorldConfig(preset=cfg.preset, device=str(device)))
        inner.unet.requires_grad_(False)
    else:
        inner = RandomSDXLWorld(cfg.scale == "small", device, compute_dtype(cfg, device), cfg.resolution, cfg.seed)
        set_sdpa(inner.vae, cfg.opts.sdpa)  # type: ignore[attr-defined]
    set_sdpa(inner.unet, cfg.opts.sdpa)
    if cfg.opts.channels_last:
        set_channels_last(inner.unet, True)
    return TunedWorld(inner, cfg.opts)
