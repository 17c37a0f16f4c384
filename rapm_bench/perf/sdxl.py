"""One random-weight SDXL builder (no download): the bench's world, the scaling measurement's teacher and the
tests' pipeline fixture, at three sizes.

- `tiny`: the tests' fixture (tests/helpers/sdxl.py): a 2-level UNet 32-64 wide, a 2-level VAE, 32-wide
  text encoders; one seed for the whole pipeline, drawn in the order UNet, VAE, text encoders.
- `small`: SDXL's modules (blocks, depths, shortcuts) at tiny widths (~0.1 s a UNet pass on one CPU thread):
  `rapm-bench bench --scale small` and `python -m rapm_bench.scaling --small`.
- `full`: SDXL base 1.0's architecture (UNet 2.567 B parameters, VAE 83.7 M, CLIP-L and OpenCLIP bigG text).

`small` and `full` seed each part: the UNet with `seed`, the VAE with `seed + 1`, the text encoders with
`seed + 2`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# --- architectures (diffusers configs as dicts) ------------------------------------------------------------
SDXL_UNET: dict[str, Any] = {
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.567 B parameters)
    "in_channels": 4, "out_channels": 4, "sample_size": 128, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads: 64 channels each
    "cross_attention_dim": 2048,  # CLIP-L (768) + OpenCLIP bigG (1280) penultimate states
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled bigG (1280) + 6 time ids × 256
    "use_linear_projection": True, "norm_num_groups": 32,
}
SDXL_UNET_SMALL: dict[str, Any] = SDXL_UNET | {
    # the same modules (blocks, depths, shortcuts) with tiny widths: ~0.1 s a pass on one CPU thread
    "sample_size": 16, "block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4),
    "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
SDXL_UNET_TINY: dict[str, Any] = {
    # the tests' fixture: two levels, 8 groups
    "block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled (projection_dim) + 6 time ids
    "cross_attention_dim": 64,  # 32 + 32: both encoders' penultimate states concatenated
    "norm_num_groups": 8,
}
SDXL_VAE: dict[str, Any] = {
    # stabilityai/sdxl-vae config.json (83.7 M parameters; the decoder 49.5 M)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SDXL_VAE_SMALL: dict[str, Any] = SDXL_VAE | {"block_out_channels": (32, 32, 32, 32), "sample_size": 128}
SDXL_VAE_TINY: dict[str, Any] = {
    "block_out_channels": (16, 32), "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32, "scaling_factor": 0.13025,
}
_TEXT_COMMON: dict[str, Any] = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                                "eos_token_id": 49407, "pad_token_id": 1, "layer_norm_eps": 1e-5}
TEXT_SMALL: dict[str, Any] = _TEXT_COMMON | {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "projection_dim": 32, "hidden_act": "gelu"}
TEXT_CLIP_L: dict[str, Any] = _TEXT_COMMON | {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                              "num_attention_heads": 12, "projection_dim": 768,
                                              "hidden_act": "quick_gelu"}
TEXT_BIG_G: dict[str, Any] = _TEXT_COMMON | {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                             "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
# The scheduler SDXL ships (EulerDiscrete, scaled_linear); rapm-bench builds its own from its config.
SCHEDULER: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                             "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}


@dataclass(frozen=True)
class SdxlSize:
    """One size: the parts' configs and how they are seeded."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text: tuple[dict[str, Any], dict[str, Any]]  # CLIP-L-like, bigG-like (with projection)
    reseed: bool  # True: UNet `seed`, VAE `seed + 1`, text `seed + 2`; False: one stream from `seed`


SIZES: dict[str, SdxlSize] = {
    "tiny": SdxlSize(SDXL_UNET_TINY, SDXL_VAE_TINY, (TEXT_SMALL, TEXT_SMALL), reseed=False),
    "small": SdxlSize(SDXL_UNET_SMALL, SDXL_VAE_SMALL, (TEXT_SMALL, TEXT_SMALL), reseed=True),
    "full": SdxlSize(SDXL_UNET, SDXL_VAE, (TEXT_CLIP_L, TEXT_BIG_G), reseed=True),
}


