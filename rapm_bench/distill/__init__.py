"""RAPM distillation (docs/rapm.md): teacher trajectories, relative and absolute position matching.

`distill(cfg)` is the whole `rapm-bench distill` job; the pieces are importable on their own:
`trajectories` (cached teacher trajectories), `rapm` (the objective), `discriminator`
(heads on frozen teacher-UNet encoder features), `engine` (the training loop).
"""

from .config import DistillConfig, distill_preset, resolve_distill

__all__ = ["DistillConfig", "distill", "distill_preset", "resolve_distill"]


def distill(cfg: DistillConfig) -> dict | None:
    """Run (or resume) one distillation; returns its summary (None on non-main processes)."""
    from .engine import distill as run

    return run(cfg)
