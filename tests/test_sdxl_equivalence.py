"""rapm-bench's SDXL path gives the images StableDiffusionXLPipeline gives (same scheduler, seeds, LoRA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rapm_bench.cli import app

PROMPTS = ["a photo of a cat", "two red apples on a wooden table", "a city street at night, rain"]
SEEDS = [0, 1, 2]


def reference_images(folder: Path, steps: int, guidance: float, lora: Path | None, fuse: bool) -> np.ndarray:
    """Plain diffusers: the RAPM inference recipe, one generator per image."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        if fuse:
            pipe.fuse_lora()
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
    return (out * 255).round().astype(np.uint8)


def ours(tmp_path: Path, folder: Path, args: list[str]) -> np.ndarray:
    """rapm-bench generate through the CLI, PNGs read back."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "gen"
    result = CliRunner().invoke(
        app, ["generate", "--preset", "sdxl", "--teacher", str(folder), "--prompts", str(prompts),
              "--out", str(out), "--batch-size", "2", "--device", "cpu", *args],
    )
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(len(PROMPTS))])


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("lora", "fuse", "steps", "guidance"),
    [(False, False, 4, 1.0), (True, False, 4, 1.0), (True, True, 4, 1.0), (False, False, 3, 5.0)],
    ids=["teacher-4step", "lora-4step", "lora-fused-4step", "teacher-cfg5"],
)
def test_generate_equals_diffusers_pipeline(tmp_path, tiny_sdxl, tiny_sdxl_lora, lora, fuse, steps, guidance):
    """Max abs difference on uint8 images <= 1 (RAPM recipe: DDIM trailing, guidance 1.0)."""
    lora_path = tiny_sdxl_lora if lora else None
    ref = reference_images(tiny_sdxl, steps, guidance, lora_path, fuse)
    args = ["--model", "rapm" if lora else "teacher", "--steps", str(steps), "--guidance", str(guidance)]
    if lora:
        args += ["--lora", str(lora_path)] + (["--fuse"] if fuse else [])
    got = ours(tmp_path, tiny_sdxl, args)
    assert got.shape == ref.shape == (3, 32, 32, 3)
    assert ref.std() > 5, "random pipeline should give non-constant images"
    diff = np.abs(got.astype(int) - ref.astype(int)).max()
    assert diff <= 1, f"max abs uint8 difference {diff}"


@pytest.mark.e2e
def test_lora_changes_images(tmp_path, tiny_sdxl, tiny_sdxl_lora):
    """The LoRA in the fixture is not a no-op (otherwise the LoRA cases above prove nothing)."""
    plain = reference_images(tiny_sdxl, 4, 1.0, None, False)
    with_lora = reference_images(tiny_sdxl, 4, 1.0, tiny_sdxl_lora, False)
    assert np.abs(plain.astype(int) - with_lora.astype(int)).max() > 10


@pytest.mark.parametrize(("steps", "guidance"), [(4, 1.0), (2, 3.0)])
def test_latents_equal_diffusers_pipeline(tiny_sdxl, steps, guidance):
    """Before the VAE (which is nearly flat at random init), latents agree to float32 round-off."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from rapm_bench.config import WorldConfig
    from rapm_bench.generate import sample_latents
    from rapm_bench.sampling import DDIM_TRAILING
    from rapm_bench.worlds import load_world

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
               output_type="latent").images
    world = load_world(WorldConfig(preset="sdxl", teacher=str(tiny_sdxl), device="cpu"))
    got = sample_latents(world, PROMPTS, SEEDS, DDIM_TRAILING, steps, guidance)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, f"relative latent error {err:.2e}"


def test_same_images_whatever_the_batch_size(tiny_sdxl):
    """One generator per image: batch 1 and batch 3 give the same latents."""
    from rapm_bench.config import WorldConfig
    from rapm_bench.generate import sample_latents
    from rapm_bench.sampling import DDIM_TRAILING
    from rapm_bench.worlds import load_world

    world = load_world(WorldConfig(preset="sdxl", teacher=str(tiny_sdxl), device="cpu"))
    together = sample_latents(world, PROMPTS, SEEDS, DDIM_TRAILING, 4, 3.0)
    alone = torch.cat([sample_latents(world, [p], [s], DDIM_TRAILING, 4, 3.0) for p, s in zip(PROMPTS, SEEDS, strict=True)])
    assert (together - alone).abs().max() / together.abs().max() < 1e-5


def test_prompt_encoding_equals_diffusers_encode_prompt(tiny_sdxl):
    """The world's own encoding (token ids sent through `transfer.to_device`) is diffusers' `encode_prompt`, bit for
    bit, and so is the empty prompt's where the pipeline does not zero it."""
    from rapm_bench.config import WorldConfig
    from rapm_bench.worlds import load_world

    world = load_world(WorldConfig(preset="sdxl", teacher=str(tiny_sdxl), device="cpu"))
    prompts = [*PROMPTS, "a caption far longer than the seventy-seven tokens CLIP reads " * 8]
    embeds, _, pooled, _ = world.pipe.encode_prompt(prompts, device=world.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    cond = world.encode_prompts(prompts)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["text_embeds"], pooled)
    assert cond["time_ids"].shape == (len(prompts), 6) and torch.equal(world.encode_prompts(PROMPTS[:1])["time_ids"],
                                                                        cond["time_ids"][:1])
    world.pipe.register_to_config(force_zeros_for_empty_prompt=False)
    neg = world.negative_cond(cond)
    empty, _, empty_pooled, _ = world.pipe.encode_prompt([""] * len(prompts), device=world.device,
                                                         do_classifier_free_guidance=False)
    assert torch.equal(neg["prompt_embeds"], empty) and torch.equal(neg["text_embeds"], empty_pooled)
    assert not torch.equal(neg["prompt_embeds"], torch.zeros_like(empty))
