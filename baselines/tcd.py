"""TCD (Zheng et al. 2024): trajectory consistency distillation, SDXL LoRA, TCDScheduler (gamma 0.3)."""

from rapm_bench.models import HubFile, ModelSpec
from rapm_bench.sampling import TCD

SPEC = ModelSpec(
    name="tcd",
    description="TCD SDXL LoRA, TCDScheduler with gamma (eta) 0.3, no CFG; any step count 2-8",
    recipe=TCD,
    default_steps=4,
    steps=(2, 4, 8),
    guidance=0.0,
    lora={"sdxl": HubFile("h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors")},
)
