"""The training objectives the engine runs, behind one small protocol (docs/design.md §4).

`rapm` is ours (rapm.py); `pcm` and `dmd2` are the re-trained baselines, whose losses live
in baselines/pcm.py and baselines/dmd2.py and reach the engine as plug-ins (rapm_bench.plugins: an
`ObjectiveBuilder` each, `register_objective` or an entry point). All three use the same engine, the same cached
teacher trajectories, the same student (a LoRA on the teacher's UNet) and the same run
folder. An objective

- turns one iteration's data (`Example`) into chunks of slot losses (`chunks`, the calling
  convention of `RAPMLoss.chunks`): `g_loss` goes into the student LoRA, `d_loss` into the
  critic (discriminator heads; DMD2: also its fake-score adapter);
- owns its trainable modules besides the student (`critic_groups`, checkpointed by `state`);
- says how its students sample (`recipe`, `sample_guidance`): the sampler it trains for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..plugins import get_objective
from ..sampling import DDIM_TRAILING, SamplerRecipe
from ..worlds.base import Cond
from .config import known_objectives
from .rapm import SlotTerms

if TYPE_CHECKING:
    from ..worlds.base import World
    from .config import DistillConfig
    from .rapm import RAPMLoss
    from .schedule import SlotSchedule

STUDENT = "rapm"
"""PEFT adapter name of the student LoRA (for every objective; the exported keys do not carry it)."""


@dataclass(frozen=True)
class Example:
    """One iteration's data (batch 1): a cached teacher trajectory, fp32 on the device."""

    z_tilde: torch.Tensor  # (N+1, C, H, W): z_tilde[n] = z̃_n (n = N: the noise, n = 0: the teacher's sample)
    z_delta: torch.Tensor  # (N, C, H, W): z_delta[n] = ẑΔ_{n+1}
    z_fine: torch.Tensor | None  # (N, M−1, C, H, W): teacher points inside each slot (PCM), else None
    step: int  # the iteration (DMD2's two time-scale schedule)


