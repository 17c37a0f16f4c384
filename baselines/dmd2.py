"""DMD2 (Yin et al. 2024): 4-step SDXL LoRA, LCMScheduler at its training timesteps, no CFG."""

from rapm_bench.models import HubFile, ModelSpec, Reported
from rapm_bench.sampling import LCM_DMD2

from .rapm import PAPER_PROTOCOL

DMD2_PROTOCOL = ("DMD2 coco10k: 10K val2014 pairs (pandas seed 123), LANCZOS 512, clean-fid; "
                 "our `dmd2-coco10k` protocol")

SPEC = ModelSpec(
    name="dmd2",
    description="DMD2 4-step LoRA (rank 64), LCM at [999, 749, 499, 249], guidance 0",
    recipe=LCM_DMD2,
    default_steps=4,
    steps=(4,),
    guidance=0.0,
    lora={
        "sdxl": HubFile("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"),  # replaced 2024-05-30
        "tiny": "assets/tiny/dmd2/lora.safetensors",
    },
    reported=(
        Reported("sdxl", None, 18.24, 30.85, PAPER_PROTOCOL, "RAPM README table (DMD2: 64 A100, batch 128)"),
        Reported("sdxl", 4, 19.68, None, DMD2_PROTOCOL, "DMD2 paper, 4-step LoRA"),
        Reported("sdxl", 4, 19.32, None, DMD2_PROTOCOL, "DMD2 paper, 4-step UNet (not this LoRA)"),
    ),
)
