"""PCM (Wang et al. 2024, phased consistency models): published SDXL LoRAs, DDIM trailing."""

from rapm_bench.models import HubFile, ModelSpec, Reported
from rapm_bench.sampling import DDIM_TRAILING

from .rapm import PAPER_PROTOCOL

STEPS = (2, 4, 8, 16)

SPEC = ModelSpec(
    name="pcm",
    description="PCM smallcfg LoRAs (2/4/8/16 steps), DDIM trailing, guidance 1 (model card: 1-2)",
    recipe=DDIM_TRAILING,
    default_steps=4,
    steps=STEPS,
    guidance=1.0,
    lora={
        "sdxl": {s: HubFile("wangfuyun/PCM_Weights", f"pcm_sdxl_smallcfg_{s}step_converted.safetensors",
                            subfolder="sdxl") for s in STEPS},
        "tiny": {4: "assets/tiny/pcm/lora.safetensors"},
    },
    reported=(Reported("sdxl", None, 22.84, 30.36, PAPER_PROTOCOL, "RAPM README table (PCM: 8 A100, batch 16)"),),
)
