"""The distilled LoRA on the random-weight SDXL pipeline: plain diffusers loads it, kohya keys too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.distill import distill_app
from typer.testing import CliRunner

from rapm_bench.cli import app as main_app

PROMPTS = ["a photo of a cat", "two red apples on a wooden table", "a city street at night, rain"]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def distilled(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of a 2-iteration distillation of the random SDXL pipeline (diffusers and kohya exports)."""
    tmp = tmp_path_factory.mktemp("distill-sdxl")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a dog on a beach\na bowl of soup\n")
    common = ["distill", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--prompts", str(prompts),
              "--num-trajectories", "2", "--M", "2", "--iters", "2", "--lr", "0.05", "--warmup", "0",
              "--device", "cpu", "--precision", "fp32", "--cache-dir", str(tmp / "cache"), "--sample-every", "0"]
    for fmt in ("diffusers", "kohya"):
        result = CliRunner().invoke(distill_app(), [*common, "--out", str(tmp / fmt), "--format", fmt])
        assert result.exit_code == 0, result.output
    return tmp


def diffusers_images(folder: Path, lora_dir: Path | None, output_type: str = "np") -> np.ndarray:
    """Plain diffusers, the RAPM recipe: DDIM trailing, 4 steps, guidance 1.0, one generator per image."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None and lora_dir.is_file():
        pipe.load_lora_weights(str(lora_dir.parent), weight_name=lora_dir.name)
    elif lora_dir is not None:  # the run folder also holds checkpoint.safetensors: diffusers skips it
        pipe.load_lora_weights(str(lora_dir))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, generator=gens, output_type=output_type).images
    if output_type == "latent":
        return out.numpy()
    return (out * 255).round().astype(np.uint8)


@pytest.mark.e2e
def test_distilled_lora_round_trips_through_diffusers(tmp_path, tiny_sdxl, distilled):
    """load_lora_weights(DIR) + RAPM recipe == rapm-bench generate --lora DIR/lora.safetensors (max uint8 diff ≤ 1)."""
    from PIL import Image

    run = distilled / "diffusers"
    ref = diffusers_images(tiny_sdxl, run)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = CliRunner().invoke(main_app, [
        "generate", "--preset", "sdxl", "--teacher", str(tiny_sdxl), "--prompts", str(prompts), "--out",
        str(tmp_path / "gen"), "--model", "rapm", "--lora", str(run / "lora.safetensors"), "--steps", "4",
        "--guidance", "1.0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ours = np.stack([np.asarray(Image.open(tmp_path / "gen" / f"{i:06d}.png")) for i in range(len(PROMPTS))])
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    explicit = diffusers_images(tiny_sdxl, run / "lora.safetensors")  # weight_name given: the same file
    assert np.array_equal(explicit, ref)
    from rapm_bench.lora import resolve_lora_path

    assert resolve_lora_path(run) == run / "lora.safetensors"  # `--lora DIR` skips checkpoint.safetensors too
    # the distilled LoRA is not a no-op (else the comparison proves nothing): latents move
    plain = diffusers_images(tiny_sdxl, None, "latent")
    tuned = diffusers_images(tiny_sdxl, run, "latent")
    assert np.abs(plain - tuned).max() > 1e-3


@pytest.mark.e2e
def test_kohya_export_equals_diffusers_export(tiny_sdxl, distilled):
    """`--format kohya` read by diffusers' kohya converter gives the same UNet LoRA weights and images."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    kohya = load_file(str(distilled / "kohya" / "lora.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in kohya} >= {"lora_down", "lora_up"}
    assert any(k.endswith(".alpha") for k in kohya)
    weights = []
    for fmt in ("diffusers", "kohya"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
        pipe.load_lora_weights(str(distilled / fmt), weight_name="lora.safetensors", adapter_name="x")
        from peft import get_peft_model_state_dict

        weights.append(get_peft_model_state_dict(pipe.unet, adapter_name="x"))
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    time_emb = [k for k in weights[0] if k.startswith("time_embedding.")]
    assert time_emb, "the time embedding is a LoRA target"


def test_grad_checkpointing_gives_the_same_gradients(tiny_sdxl):
    """The SDXL memory option changes nothing but memory: equal LoRA and head gradients (the backbone must not
    be recomputed with the adapters on)."""
    from rapm_bench.config import WorldConfig
    from rapm_bench.distill.discriminator import EncoderFeatures, build_heads, feature_channels
    from rapm_bench.distill.rapm import LossWeights, RAPMLoss
    from rapm_bench.distill.schedule import SlotSchedule
    from rapm_bench.lora import attach_lora
    from rapm_bench.worlds import load_world

    world = load_world(WorldConfig(preset="sdxl", teacher=str(tiny_sdxl), device="cpu"))
    params = attach_lora(world.unet, 1, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    cond = world.encode_prompts(["a dog on a beach"])
    feats = EncoderFeatures(world)
    heads = build_heads(feature_channels(feats, cond), 16, 0, world.device)
    loss = RAPMLoss(world.predict, SlotSchedule(world.alphas_cumprod, 4, 2), "epsilon", LossWeights(), feats, *heads)
    g = torch.Generator().manual_seed(0)
    z_tilde, z_delta = torch.randn(5, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    head_params = [*heads[0].parameters(), *heads[1].parameters()]
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            world.unet.enable_gradient_checkpointing()
        terms = loss(z_tilde, z_delta, cond, torch.Generator().manual_seed(1), chunk=1)
        g_total = sum(t.g_loss for t in terms)
        d_total = sum(t.d_loss for t in terms)
        grads.append(torch.autograd.grad(g_total, params) + torch.autograd.grad(d_total, head_params))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
