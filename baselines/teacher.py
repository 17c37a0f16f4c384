"""The teacher itself at N steps with classifier-free guidance (DDIM, trailing spacing)."""

from rapm_bench.models import ModelSpec
from rapm_bench.sampling import DDIM_TRAILING

SPEC = ModelSpec(
    name="teacher",
    description="the teacher, DDIM trailing, the world's CFG scale",
    recipe=DDIM_TRAILING,
    default_steps=50,
)
