"""SDXL-Lightning (Lin et al. 2024): progressive adversarial distillation, 2/4/8-step LoRAs, Euler trailing."""

from rapm_bench.models import HubFile, ModelSpec
from rapm_bench.sampling import EULER_TRAILING

STEPS = (2, 4, 8)

SPEC = ModelSpec(
    name="lightning",
    description="SDXL-Lightning LoRAs (2/4/8 steps), EulerDiscreteScheduler trailing, no CFG",
    recipe=EULER_TRAILING,
    default_steps=4,
    steps=STEPS,
    guidance=0.0,
    lora={"sdxl": {s: HubFile("ByteDance/SDXL-Lightning", f"sdxl_lightning_{s}step_lora.safetensors") for s in STEPS}},
)
