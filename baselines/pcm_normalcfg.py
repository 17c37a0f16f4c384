"""PCM normalcfg LoRAs (Wang et al. 2024): trained for CFG 2.5-3.5 at 4 steps, DDIM trailing."""

from rapm_bench.models import HubFile, ModelSpec
from rapm_bench.sampling import DDIM_TRAILING

STEPS = (4, 8, 16)

SPEC = ModelSpec(
    name="pcm-normalcfg",
    description="PCM normalcfg LoRAs (4/8/16 steps), DDIM trailing, guidance 3 (model card: 2.5-3.5 at 4 steps)",
    recipe=DDIM_TRAILING,
    default_steps=4,
    steps=STEPS,
    guidance=3.0,
    lora={"sdxl": {s: HubFile("wangfuyun/PCM_Weights", f"pcm_sdxl_normalcfg_{s}step_converted.safetensors",
                              subfolder="sdxl") for s in STEPS}},
)