def size_name(size: str | bool) -> str:
    """`size` as a SIZES key; a bool is the older `small` flag (True: "small", False: "full")."""
    name = ("small" if size else "full") if isinstance(size, bool) else size
    if name not in SIZES:
        raise ValueError(f"unknown SDXL size {name!r}; choose from {', '.join(SIZES)}")
    return name


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def build_unet(size: str | bool, device: torch.device, dtype: torch.dtype = torch.float32, seed: int | None = 0,
               ) -> nn.Module:
    """A random-weight UNet, initialised on `device` (fast on a GPU), in eval mode without gradients.
    `seed` None: continue the current random stream."""
    import diffusers
    from diffusers import UNet2DConditionModel

    diffusers.utils.logging.set_verbosity_error()  # no "modules kept in float32: []" notice on .to(dtype)
    name = size_name(size)
    _seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SIZES[name].unet)
    return unet.to(dtype).eval().requires_grad_(False)


def build_vae(size: str | bool, device: torch.device, seed: int | None = 0) -> nn.Module:
    """A random-weight VAE, fp32 (the SDXL VAE's precision policy), seeded with `seed + 1` (None: not seeded)."""
    from diffusers import AutoencoderKL

    name = size_name(size)
    _seed(None if seed is None else seed + 1)
    with torch.device(device):
        vae = AutoencoderKL(**SIZES[name].vae)
    return vae.float().eval().requires_grad_(False)


def build_text_encoders(size: str | bool, device: torch.device, seed: int | None = 0) -> tuple[nn.Module, nn.Module]:
    """SDXL's two text encoders, random weights (the second with its projection), seeded with `seed + 2` (None: not seeded)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    name = size_name(size)
    cfg_l, cfg_g = SIZES[name].text
    _seed(None if seed is None else seed + 2)
    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**cfg_l)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg_g))


def clip_tokenizer(folder: Path, pad_token: str | None = None) -> Any:
    """A real CLIP BPE tokenizer from the vocabulary open_clip ships (no download; docs/reference.md, Offline test
    fixtures)."""
    import gzip

    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **kwargs)


def build_pipeline(size: str | bool, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> Any:
    """A random-weight StableDiffusionXLPipeline (UNet, VAE, both text encoders and tokenizers, SDXL's scheduler),
    cast to `dtype`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    name = size_name(size)
    stream = not SIZES[name].reseed  # tiny: one stream, seeded once before the UNet
    unet = build_unet(name, device, torch.float32, seed)
    vae = build_vae(name, device, None if stream else seed)
    text_encoder, text_encoder_2 = build_text_encoders(name, device, None if stream else seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = clip_tokenizer(Path(tmp) / "1"), clip_tokenizer(Path(tmp) / "2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.to(dtype)  # the SDXL world casts the VAE back to fp32 when it loads
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_finite(pipe: Any, resolution: int) -> float:
    """Random weights must not overflow half precision: a 2-step sample's latents are finite; returns |max|."""
    with torch.no_grad():
        latents = pipe(prompt="a photo of a cat on a red sofa", height=resolution, width=resolution,
                       num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    if not bool(torch.isfinite(latents).all()):
        raise RuntimeError("the random-weight SDXL pipeline gives non-finite latents in half precision")
    return float(latents.abs().max())


def save_pipeline(folder: Path, size: str | bool, device: torch.device = torch.device("cpu"),
                  dtype: torch.dtype = torch.float32, seed: int = 0, check_resolution: int | None = None) -> Path:
    """Build the pipeline and `save_pretrained` it into `folder`; with `check_resolution`, first check a 2-step
    sample at that side is finite. Returns `folder`."""
    pipe = build_pipeline(size, device, dtype, seed)
    if check_resolution is not None:
        check_finite(pipe, check_resolution)
    pipe.save_pretrained(folder)
    return folder
