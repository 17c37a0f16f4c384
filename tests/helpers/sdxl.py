"""A tiny random-weight SDXL-architecture pipeline, built in code (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from rapm_bench.perf.sdxl import save_pipeline


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a random-weight SDXL pipeline (two CLIP text encoders, text_time UNet, small VAE): perf.sdxl's
    "tiny" size, into folder/tiny-sdxl."""
    return save_pipeline(folder / "tiny-sdxl", "tiny", seed=seed)


def random_unet_lora(unet, path: Path, rank: int = 4, seed: int = 1) -> Path:
    """Save a random LoRA for `unet` in diffusers' PEFT format (what `load_lora_weights` reads)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2"])
    unet.add_adapter(cfg, adapter_name="tmp")
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B = 0; make the LoRA matter
            torch.nn.init.normal_(p, std=0.05)
    state = get_peft_model_state_dict(unet, adapter_name="tmp")
    unet.delete_adapters("tmp")
    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(path, unet_lora_layers=state, safe_serialization=True)
    return path / "pytorch_lora_weights.safetensors"


def decode_differences(device: str, *variants: dict[str, object]) -> list[dict[str, float]]:
    """uint8 differences to the exact fp32 decode (TF32 off) of a small SDXL-architecture VAE's TF32 decode, one per
    variant: VAEDecoder attributes set on top of the defaults (compiled on a GPU)."""
    from rapm_bench.bench import build_sdxl_vae, uint8_difference
    from rapm_bench.worlds.sdxl import VAEDecoder

    latents = torch.randn(2, 4, 32, 32, device=device, generator=torch.Generator(device).manual_seed(0)) * 4
    exact = VAEDecoder(build_sdxl_vae(True, torch.device(device)))
    exact.precision = "fp32"
    reference = exact(latents)
    diffs = []
    for variant in variants:
        dec = VAEDecoder(exact.vae)
        for name, value in variant.items():
            setattr(dec, name, value)
        diffs.append(uint8_difference(dec(latents), reference))
    return diffs
