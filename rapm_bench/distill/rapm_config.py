"""RAPM's own settings (docs/rapm.md §4) and its registry entry (rapm_bench.plugins.ObjectiveSpec), installed as
the entry point `rapm = "rapm_bench.distill.rapm_config:OBJECTIVE"` of `rapm_bench.objectives`, as PCM's and DMD2's are.

Light on purpose (no torch): `DistillConfig` nests a `RAPMConfig` as `cfg.rapm`, and the run's config.json
stores its fields flat and unprefixed (`lambda_abs`, ...), as before objectives were a registry. The loss
itself is rapm.py, its builder objectives.build_rapm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..plugins import ObjectiveSpec

if TYPE_CHECKING:
    from .config import DistillConfig


@dataclass(frozen=True)
class RAPMConfig:
    """RAPM's loss (`--set rapm.FIELD=VALUE`, or the flags --lambda-abs, --lambda-rel, --lambda-reg, --distance)."""

    lambda_abs: float = 0.1  # adversarial weight, absolute position z̃_n (teacher point); tiny: 1.0 hurt in a first ablation (issue 5)
    lambda_rel: float = 0.1  # adversarial weight, relative position ẑ_n (student jump from ẑΔ_{n+1})
    lambda_reg: float = 1.0  # pseudo-Huber regression to z̃_n (0 = off); tiny: without it the GAN alone diverges
    distance: str = "gan"  # "gan": two hinge discriminators; "l2": plain MSE to the same targets (ablation)
    huber_c: float = 0.03  # pseudo-Huber on the per-element RMS d: sqrt(d² + c²) − c; L2-like below c, L1 above

    @property
    def adversarial(self) -> bool:
        """Whether the discriminator heads train (a GAN distance with a positive weight)."""
        return self.distance == "gan" and (self.lambda_abs > 0 or self.lambda_rel > 0)

    def validate(self, cfg: DistillConfig, active: bool) -> None:
        """Reject values RAPM cannot run (checked whichever objective trains: the flags exist for all)."""
        for name in ("lambda_abs", "lambda_rel", "lambda_reg"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if active and self.lambda_abs == self.lambda_rel == self.lambda_reg == 0:
            raise UserError("all loss weights are 0: set --lambda-abs, --lambda-rel or --lambda-reg")
        if self.distance not in ("gan", "l2"):
            raise UserError(f"--distance must be `gan` or `l2`, got {self.distance!r}")


def build(cfg: DistillConfig, world: Any, sched: Any, guidance: float, student: Any, probe: Any) -> Any:
    """RAPM as an ObjectiveBuilder (objectives.build_rapm, imported here: it needs torch)."""
    from .objectives import build_rapm

    return build_rapm(cfg, world, sched, probe)


OBJECTIVE = ObjectiveSpec(
    "rapm", build, RAPMConfig, prefix="", lora_impls=("peft", "merged", "fast"),
    description="RAPM (ours): relative and absolute position matching")