class Objective:
    """What the engine calls; the defaults suit an objective without a critic."""

    name = "objective"
    recipe: SamplerRecipe = DDIM_TRAILING  # how its students sample (periodic grids, the eval hint)
    sample_guidance: float = 1.0  # CFG scale at sampling (<= 1: none)

    def chunks(self, ex: Example, cond: Cond, gen: torch.Generator, chunk: int) -> Iterator[SlotTerms]:
        """This iteration's losses, `chunk` slots at a time; the engine runs backward on each before the next."""
        raise NotImplementedError

    def critic_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, base learning rate) per param group of the critic optimiser; [] = no critic."""
        return []

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpointed tensors besides the student LoRA, by module name."""
        return {}

    def load_state(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore `state()` from a checkpoint."""

    def after_step(self) -> None:
        """Called after every optimiser step (an EMA target follows the student here)."""

    def eval_command(self, lora: str, steps: int, preset: str = "") -> str:
        """The command that evaluates this student with its own sampler (`preset`: e.g. " --preset sdxl")."""
        return f"rapm-bench eval --model lora:{lora} --steps {steps}{preset}"


# --- two LoRA adapters on one UNet (DMD2's fake score) -----------------------------------------------
@contextmanager
def use_adapter(unet: nn.Module, name: str) -> Iterator[None]:
    """Make adapter `name` the only active one inside the block (PEFT layers), then restore.

    PEFT's `set_adapter` also sets requires_grad: True on the active adapter, False on the others.
    A backward that recomputes checkpointed blocks must run inside the same block.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    before = [list(m.active_adapters) for m in layers]
    for m in layers:
        m.set_adapter(name)
    try:
        yield
    finally:
        for m, names in zip(layers, before, strict=True):
            m.set_adapter(names)


# --- RAPM ------------------------------------------------------------------------------------------
class RAPMObjective(Objective):
    """RAPM (rapm.py) behind the protocol: absolute and relative position matching."""

    name = "rapm"

    def __init__(self, loss: RAPMLoss, heads: dict[str, nn.Module], disc_lr: float) -> None:
        self.loss, self.heads, self.disc_lr = loss, heads, disc_lr

    def chunks(self, ex: Example, cond: Cond, gen: torch.Generator, chunk: int) -> Iterator[SlotTerms]:
        return self.loss.chunks(ex.z_tilde, ex.z_delta, cond, gen, chunk)

    def critic_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        params = [p for h in self.heads.values() for p in h.parameters()]
        return [(params, self.disc_lr)] if params else []

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: h.state_dict() for name, h in self.heads.items()}

    def load_state(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, h in self.heads.items():
            h.load_state_dict(modules[name])


def build_rapm(cfg: DistillConfig, world: World, sched: SlotSchedule, probe: Cond) -> RAPMObjective:
    """RAPM with its two head sets (when a discriminator is on)."""
    from .discriminator import EncoderFeatures, build_heads, feature_channels
    from .rapm import LossWeights, RAPMLoss

    rc = cfg.method("rapm")  # rapm_config.RAPMConfig
    weights = LossWeights(rc.lambda_abs, rc.lambda_rel, rc.lambda_reg, rc.distance, rc.huber_c)
    features = EncoderFeatures(world) if rc.adversarial else None
    heads: dict[str, nn.Module] = {}
    if features is not None:
        heads_abs, heads_rel = build_heads(feature_channels(features, probe), cfg.disc_hidden, cfg.seed, world.device)
        heads = {"heads_abs": heads_abs, "heads_rel": heads_rel}
    loss = RAPMLoss(world.predict, sched, world.noise_schedule.prediction_type, weights, features,
                    heads.get("heads_abs"), heads.get("heads_rel"))  # type: ignore[arg-type]
    if cfg.fast_nograd:
        fast_nograd(loss, world)
    if cfg.fast_grad and not cfg.grad_checkpointing and cfg.lora_impl == "merged":
        fast_grad(loss, world)
    return RAPMObjective(loss, heads, cfg.disc_lr)


def fast_nograd(loss: RAPMLoss, world: World) -> bool:
    """On a GPU: RAPM's no-grad passes replayed from CUDA graphs (roll-out and relative-target jumps with
    the student's current weights, real-side features with the teacher's), the first roll-out jump merged
    with the relative-target jumps into one batch. The CPU path stays eager. Returns whether it applies."""
    from ..cudagraphs import Graphed, available
    from ..fastlora import refresher

    if not available(world.device):
        return False
    loss.nograd_student = Graphed(loss.student, prepare=refresher(world.unet))  # FastLoRA's W' up to date
    if loss.features is not None:
        loss.real_features = Graphed(loss.features)  # the teacher: adapters off inside, frozen weights
    loss.merge_passes = True
    return True


def fast_grad(loss: RAPMLoss, world: World) -> bool:
    """On a GPU: RAPM's gradient passes (the student's jumps into the LoRA, the fake side's backbone features)
    replayed from CUDA graphs, forward and backward (cudagraphs.GradGraphed). For FastLoRA's merged layers
    (their W' is rebuilt in place) and no gradient checkpointing; the CPU path stays eager. Returns whether it
    applies."""
    from ..cudagraphs import GradGraphed, available
    from ..fastlora import refresher

    if not available(world.device):
        return False
    prepare = getattr(loss.nograd_student, "prepare", None) or refresher(world.unet)  # one refresh per step
    loss.grad_student = GradGraphed(loss.student, world.unet, prepare=prepare)
    if loss.features is not None:
        loss.grad_features = GradGraphed(loss.features)  # grad to the input only: the teacher's weights are frozen
    return True


class ObjectiveBuilder(Protocol):
    """What an objective plug-in provides (rapm_bench.plugins): its Objective for one run."""

    def __call__(self, cfg: DistillConfig, world: World, sched: SlotSchedule, guidance: float,
                 student: list[nn.Parameter], probe: Cond) -> Objective: ...


def rapm_objective(cfg: DistillConfig, world: World, sched: SlotSchedule, guidance: float,
                   student: list[nn.Parameter], probe: Cond) -> RAPMObjective:
    """RAPM as an `ObjectiveBuilder` (its registry entry, with its config, is rapm_config.OBJECTIVE)."""
    return build_rapm(cfg, world, sched, probe)


def build_objective(
    cfg: DistillConfig, world: World, sched: SlotSchedule, guidance: float, student: list[nn.Parameter], probe: Cond,
) -> Objective:
    """The objective `cfg.objective` on this world, built by its registry entry (rapm_bench.plugins); the student
    LoRA (adapter STUDENT) is attached already.

    `guidance` is the trajectories' CFG scale w (DMD2's real score uses it); `probe` is any
    prompt's conditioning (it sizes the discriminator heads).
    """
    spec = get_objective(cfg.objective)
    if spec is None:
        raise ValueError(f"unknown objective {cfg.objective!r}; known: {', '.join(known_objectives())}")
    return spec.build(cfg, world, sched, guidance, student, probe)
