"""A tiny random-weight SDXL-architecture pipeline, built in code (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from rapm_bench.scaling import clip_tokenizer


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a random-weight SDXL pipeline (two CLIP text encoders, text_time UNet, small VAE)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled (projection_dim) + 6 time ids
        cross_attention_dim=64,  # 32 + 32: both encoders' penultimate states concatenated
        norm_num_groups=8,
    )
    # The scheduler SDXL ships (EulerDiscrete, scaled_linear); rapm-bench builds its own from it.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
    )
    te_cfg = dict(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        hidden_act="gelu", projection_dim=32, max_position_embeddings=77,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg))
    tok = clip_tokenizer(folder / "_tok1")
    tok2 = clip_tokenizer(folder / "_tok2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    out = folder / "tiny-sdxl"
    pipe.save_pretrained(out)
    return out


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
