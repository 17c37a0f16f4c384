"""Hyper-SD (Ren et al. 2024): trajectory-segmented consistency + human feedback, SDXL LoRAs, DDIM trailing."""

from rapm_bench.models import HubFile, ModelSpec
from rapm_bench.sampling import DDIM_TRAILING

STEPS = (1, 2, 4, 8)

SPEC = ModelSpec(
    name="hyper-sd",
    description="Hyper-SDXL LoRAs (1/2/4/8 steps), DDIM trailing, no CFG",
    recipe=DDIM_TRAILING,
    default_steps=4,
    steps=STEPS,
    guidance=0.0,
    lora={"sdxl": {s: HubFile("ByteDance/Hyper-SD", f"Hyper-SDXL-{s}step{'s' if s > 1 else ''}-lora.safetensors")
                   for s in STEPS}},
)
