"""The model registry: one module per model, each a declarative `SPEC`."""

from rapm_bench.models import ModelSpec

from . import dmd2, pcm, rapm, teacher

MODELS: dict[str, ModelSpec] = {m.SPEC.name: m.SPEC for m in (teacher, rapm, pcm, dmd2)}
