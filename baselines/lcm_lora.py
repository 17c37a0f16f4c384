"""LCM-LoRA (Luo et al. 2023): latent consistency LoRA for SDXL, LCMScheduler, 2-8 steps."""

from rapm_bench.models import HubFile, ModelSpec
from rapm_bench.sampling import LCM

SPEC = ModelSpec(
    name="lcm-lora",
    description="LCM-LoRA SDXL (rank 64), LCMScheduler as shipped, guidance 1 (model card: 0-1)",
    recipe=LCM,
    default_steps=4,
    steps=(2, 4, 8),
    guidance=1.0,
    lora={"sdxl": HubFile("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors")},
)
