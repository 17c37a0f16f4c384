"""RAPM (Zhang et al. 2025, arXiv 2503.20744): rank-1 LoRA, DDIM trailing, 4 steps, guidance 1.0."""

from rapm_bench.models import HubFile, ModelSpec, Reported
from rapm_bench.sampling import DDIM_TRAILING

PAPER_PROTOCOL = "RAPM README: 30K COCO-2014 pairs; FID implementation, CLIP model and resolutions not stated"

SPEC = ModelSpec(
    name="rapm",
    description="RAPM 4-step LoRA (published for SDXL; trained by `rapm-bench distill` for tiny)",
    recipe=DDIM_TRAILING,
    default_steps=4,
    steps=(4,),
    guidance=1.0,
    lora={
        # Published as a torch pickle of a LoRA state dict; read with weights_only=True.
        "sdxl": HubFile("guoqiang-x/RAPM_SDXL", "RAPM_SDXL.pt"),
        "tiny": "assets/tiny/rapm/lora.safetensors",
    },
    train_command="`rapm-bench distill` (writes runs/distill/tiny/lora.safetensors)",
    reported=(Reported("sdxl", 4, 19.21, 30.50, PAPER_PROTOCOL, "RAPM README table (1 A6000, batch 1, no real images)"),),
)
