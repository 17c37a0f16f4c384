"""The model registry: one module per model, each a declarative `SPEC` (docs/reference.md, Published models and samplers)."""

from rapm_bench.models import ModelSpec

from . import dmd2, hyper_sd, lcm_lora, lightning, pcm, pcm_normalcfg, rapm, tcd, teacher

MODELS: dict[str, ModelSpec] = {
    m.SPEC.name: m.SPEC for m in (teacher, rapm, pcm, pcm_normalcfg, dmd2, lcm_lora, lightning, hyper_sd, tcd)
}
